"""``beit compare`` end to end on the bundled digits with a tiny budget (1 seed, a few steps)."""
import json
import re
import sys

import numpy as np
import pytest
import torch

from beit.cli import main as cli
from beit.data.sample_sets import build_sample_shards

TINY = ["--seeds", "0", "--label_fraction", "0.1", "--threads", "1", "--embed_dim", "32", "--depth", "1",
        "--num_heads", "2", "--pretrain", "{total_steps: 8, log_every: 4}",
        "--finetune", "{epochs: 2, warmup_epochs: 1}", "--tokenizer_fit", "{epochs: 1, vocab_size: 16}",
        "--scratch_epoch_factors", "1,2"]



def pixel_logreg_reference(shard_dir, keys, test_dir) -> float:
    """Logistic regression on the grey pixels decoded straight from the PNGs (the old evidence script's way)."""
    import io

    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from beit.data.storage.shard_format import iter_tar_samples

    def read(d, prefix):
        out = []
        for p in sorted(d.glob(f"{prefix}-*.tar")):
            with open(p, "rb") as f:
                out += [(s["__key__"], np.asarray(Image.open(io.BytesIO(s["png"])).convert("L"),
                                                  np.float32).ravel() / 255,
                         int(s["cls"])) for s in iter_tar_samples(f)]
        return out
    train = [s for s in read(shard_dir, "train") if s[0] in keys]
    test = read(test_dir, "test")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    clf.fit(np.stack([s[1] for s in train]), [s[2] for s in train])
    return 100 * clf.score(np.stack([s[1] for s in test]), [s[2] for s in test])


def test_compare_tiny_run(digits, tmp_path, capsys):
    n = torch.get_num_threads()
    out = tmp_path / "cmp"
    args = ["compare", "--train_shards", str(digits / "train-*.tar"), "--test_shards", str(digits / "test-*.tar"),
            "--output_dir", str(out), *TINY]
    try:
        assert cli(args) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads((out / "compare.json").read_text())
    assert list(res["rows"]) == ["beit", "scratch", "scratch_fitted", "linear_probe", "knn", "logreg_features",
                                 "logreg_pixels"]
    assert all(len(v) == 1 and 0 <= v[0] <= 100 for v in res["rows"].values())
    seed = res["per_seed"][0]
    assert seed["labels"] == 144 and res["data"]["test"] == 360
    # every stage is a run folder that stays
    for stage in ("pretrain/pretrained.safetensors", "finetune_beit/final.json", "finetune_scratch/final.json",
                  "linear_probe/final.json", "tokenizer/kmeans.safetensors", "labels/manifest.json"):
        assert (out / "seed0" / stage).is_file(), stage
    assert seed["pretrain"]["step"] == 8 and seed["pretrain"]["knn/evaluations"] >= 2
    # the fitted scratch recipe was chosen on the training loss, against BEiT's
    fit = seed["scratch_fitted"]
    assert fit["chosen_epochs"] in (2, 4) and fit["tried"][0]["train_loss"] == seed["scratch"]["train_loss"]
    assert fit["decision"] in ("reached", "under_fitted", "val") and fit["decision_note"]
    # logistic regression on pixels: the same number as an independent computation from the PNGs
    from beit.data.storage.shard_format import iter_tar_samples
    keys = set()
    for p in (out / "seed0" / "labels").glob("train-*.tar"):
        with open(p, "rb") as f:
            keys |= {s["__key__"] for s in iter_tar_samples(f)}
    assert res["rows"]["logreg_pixels"][0] == pytest.approx(pixel_logreg_reference(digits, keys, digits))
    # code version, markdown with a verdict, a PNG plot
    assert re.fullmatch(r"[0-9a-f]{40}", res["code"]["commit"]) and isinstance(res["code"]["dirty"], bool)
    md = (out / "compare.md").read_text()
    assert "| logistic regression on pixels |" in md and " wins with " in md and "vs same ViT from scratch" in md
    assert f"What the rule did: seed 0: {fit['decision_note']}" in md
    assert ("under-fitted at 4 epochs on seed 0" in md) == (fit["decision"] == "under_fitted")
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun with the same inputs reuses every stage (no retraining) and gives the same table
    marker = out / "seed0" / "pretrain" / "stage.json"
    before = marker.stat().st_mtime_ns
    capsys.readouterr()
    try:
        assert cli(args) == 0
    finally:
        torch.set_num_threads(n)
    assert marker.stat().st_mtime_ns == before and "BEiT pretraining:" not in capsys.readouterr().out
    assert json.loads((out / "compare.json").read_text())["rows"] == res["rows"]


