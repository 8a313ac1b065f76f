"""The README's "Using it on your data" flow, its commands read out of the README and run verbatim (bash, the
installed ``beit`` command):

* at a real size, by ``launch/readme_flow.py`` on the 1,797 bundled digits written as class folders (``my_photos``
  = ``my_labelled``), then its Python block loading the export with timm. Pretraining must beat the majority-token
  baseline on the held-out images, fine-tuning logistic regression on the pixels of the same split, timm's own data
  config must score the held-out images as the fine-tune did, and the three commands must finish within the time
  the README states. (The 1,326 photo crops: ``launch/readme_flow.py --set photos``, measured in
  docs/own_data.md.)
* on small folders of real JPEGs cut from the bundled photos (separate unlabelled and labelled folders, nested
  sub-folders), followed by the "Using the model" commands (``beit predict``, the exports) and its Python (timm,
  transformers, onnxruntime) on that model, verbatim."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from readme_flow import own_data_commands, own_data_python, stated_minutes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLASSES = ("astronaut", "chelsea", "coffee")


def test_the_block_gives_no_sizes_and_states_its_time():
    commands = own_data_commands()
    assert [c.split()[:3] for c in commands] == [["beit", "tokenizer", "train"], ["beit", "pretrain", "--data"],
                                                 ["beit", "finetune", "--data"]]
    for flag in ("--image_size", "--patch_size", "--epochs", "--vocab_size", "--batch_size", "--model_size"):
        assert all(flag not in c for c in commands), flag  # the recipe from the data chooses them
    assert stated_minutes() <= 15 and "resolve_data_config(model=model)" in own_data_python()


@pytest.mark.slow
@pytest.mark.timeout(int(stated_minutes() * 60) + 600)  # the commands' limit, then the baselines and timm's scoring
def test_readme_flow_on_the_bundled_digits(tmp_path):
    out = tmp_path / "flow"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "readme_flow.py"), "--set", "digits", "--out", str(out)],
                       capture_output=True, text=True, timeout=int(stated_minutes() * 60) + 540)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    result = json.loads((out / "flow.json").read_text())
    logs = [(out / f"command{i}.log").read_text() for i in (1, 2, 3)]
    assert result["images"] == 1797 and result["held_out"] == 359 and result["train_images"] == 1438
    # the time the README states, for the three commands as printed
    assert result["seconds"] <= result["stated_minutes"] * 60, result["commands"]
    # pretraining learnt (held-out masked tokens beat the majority token, beyond noise); fine-tuning beat the pixels
    pre = result["pretrain"]
    assert pre["learning"] and pre["mim_acc"] > pre["majority_acc"] and not pre["warnings"], pre
    assert result["finetune_top1"] >= result["logreg_pixels_top1"], result
    # timm's own data config (README's Python block) scores the held-out digits as the fine-tune did
    assert result["timm_images"] == 359 and result["timm_top1"] == pytest.approx(result["finetune_top1"], abs=1e-6)
    # each command said what it chose; the long ones estimated their time; no warnings a user cannot act on
    assert all("recipe from the data: 1,797 images (1,438 to train on), median shorter side 32 px" in log
               for log in logs)
    assert all("estimated time: " in log for log in logs[1:])
    assert all("Warning" not in log and "DataLoader will create" not in log for log in logs)
    assert "classes: 10 (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)" in logs[2] and "359 held out (20% of each sub-folder" in logs[2]
    final = json.loads((out / "runs/mine/finetune/final.json").read_text())
    assert final["held_out_set"] == "my_labelled: 20% of each sub-folder, split seed 0"
    # one conversion per stage kind: the tokenizer's set is pretraining's (same held-out images), fine-tuning's beside
    cached = sorted(p.name.split("-")[2] for p in (out / "cache").iterdir() if not p.name.startswith("."))
    assert cached == ["images", "labelled"]


def own_data_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Using it on your data"):]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def report_to_block() -> str:
    """The block that shows --report_to: it goes on from the outputs of the first."""
    (block,) = [b for b in own_data_blocks() if "--report_to" in b]
    return block


def use_model_blocks() -> tuple[str, list[str]]:
    """The "Using the model" section's bash block and its Python blocks."""
    text = README.read_text()
    section = text[text.index("## Using the model"):text.index("## Scaling out")]
    return (re.search(r"```bash\n(.*?)```", section, re.S).group(1),
            re.findall(r"```python\n(.*?)```", section, re.S))


def write_folders(root: Path) -> None:
    """my_photos/: 36 crops of every bundled photo (nested folders); my_labelled/<class>/: 10 crops each;
    my_test/<class>/: 4 new crops each and a file that is no image."""
    from beit.data.sample_sets import load_photos

    photos = load_photos()
    rng = np.random.default_rng(0)

    def crops(arr: np.ndarray, n: int):
        h, w = arr.shape[:2]
        for _ in range(n):
            side = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
            y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            yield Image.fromarray(arr[y:y + side, x:x + side]).resize((80, 80), Image.Resampling.BICUBIC)

    names = sorted(photos)
    for i, img in enumerate(c for name in names for c in crops(photos[name], 2)):
        out = root / "my_photos" / ("a" if i % 2 else "b/deeper") / f"photo{i:03d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, quality=90)
    for cls in CLASSES:
        (root / "my_labelled" / cls).mkdir(parents=True)
        for j, img in enumerate(crops(photos[cls], 10)):
            img.save(root / "my_labelled" / cls / f"{cls}{j}.jpg", quality=90)
    for cls in CLASSES:  # new images for "Using the model", and a file that is no image
        (root / "my_test" / cls).mkdir(parents=True)
        for j, img in enumerate(crops(photos[cls], 4)):
            img.save(root / "my_test" / cls / f"new_{cls}{j}.jpg", quality=90)
    (root / "my_test" / "coffee" / "broken.jpg").write_text("not an image")


