"""``beit predict`` on the held-out digits with a real pretrained + fine-tuned BEiT in all three forms (run folder,
exported .safetensors, .onnx): the fine-tune's own evaluation (top-1 and its whole confusion matrix) comes out
again, PyTorch and ONNX agree; class folders give labels; undecodable files are counted and named; a model that
does not record its preprocessing is refused; a segmentation run writes its masks and its own mIoU."""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from predict_testutil import digit_samples

from beit.cli import call
from beit.export.preprocessing import MissingPreprocessing
from beit.predict.command import predict_main

pytestmark = pytest.mark.usefixtures("one_thread")


def predict(model, data, out, *extra) -> dict:
    return predict_main(["--model", str(model), "--data", str(data), "--out", str(out), "--num_workers", "0", *extra])


def rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def three_formats(digits_model, tmp_path_factory):
    """The predictions of the run folder, the .safetensors export and the .onnx export on the held-out shards."""
    out = tmp_path_factory.mktemp("predictions")
    return {name: (predict(digits_model[key], digits_model["test"], out / f"{name}.csv"), out / f"{name}.csv")
            for name, key in (("run", "run"), ("safetensors", "timm"), ("onnx", "onnx"))}


def test_every_format_gives_the_finetunes_own_evaluation(digits_model, three_formats):
    final = digits_model["final"]
    confusion = json.loads((digits_model["run"] / "confusion.json").read_text())
    assert 15 < final["top1"] < 100 and final["samples"] == 360       # a real, imperfect model: the matrix says much
    for name, (summary, csv_path) in three_formats.items():
        assert summary["images"] == 360 and summary["errors"] == 0 and summary["labelled"], name
        assert summary["scores"]["top1"] == pytest.approx(final["top1"], abs=1e-9), name
        assert summary["scores"]["top5"] == pytest.approx(final["top5"], abs=1e-9), name
        assert json.loads(csv_path.with_name(f"{name}.confusion.json").read_text()) == confusion, name
        assert csv_path.with_name(f"{name}.confusion.png").stat().st_size > 1000
    assert three_formats["onnx"][0]["runtime"] == "onnxruntime" and three_formats["run"][0]["runtime"] == "pytorch"


def test_pytorch_and_onnx_agree_per_image(digits_model, three_formats):
    torch_rows, onnx_rows = rows(three_formats["run"][1]), rows(three_formats["onnx"][1])
    assert len(torch_rows) == len(onnx_rows) == 360
    assert [r["image"] for r in torch_rows] == [r["image"] for r in onnx_rows]
    assert [r["top1"] for r in torch_rows] == [r["top1"] for r in onnx_rows]
    gaps = [abs(float(a[f"top{k}_prob"]) - float(b[f"top{k}_prob"])) for a, b in zip(torch_rows, onnx_rows)
            for k in range(1, 6) if a[f"top{k}"] == b[f"top{k}"]]
    assert len(gaps) > 1700 and max(gaps) < 1e-4
    first = torch_rows[0]
    assert set(first) >= {"image", "label", "label_name", "top1", "top1_name", "top1_prob", "top5_prob"}
    assert first["image"] == f"{sorted(digits_model['digits'].glob('test-*.tar'))[0]}:" + digit_samples(
        sorted(digits_model["digits"].glob("test-*.tar"))[0])[0]["__key__"]
    probs = [float(first[f"top{k}_prob"]) for k in range(1, 6)]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5


def test_a_run_folder_without_its_final_export_uses_its_newest_checkpoint(digits_model, three_formats, tmp_path):
    """A run that was stopped before it wrote model.safetensors: the newest complete checkpoint (the final one
    here), with the run's config.yaml preprocessing, gives the same predictions as the finished run."""
    run = tmp_path / "unfinished"
    shutil.copytree(digits_model["run"], run)
    (run / "model.safetensors").unlink()
    (run / "model.json").unlink()
    assert not (run / "model.safetensors").exists() and any((run / "checkpoints").glob("step_*/COMPLETE"))
    summary = predict(run, digits_model["test"], tmp_path / "ckpt.csv")
    assert "newest complete checkpoint" in summary["model"] and summary["runtime"] == "pytorch"
    assert summary["scores"]["top1"] == pytest.approx(digits_model["final"]["top1"], abs=1e-9)
    assert rows(tmp_path / "ckpt.csv") == rows(three_formats["run"][1])


def write_class_folders(digits_model, root, broken: bool = True):
    """The held-out digits as PNG files in class folders (the shard's own bytes), plus files that cannot be used."""
    samples = digit_samples(sorted(digits_model["digits"].glob("test-*.tar"))[0])
    for s in samples:
        folder = root / s["cls"].decode()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{s['__key__']}.png").write_bytes(s["png"])
    if broken:
        (root / "3" / "cut_short.png").write_bytes(samples[0]["png"][:60])     # truncated
        (root / "7" / "not_a_picture.jpg").write_text("hello")                 # not an image
        (root / "7" / "notes.txt").write_text("no image extension")           # left out, said so
    return samples


