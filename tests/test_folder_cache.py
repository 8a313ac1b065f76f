"""The ``--data`` folder cache with real processes: a pretraining and a fine-tune reading one folder's
caches at once, refused commands while a run reads (nothing written, the reader's set byte for byte
the same), a newer conversion that keeps the set a run reads, conversions killed midway (SIGTERM,
Ctrl-C, SIGKILL), files that differ only in their extension, and counts/warnings that match what
was written."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_testutil import encode, photo
from PIL import Image

from beit.data.shards import main as shards_main
from beit.data.storage.folder_cache import LOCKS, folder_shards, plan_folder, release
from beit.data.storage.shard_format import iter_tar_samples
from beit.data.storage.shardspec import expand_shards

BEIT = str(Path(sys.executable).parent / "beit")
MODEL = ["--image_size", "32", "--patch_size", "8", "--embed_dim", "32", "--depth", "2", "--num_heads", "2"]


def labelled_folder(root: Path, per_class: int = 12) -> Path:
    """Two class folders of real-looking JPEGs, plus a grey PNG, a small grey PNG (upscaled when read at
    32 px) and a palette GIF in each: the same folder serves pretraining (recursive) and fine-tuning."""
    for c, name in enumerate(("ant", "bee")):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            (d / f"{name}{i:02d}.jpg").write_bytes(encode(photo(100 * c + i, (48, 48)), "JPEG", quality=90))
        (d / "grey.png").write_bytes(encode(photo(50 + c, (40, 40)).convert("L"), "PNG"))
        (d / "small.png").write_bytes(encode(photo(60 + c, (20, 20)).convert("L"), "PNG"))
        (d / "palette.gif").write_bytes(encode(photo(70 + c, (40, 40)).convert("P"), "GIF"))
    return root


def sets(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else []


def digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder`` (the lock files left out)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and LOCKS not in p.parts}


def held(cache: Path, directory: Path) -> bool:
    """Whether some process holds the set's lock (a reader's shared lock or a writer's exclusive one)."""
    path = cache / LOCKS / f"{directory.name}.lock"
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def kmeans_tokenizer(folder: Path, out: Path) -> str:
    from beit.tokenizers.kmeans import KMeansTokenizer

    imgs = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((32, 32)), np.float32) / 255)
            .permute(2, 0, 1) for p in sorted(folder.rglob("*.jpg"))]
    tok = KMeansTokenizer.fit([torch.stack(imgs)], epochs=1, seed=0, init_patches=len(imgs) * 16, progress=False,
                              vocab_size=16, patch_size=8, input_size=32)
    tok.save(out)
    return str(out)