@pytest.mark.slow
@pytest.mark.timeout(2400)  # eight processes with their imports; about 6-9 min on a busy 2-core machine
def test_readme_own_data_commands_run_verbatim(tmp_path):
    import timm
    import torch

    block = "\n".join(own_data_commands())
    assert block.count("beit ") <= 4 and "my_photos" in block and "my_labelled" in block
    write_folders(tmp_path)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               BEIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1700)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-5000:]
    # the start-up summaries say what was found and what an epoch covers; the final summaries are there
    assert "every image once" in log and "classes: 3 (astronaut, chelsea, coffee)" in log
    assert "finished:" in log and "final: top-1" in log
    assert "Warning" not in log and "DataLoader will create" not in log  # no library warnings the user cannot act on
    ft = tmp_path / "runs" / "mine" / "finetune"
    final = json.loads((ft / "final.json").read_text())
    assert final["num_classes"] == 3 and final["class_names"] == list(CLASSES)
    assert final["samples"] == 6  # 20% of each class held out: 2 + 2 + 2
    assert np.asarray(json.loads((ft / "confusion.json").read_text())).shape == (3, 3)
    conf = json.loads((ft / "model.json").read_text())
    model = timm.create_model(conf["timm_entrypoint"], pretrained=False, checkpoint_path=str(ft / "model.safetensors"),
                              **conf["model_kwargs"]).eval()
    size = conf["pretrained_cfg"]["input_size"]  # the recipe's, fitted to these folders
    with torch.no_grad():
        assert model(torch.zeros(1, *size)).shape == (1, 3)
    # the folders were written into shards once; a rerun of the same folder reuses them
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert len(cached) == 2 and any(n.startswith("my_photos-") for n in cached)

    # --report_to: the same fine-tune, also into an offline W&B run (its own folders under tmp_path)
    from tracker_testutil import wandb_runs
    wandb_home = {f"WANDB_{k}_DIR": str(tmp_path / "wandb_home" / k.lower()) for k in ("CACHE", "DATA", "CONFIG")}
    shell = {k: v for k, v in env.items() if not k.startswith("WANDB_")}  # not this process's W&B service or settings
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", report_to_block()], cwd=tmp_path, timeout=900, text=True,
                       capture_output=True, env={**shell, **wandb_home, "WANDB_SILENT": "true"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    tracked = tmp_path / "runs" / "mine" / "finetune_wandb"
    (wb,) = wandb_runs(tracked)
    assert wb.name == "mine/finetune" and list((tracked / "tensorboard").rglob("events.out.tfevents*"))
    final = json.loads((tracked / "final.json").read_text())
    assert wb.summary["final/top1"] == final["top1"] and sorted(wb.series("val/top1"))
    assert {c.path for c in wb.artifacts[0].manifest.contents} >= {"config.yaml", "final.json"}

    use_the_model(tmp_path, env)


def rows(path: Path) -> list[dict]:
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def use_the_model(root: Path, env: dict) -> None:
    """The "Using the model" commands and Python, verbatim, on the run the block above made."""
    bash, pythons = use_model_blocks()
    assert len(pythons) == 3 and bash.count("beit ") == 5
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", bash], cwd=root, env=env, capture_output=True, text=True,
                       timeout=1200)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-5000:]
    assert "could not use 1 file(s)" in log and "coffee/broken.jpg" in log and "top-1" in log
    summary = json.loads((root / "runs" / "mine" / "predictions.json").read_text())
    assert summary["labelled"] and summary["images"] == 12 and summary["error_reasons"] == {"not_image": 1}
    torch_rows = rows(root / "runs" / "mine" / "predictions.csv")
    onnx_rows = rows(root / "runs" / "mine" / "predictions_onnx.csv")
    assert [r["top1"] for r in torch_rows] == [r["top1"] for r in onnx_rows] and len(torch_rows) == 12
    assert max(abs(float(a["top1_prob"]) - float(b["top1_prob"])) for a, b in zip(torch_rows, onnx_rows)) < 1e-4
    assert (root / "runs" / "mine" / "predictions.confusion.png").is_file()
    for card in ("exported", "exported/hf", "exported/onnx", "runs/mine/finetune"):
        assert "## How to load" in (root / card / "README.md").read_text(), card
    # the three Python blocks, verbatim, one after the other: every runtime names the class beit predict gave
    shutil.copy(root / "my_test" / "coffee" / "new_coffee0.jpg", root / "photo.jpg")
    r = subprocess.run([sys.executable, "-c", "\n\n".join(pythons)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    said = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    expected = next(row["top1_name"] for row in torch_rows if row["image"] == "coffee/new_coffee0.jpg")
    assert said["timm"].split()[0] == said["transformers"] == said["onnxruntime"] == expected, (said, expected)