def test_class_folders_give_labels_and_name_every_undecodable_file(digits_model, three_formats, tmp_path, capsys):
    write_class_folders(digits_model, tmp_path / "my_test")
    out = tmp_path / "out" / "folder.csv"
    summary = predict(digits_model["run"], tmp_path / "my_test", out, "--top_k", "3", "--batch_size", "50")
    shown = capsys.readouterr().out
    assert summary["labelled"] and summary["images"] == 360 and summary["errors"] == 2
    assert summary["error_reasons"] == {"truncated": 1, "not_image": 1}
    # the same images in class folders: the same score as the shards (and as the fine-tune's evaluation)
    assert summary["scores"]["top1"] == pytest.approx(digits_model["final"]["top1"], abs=1e-9)
    errors = rows(out.with_name("folder.errors.csv"))
    assert sorted(e["image"] for e in errors) == ["3/cut_short.png", "7/not_a_picture.jpg"]
    assert all(e["reason"] and e["detail"] for e in errors)
    assert "could not use 2 file(s)" in shown and "3/cut_short.png" in shown and "7/not_a_picture.jpg" in shown
    assert "top-1" in shown and "notes.txt" in shown                  # the skipped file is named at start-up
    got = rows(out)
    assert len(got) == 360 and "top4" not in got[0] and all(r["label_name"] == r["image"].split("/")[0] for r in got)
    # the folder's predictions are the shards' predictions, image for image
    by_key = {r["image"].rpartition(":")[2]: r["top1"] for r in rows(three_formats["run"][1])}
    assert all(by_key[r["image"].split("/")[1][:-4]] == r["top1"] for r in got)


def test_a_folder_without_class_folders_is_predicted_without_labels(digits_model, tmp_path):
    samples = digit_samples(sorted(digits_model["digits"].glob("test-*.tar"))[0])[:20]
    for s in samples:
        (tmp_path / "new").mkdir(exist_ok=True)
        Image.open(io.BytesIO(s["png"])).convert("RGB").save(tmp_path / "new" / f"{s['__key__']}.jpg", quality=95)
    summary = predict(digits_model["onnx"], tmp_path / "new", tmp_path / "p.csv", "--top_k", "2")
    got = rows(tmp_path / "p.csv")
    assert not summary["labelled"] and summary["images"] == 20 and summary["scores"] == {}
    assert list(got[0]) == ["image", "top1", "top1_name", "top1_prob", "top2", "top2_name", "top2_prob"]
    assert not (tmp_path / "p.confusion.json").exists()


def test_a_folder_of_shards_reads_them_all(digits_model, tmp_path):
    summary = predict(digits_model["timm"], digits_model["digits"], tmp_path / "all.csv")
    assert summary["images"] == 1797 and summary["labelled"] and summary["scores"]["samples"] == 1797


def test_workers_keep_the_order_and_the_results(digits_model, three_formats, tmp_path):
    write_class_folders(digits_model, tmp_path / "f", broken=False)
    one = predict(digits_model["timm"], tmp_path / "f", tmp_path / "one.csv", "--batch_size", "16")
    two = predict(digits_model["timm"], tmp_path / "f", tmp_path / "two.csv", "--batch_size", "16",
                  "--num_workers", "2")
    assert rows(tmp_path / "one.csv") == rows(tmp_path / "two.csv") and one["scores"] == two["scores"]