def start(args: list[str], cache: Path, cwd: Path, one_core: bool = False) -> subprocess.Popen:
    env = dict(os.environ, BEIT_CACHE=str(cache), OMP_NUM_THREADS="1")
    pin = (lambda: os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})) if one_core else None
    return subprocess.Popen([BEIT, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=pin)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def wait_until(cond, what: str, procs=(), timeout: float = 300) -> None:
    end = time.time() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"exited before {what}:\n{p.communicate()[0][-4000:]}"
        assert time.time() < end, f"timed out waiting until {what}"
        time.sleep(0.02)


def pretrain_args(data: Path, tok: str, out: str, epochs: int) -> list[str]:
    return ["pretrain", "--data", str(data), "--tokenizer_path", tok, "--output_dir", out, *MODEL, "--epochs",
            str(epochs), "--batch_size", "8", "--report_to", "none", "--mixed_precision", "no",
            "--auto_recipe", "false"]


def finetune_args(data: Path, out: str, epochs: int) -> list[str]:
    return ["finetune", "--data", str(data), "--output_dir", out, *MODEL, "--epochs", str(epochs), "--batch_size",
            "8", "--auto_augment", "", "--mixup", "0", "--cutmix", "0", "--report_to", "none",
            "--mixed_precision", "no", "--auto_recipe", "false"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pretraining_and_finetuning_read_one_folder_at_once(tmp_path):
    """Both stages convert the same folder (their own settings, their own sets), hold them at the same time and
    read every sample; before this cache, the second conversion deleted the set the first run was reading."""
    data, cache = labelled_folder(tmp_path / "shared"), tmp_path / "cache"
    tok = kmeans_tokenizer(data, tmp_path / "tok")
    pre = start(pretrain_args(data, tok, "pre", epochs=30), cache, tmp_path, one_core=True)
    ft = start(finetune_args(data, "ft", epochs=25), cache, tmp_path)
    both = lambda: len(sets(cache)) == 2 and all(held(cache, d) for d in sets(cache))  # noqa: E731
    wait_until(both, "both runs hold their sets", (pre, ft))
    out_pre, out_ft = finish(pre), finish(ft)
    kinds = sorted(d.name.split("-")[2] for d in sets(cache))
    assert kinds == ["images", "labelled"], sets(cache)  # pretraining's and fine-tuning's sets side by side

    pm = json.loads((tmp_path / "pre" / "final_metrics.json").read_text())
    assert pm["data/bad"] == 0 and pm["data/samples"] == pm["step"] * 8  # every batch full of readable samples
    images = 2 * 15
    assert f"--data {data}: {images} images, " in out_pre
    records = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "data/samples" in r][-1]
    assert last["data/bad"] == 0 and last["data/samples"] > 0
    final = json.loads((tmp_path / "ft" / "final.json").read_text())
    assert final["samples"] == 6  # 20% of each class of 15 held out: 3 + 3
    # item 5: what reading changed is on screen at the end; item 7: workers fit the cores, no library warnings
    assert "data: of " in out_pre and "upscaled" in out_pre and "converted to RGB (" in out_pre
    assert "from L" in out_pre and "from P" in out_pre
    assert "data loader: 1 worker process(es) per process (--num_workers -1: min(4, 1 CPU core(s)" in out_pre
    for out in (out_pre, out_ft):
        assert "Warning" not in out and "DataLoader will create" not in out, out[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_refused_commands_and_newer_conversions_leave_a_reading_run_alone(tmp_path):
    """While a fine-tune reads its set (stopped with SIGSTOP mid-run, so it certainly is), a pretraining refused
    for its grid and a fine-tune refused for its class count write nothing; a conversion of the changed folder
    with the reader's settings writes a new set and keeps the read one byte for byte; the reader then finishes."""
    data, cache = labelled_folder(tmp_path / "shared"), tmp_path / "cache"
    tok = kmeans_tokenizer(data, tmp_path / "tok")
    ft = start(finetune_args(data, "ft", epochs=10), cache, tmp_path)
    wait_until(lambda: len(sets(cache)) == 1 and held(cache, sets(cache)[0]), "the fine-tune holds its set", [ft])
    os.kill(ft.pid, signal.SIGSTOP)
    try:
        reading = sets(cache)[0]
        before = digest(cache)
        refused = [pretrain_args(data, tok, "pre_bad", epochs=1) + ["--image_size", "48"],  # grid 6x6 vs tokens 4x4
                   finetune_args(data, "ft_bad", epochs=1) + ["--num_classes", "5"]]         # 2 class folders
        for args, why in zip(refused, ("grid", "--num_classes 5")):
            r = subprocess.run([BEIT, *args], cwd=tmp_path, env=dict(os.environ, BEIT_CACHE=str(cache)),
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 2 and why in r.stderr, r.stdout + r.stderr
            assert digest(cache) == before and sets(cache) == [reading]  # nothing written, nothing removed
            assert not (tmp_path / args[args.index("--output_dir") + 1] / "config.yaml").exists()
        time.sleep(0.01)
        (data / "bee" / "new.jpg").write_bytes(encode(photo(999, (48, 48)), "JPEG"))
        said = []
        newer = folder_shards(data, labelled=True, val_fraction=0.2, seed=0, cache=cache, log=said.append)
        assert not newer.reused and newer.directory != reading and newer.images == 31
        assert any(f"kept the older cache {reading}" in m for m in said)
        assert {k: v for k, v in digest(cache).items() if k.startswith(reading.name)} == before
        release()
    finally:
        os.kill(ft.pid, signal.SIGCONT)
    finish(ft)
    records = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if "data/samples" in r][-1]["data/bad"] == 0
    assert json.loads((tmp_path / "ft" / "final.json").read_text())["samples"] == 6
    # the reader has exited: the next look-up of the newer set removes the older one it owned
    assert folder_shards(data, labelled=True, val_fraction=0.2, seed=0, cache=cache, log=print).reused
    assert sets(cache) == [newer.directory] and not reading.exists()
    release()


SLOW_CONVERSION = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal (a background job ignores it)
import beit.data.storage.shard_writer as w
encode = w.encode_item
w.encode_item = lambda *a: (time.sleep(0.05), encode(*a))[1]  # 40 images: about 2 s of conversion
from beit.data.storage.folder_cache import folder_shards
found = folder_shards(sys.argv[1], labelled=False, cache=sys.argv[2], log=lambda m: None)
print("reused" if found.reused else "wrote", found.directory, found.images, flush=True)
time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0)  # hold the set a while
"""


def slow_folder(root: Path, n: int = 40) -> Path:
    root.mkdir()
    for i in range(n):
        (root / f"img{i:02d}.jpg").write_bytes(encode(photo(i, (40, 40)), "JPEG"))
    return root


def test_processes_started_together_write_once_and_share(tmp_path):
    """torchrun ranks (or two commands) asking for the same set at once: one writes, the others wait and reuse."""
    data, cache = slow_folder(tmp_path / "imgs"), tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", SLOW_CONVERSION, str(data), str(cache)], stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o[0] for o in outs) == ["reused", "reused", "wrote"] and len({o[1] for o in outs}) == 1
    assert {o[2] for o in outs} == {"40"}
    assert [p.name for p in cache.iterdir() if p.name != LOCKS] == [Path(outs[0][1]).name]  # no temporary folder


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_a_conversion_killed_midway_leaves_nothing_and_the_next_one_converts(tmp_path, sig):
    data, cache = slow_folder(tmp_path / "imgs"), tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERSION, str(data), str(cache)])
    tmp_shard = lambda: any(cache.glob(".*.tmp*/train-000000.tar")) if cache.is_dir() else False  # noqa: E731
    wait_until(tmp_shard, "the first shard is written", [proc], timeout=120)
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    assert rc == -sig  # SIGTERM and Ctrl-C: cleaned up, then died of the signal all the same
    left = sorted(p.name for p in cache.rglob("*"))
    if sig == signal.SIGKILL:  # nothing can clean up after SIGKILL: its temporary folder waits for the next run
        assert len(sets(cache)) == 0 and any(".tmp" in n for n in left)
    else:
        assert left == [LOCKS] or left == [], left  # no set, no temporary folder, no lock file
    found = folder_shards(data, labelled=False, cache=cache, log=lambda m: None)
    assert found.images == 40 and not found.reused
    keys = {s["__key__"] for p in expand_shards(found.train) for s in iter_tar_samples(open(p, "rb"))}
    assert len(keys) == 40
    assert [p.name for p in cache.iterdir() if p.name != LOCKS] == [found.directory.name]  # the stray tmp is gone
    release()


def test_same_stem_different_files_are_all_used_with_one_key_rule(tmp_path, capsys):
    src, cache = tmp_path / "pics", tmp_path / "cache"
    src.mkdir()
    rocket = photo(3, (50, 40))
    for fmt, ext in (("JPEG", "jpg"), ("BMP", "bmp"), ("WEBP", "webp")):
        (src / f"rocket.{ext}").write_bytes(encode(rocket, fmt))
    (src / "broken.jpg").write_bytes(b"not an image")
    said = []
    found = folder_shards(src, labelled=False, cache=cache, log=said.append)
    keys = sorted(s["__key__"] for p in expand_shards(found.train) for s in iter_tar_samples(open(p, "rb")))
    assert keys == ["rocket_bmp", "rocket_jpg", "rocket_webp"]
    # the counts are the written ones; the warning names the real file and a manifest that exists after the run
    assert found.images == 3 and found.skipped == (str(src / "broken.jpg"),)
    assert "3 images (1 unreadable file(s) left out" in found.describe()
    warning = [m for m in said if m.startswith("warning:")]
    assert len(warning) == 1 and str(src / "broken.jpg") in warning[0]
    assert str(found.directory / "manifest.json") in warning[0] and (found.directory / "manifest.json").is_file()
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]
    release()
    # `beit shards write` uses the same keys and prints what it wrote
    assert shards_main(["write", "--source", str(src), "--out", str(tmp_path / "out"), "--progress", "false"]) == 0
    out = capsys.readouterr().out
    assert "3 image(s) as" in out and "(1 unreadable input(s) skipped" in out and str(src / "broken.jpg") in out
    written = sorted(s["__key__"] for p in sorted((tmp_path / "out").glob("train-*.tar"))
                     for s in iter_tar_samples(open(p, "rb")))
    assert written == keys


def test_colliding_keys_name_the_files_and_create_nothing(tmp_path, capsys):
    src, cache, out = tmp_path / "pics", tmp_path / "cache", tmp_path / "out"
    src.mkdir()
    for name in ("a.b.jpg", "a_b.jpg"):  # both become the key 'a_b_jpg'
        (src / name).write_bytes(encode(photo(1), "JPEG"))
    with pytest.raises(ValueError, match="a_b_jpg") as e:
        plan_folder(src, labelled=False, cache=cache)
    assert str(src / "a.b.jpg") in str(e.value) and str(src / "a_b.jpg") in str(e.value)
    with pytest.raises(ValueError, match="rename one file"):
        folder_shards(src, labelled=False, cache=cache)
    assert not cache.exists() or not list(cache.iterdir())
    assert shards_main(["write", "--source", str(src), "--out", str(out), "--progress", "false"]) == 2
    assert str(src / "a.b.jpg") in capsys.readouterr().err and not out.exists()