def exit_code(args) -> int:
    try:
        return cli(args)
    except SystemExit as e:  # option errors exit from the argument parser
        return e.code


def test_compare_refuses_bad_input(digits, tmp_path, capsys):
    base = ["compare", "--output_dir", str(tmp_path / "x")]
    assert exit_code(base + ["--train_shards", str(digits / "train-*.tar"), "--test_shards",
                             str(digits / "train-*.tar")]) == 2
    assert "must not be the training" in capsys.readouterr().err
    build_sample_shards(tmp_path / "photos", "photos")
    assert exit_code(base + ["--train_shards", str(tmp_path / "photos" / "train-*.tar"),
                       "--test_shards", str(digits / "test-*.tar")]) == 2
    assert "has no label" in capsys.readouterr().err
    assert exit_code(base + ["--train_shards", str(digits / "train-*.tar"), "--test_shards",
                             str(digits / "nope-*.tar")]) == 2
    assert "--test_shards" in capsys.readouterr().err


def test_compare_scratch_recipe_fitted_on_a_carved_validation_split(digits, tmp_path):
    from beit.data.storage.shard_format import iter_tar_samples

    def keys(pattern_dir, prefix):
        out = set()
        for p in pattern_dir.glob(f"{prefix}-*.tar"):
            with open(p, "rb") as f:
                out |= {s["__key__"] for s in iter_tar_samples(f)}
        return out
    out = tmp_path / "cmp"
    n = torch.get_num_threads()
    try:
        assert cli(["compare", "--train_shards", str(digits / "train-*.tar"), "--test_shards",
                    str(digits / "test-*.tar"), "--output_dir", str(out), "--methods", "scratch_fitted",
                    "--scratch_fit", "val", *TINY]) == 0
    finally:
        torch.set_num_threads(n)
    fit = json.loads((out / "compare.json").read_text())["per_seed"][0]["scratch_fitted"]
    assert [t["epochs"] for t in fit["tried"]] == [2, 4] and all("val_top1" in t for t in fit["tried"])
    assert fit["chosen_epochs"] == max(fit["tried"], key=lambda t: (t["val_top1"], -t["factor"]))["epochs"]
    assert fit["epochs"] == fit["chosen_epochs"]  # retrained on the whole label subset with the chosen length
    labels, carved = out / "seed0" / "labels", out / "seed0" / "scratch_fit" / "labels"
    val, fit_keys, subset = keys(carved, "val"), keys(carved, "fit"), keys(labels, "train")
    assert val and not val & fit_keys and val | fit_keys == subset          # carved from the label subset only
    assert not val & keys(digits, "test")
    assert not (out / "seed0" / "pretrain").exists()                       # no pretraining was needed


def test_evidence_dev_split_never_reads_the_test_split(digits, tmp_path):
    """launch/evidence.py --dev: a stratified 20% of the TRAINING images is the scored set, the rest the
    training set; the two are disjoint, cover the training images, and the test shards are not needed."""
    import importlib.util
    import shutil
    from collections import Counter
    from pathlib import Path

    from beit.compare.labels import read_labelled
    spec = importlib.util.spec_from_file_location("evidence", Path(__file__).parents[1] / "launch" / "evidence.py")
    evidence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evidence)
    for p in list(digits.glob("train-*.tar")) + [digits / "manifest.json"]:
        shutil.copy(p, tmp_path)  # no test shards in this folder
    dev_dir = evidence.dev_split(tmp_path)
    train = read_labelled(str(tmp_path / "train-*.tar"), "t")
    fit, dev = read_labelled(str(dev_dir / "train-*.tar"), "t"), read_labelled(str(dev_dir / "dev-*.tar"), "t")
    assert not {s["key"] for s in fit} & {s["key"] for s in dev}
    assert sorted(s["key"] for s in fit + dev) == sorted(s["key"] for s in train)
    per_class, dev_class = Counter(s["label"] for s in train), Counter(s["label"] for s in dev)
    assert all(abs(dev_class[c] - 0.2 * n) <= 1 for c, n in per_class.items())