def test_a_model_without_its_preprocessing_is_refused_until_it_is_given(digits_model, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(digits_model["onnx"], bare / "model.onnx")
    with pytest.raises(MissingPreprocessing, match=r"model.preprocess.json.*--preprocessing"):
        predict(bare / "model.onnx", digits_model["test"], tmp_path / "x.csv")
    assert call(predict_main, ["--model", str(bare / "model.onnx"), "--data", digits_model["test"],
                               "--out", str(tmp_path / "x.csv")]) == 2          # a clear error, exit code 2
    # the export's own model.json (or the run's config.yaml) supplies it: the same predictions as with its own
    given = predict(bare / "model.onnx", digits_model["test"], tmp_path / "given.csv", "--preprocessing",
                    str(digits_model["timm"].with_suffix(".json")))
    assert given["scores"]["top1"] == pytest.approx(digits_model["final"]["top1"], abs=1e-9)
    given_run = predict(bare / "model.onnx", digits_model["test"], tmp_path / "run.csv", "--preprocessing",
                        str(digits_model["run"] / "config.yaml"))
    assert rows(tmp_path / "run.csv") == rows(tmp_path / "given.csv") and given_run["scores"] == given["scores"]
    # an export whose JSON lacks part of it: refused, naming what is missing
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(digits_model["timm"], old / "model.safetensors")
    conf = json.loads(digits_model["timm"].with_suffix(".json").read_text())
    del conf["crop_pct"]
    (old / "model.json").write_text(json.dumps(conf))
    with pytest.raises(MissingPreprocessing, match=r"no crop_pct.*nothing is guessed"):
        predict(old / "model.safetensors", digits_model["test"], tmp_path / "y.csv")
    # a model that has its own preprocessing does not take another
    with pytest.raises(ValueError, match="leave --preprocessing out"):
        predict(digits_model["run"], digits_model["test"], tmp_path / "z.csv", "--preprocessing",
                str(digits_model["run"] / "config.yaml"))


def test_bad_inputs_are_clear_errors(digits_model, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist.*run folder"):
        predict(tmp_path / "nope", digits_model["test"], tmp_path / "a.csv")
    with pytest.raises(ValueError, match="Hugging Face transformers folder"):
        predict(digits_model["hf"], digits_model["test"], tmp_path / "a.csv")
    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(digits_model["timm"], lonely)
    with pytest.raises(FileNotFoundError, match="lonely.json"):
        predict(lonely, digits_model["test"], tmp_path / "a.csv")
    nested = tmp_path / "nested" / "deeper"
    shutil.copytree(digits_model["digits"], nested)
    with pytest.raises(ValueError, match="holds shards, no images"):
        predict(digits_model["run"], nested.parent, tmp_path / "a.csv")
    with pytest.raises(ValueError, match="--data"):
        predict(digits_model["run"], tmp_path / "missing-*.tar", tmp_path / "a.csv")
    # shards written with another label map: their numbers mean other classes
    other = tmp_path / "other"
    shutil.copytree(digits_model["digits"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["label_map"] = {f"class{i}": i for i in range(10)}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not the model's classes"):
        predict(digits_model["run"], other / "test-*.tar", tmp_path / "a.csv")
    with pytest.raises(SystemExit):                                        # option errors: argparse's exit 2
        predict(digits_model["run"], digits_model["test"], tmp_path / "a.txt")
    assert "must end with .csv" in capsys.readouterr().err


@pytest.mark.slow
def test_segmentation_run_writes_masks_and_its_own_miou(tmp_path):
    from test_finetune_seg import seg_cfg, write_seg_shards

    from beit.finetune import run_finetune
    shards = write_seg_shards(tmp_path / "seg")
    run = tmp_path / "segrun"
    final = run_finetune(seg_cfg(shards, run, epochs=3, mixed_precision="no"))
    summary = predict(run, shards / "val" / "val-*.tar", tmp_path / "seg.csv", "--top_k", "2")
    assert summary["kind"] == "segmenter" and summary["images"] == 16 and summary["errors"] == 0
    assert summary["scores"]["mIoU"] == pytest.approx(final["mIoU"], abs=1e-9)          # the run's own sliding eval
    assert json.loads((tmp_path / "seg.confusion.json").read_text()) == \
        json.loads((run / "confusion.json").read_text())
    got = rows(tmp_path / "seg.csv")
    assert len(got) == 16 and list(got[0])[:4] == ["image", "mask", "height", "width"]
    for r in got:
        mask = np.asarray(Image.open(r["mask"]))
        assert mask.shape == (int(r["height"]), int(r["width"]))      # the image's own size
        assert set(np.unique(mask)) <= {1, 2, 3, 4}                     # reduce_zero_label: class c stored as c + 1
        share = float(r["class1_share"]) + float(r["class2_share"])
        assert 0 < share <= 1 + 1e-6
    # the exported segmenter alone gives the same masks
    again = predict(run / "model.safetensors", shards / "val" / "val-*.tar", tmp_path / "again.csv",
                    "--masks_dir", str(tmp_path / "m2"))
    assert again["scores"]["mIoU"] == pytest.approx(final["mIoU"], abs=1e-9)
    first = rows(tmp_path / "again.csv")[0]
    assert np.array_equal(np.asarray(Image.open(first["mask"])), np.asarray(Image.open(got[0]["mask"])))
    # the run's model card: its loading code, verbatim in a fresh process, gives the same mask
    from test_model_cards import card_parts
    front, body, snippet = card_parts(run / "README.md")
    assert front["pipeline_tag"] == "image-segmentation" and f"| mIoU | {final['mIoU']:.2f}% |" in body
    key = got[0]["image"].rpartition(":")[2]
    sample = next(s for s in digit_samples(sorted((shards / "val").glob("val-*.tar"))[0]) if s["__key__"] == key)
    (tmp_path / "first.jpg").write_bytes(sample["jpg"])
    mask_file, image_file = str(tmp_path / "card_mask.npy"), str(tmp_path / "first.jpg")
    code = snippet + ("\nimport numpy as np\nfrom PIL import Image\n"
                      f"np.save({mask_file!r}, predict(Image.open({image_file!r})).numpy())\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=run, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "card_mask.npy") + 1, np.asarray(Image.open(got[0]["mask"])))