def test_code_version_names_the_commit_and_the_changed_files(tmp_path):
    import subprocess

    from beit.compare.report import code_version

    def git(*a):
        subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "tracked.py").write_text("a = 1\n")
    git("add", "tracked.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert code_version(tmp_path) == {"commit": head, "dirty": False, "changed_files": []}
    (tmp_path / "tracked.py").write_text("a = 2\n")  # " M tracked.py": a blank first status column
    (tmp_path / "new.py").write_text("")
    v = code_version(tmp_path)
    assert v["commit"] == head and v["dirty"] and sorted(v["changed_files"]) == ["new.py", "tracked.py"]


def test_seeds_in_parallel_processes_give_the_numbers_of_one_after_another(digits, tmp_path, capsys):
    """--jobs 2 runs the seeds in two spawned processes; every seed's numbers (pretraining included)
    are those of the same seed run alone in this process."""
    n = torch.get_num_threads()
    base = ["compare", "--train_shards", str(digits / "train-*.tar"), "--test_shards", str(digits / "test-*.tar"),
            *TINY, "--methods", "beit,logreg_pixels", "--health_knn", "false"]
    try:
        assert cli([*base, "--seeds", "0,1", "--jobs", "2", "--output_dir", str(tmp_path / "par")]) == 0
        assert "seeds [0, 1] in 2 processes at once, 1 thread(s) each" in capsys.readouterr().out
        assert cli([*base, "--seeds", "1", "--output_dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(n)
    par, one = (json.loads((tmp_path / d / "compare.json").read_text()) for d in ("par", "one"))
    assert [r["seed"] for r in par["per_seed"]] == [0, 1]
    a, b = par["per_seed"][1], one["per_seed"][0]
    assert a["top1"] == b["top1"] and a["labels_digest"] == b["labels_digest"]
    assert a["beit"]["train_loss"] == b["beit"]["train_loss"]
    assert a["pretrain"] == {**b["pretrain"], "train_seconds": a["pretrain"]["train_seconds"]}
    assert par["per_seed"][0]["labels_digest"] != a["labels_digest"]  # the seeds drew different labels


def test_screen_finetune_reproduces_the_run_and_scores_variants(digits, tmp_path, capsys):
    """launch/screen_finetune.py: its unchanged-recipe row is the run's own BEiT fine-tune (same seeded
    stage, recomputed), and each variant is a fine-tune from the same pretrained encoder."""
    import importlib.util
    from pathlib import Path
    n = torch.get_num_threads()
    run = tmp_path / "run"
    try:
        assert cli(["compare", "--train_shards", str(digits / "train-*.tar"), "--test_shards",
                    str(digits / "test-*.tar"), *TINY, "--methods", "beit", "--health_knn", "false",
                    "--output_dir", str(run)]) == 0
        spec = importlib.util.spec_from_file_location("screen",
                                                      Path(__file__).parents[1] / "launch" / "screen_finetune.py")
        screen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(screen)
        assert screen.main(["--run", str(run), "--variants", "{epochs: 3}", "--jobs", "1"]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads((run / "compare.json").read_text())["per_seed"][0]["beit"]
    table = json.loads((run / "screen.json").read_text())
    assert set(table) == {"baseline", "epochs=3"}
    assert table["baseline"]["0"]["top1"] == res["top1"] and table["baseline"]["0"]["train_loss"] == res["train_loss"]
    assert table["epochs=3"]["0"]["epochs"] == 3 and (run / "seed0" / "screen" / "epochs=3" / "final.json").is_file()
    assert "epochs=3" in capsys.readouterr().out


def test_job_processes_give_their_data_loaders_the_platform_start_method():
    """A spawned child inherits "spawn" as its start method, so its data loader workers re-imported
    the package at every epoch (a 3 s k-means fit took 55 s in a --jobs process); the job processes
    reset it to the platform default."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from beit.compare.run import job_pool
    spawn = multiprocessing.get_context("spawn")
    default = multiprocessing.get_context().get_start_method()
    assert default != "spawn" or sys.platform != "linux"
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        assert pool.submit(_start_method).result() == "spawn"  # the inherited method
    with job_pool(1) as pool:
        assert pool.submit(_start_method).result() == default


def _start_method() -> str:
    import multiprocessing
    return multiprocessing.get_start_method()


def readme_evidence_commands() -> list[str]:
    """The one-line ``launch/evidence.py`` commands the README shows."""
    from pathlib import Path
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return sorted(set(re.findall(r"`(python launch/evidence\.py [^`\n]*)`", text)))


def test_the_readme_shows_both_evidence_commands():
    assert readme_evidence_commands() == ["python launch/evidence.py --out runs/evidence",
                                          "python launch/evidence.py --out runs/evidence_photos --set photos"]


@pytest.mark.parametrize("command", readme_evidence_commands())
def test_readme_evidence_command_runs(command, tmp_path):
    """Each README evidence command, verbatim but for its output folder (under tmp) and a tiny budget
    appended, runs as a process and scores the set's fixed test split."""
    import shlex
    import subprocess
    from pathlib import Path
    argv = shlex.split(command)
    out = argv.index("--out") + 1
    argv[out] = str(tmp_path / argv[out])
    tiny = ["--seeds", "0", "--embed_dim", "32", "--depth", "1", "--num_heads", "2", "--methods", "beit,logreg_pixels",
            "--pretrain", "{total_steps: 4, log_every: 2}", "--finetune", "{epochs: 1, warmup_epochs: 0}",
            "--tokenizer_fit", "{epochs: 1, vocab_size: 16}"]
    root = Path(__file__).parents[1]
    proc = subprocess.run([sys.executable, *argv[1:], *tiny], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((Path(argv[out]) / "compare.json").read_text())
    assert list(res["rows"]) == ["beit", "logreg_pixels"] and all(len(v) == 1 for v in res["rows"].values())
    assert res["data"]["test"] == (222 if "--set photos" in command else 360)
    assert res["per_seed"][0]["labels"] == (133 if "--set photos" in command else 144)


def test_label_subset_is_the_fraction_of_the_whole():
    """10% of 4,000 images is 400 whatever the class sizes (rounding each class alone gave 399), every class
    keeps at least one image, each class's share is within one image of its exact share, and it is seeded."""
    from beit.compare.labels import stratified_subset
    rng = np.random.default_rng(0)
    for trial in range(20):
        sizes = rng.integers(80, 800, size=int(rng.integers(2, 12)))
        sizes[-1] += 4000 - sizes.sum() if sizes.sum() < 4000 else 0
        samples = [{"key": f"{c}_{i}", "label": int(c)} for c, n in enumerate(sizes) for i in range(n)]
        for frac in (0.1, 0.05, 0.013):
            chosen, rest = stratified_subset(samples, frac, trial)
            assert len(chosen) == round(frac * len(samples)) and len(chosen) + len(rest) == len(samples)
            for c, n in enumerate(sizes):
                k = sum(s["label"] == c for s in chosen)
                assert k >= 1 and abs(k - frac * n) < 1
    four_k = [{"key": str(i), "label": i % 3} for i in range(4000)]  # 1,334 / 1,333 / 1,333: 133 x 3 = 399 before
    assert len(stratified_subset(four_k, 0.1, 0)[0]) == 400
    assert stratified_subset(four_k, 0.1, 1)[0] == stratified_subset(four_k, 0.1, 1)[0]
    tiny = [{"key": str(i), "label": i % 5} for i in range(20)]
    assert len(stratified_subset(tiny, 0.01, 0)[0]) == 5  # at least one image per class
