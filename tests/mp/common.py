"""Shared pieces of the multi-process tests: tiny real assets (built once per session), launching
the entry points under torchrun (gloo on CPU) or as one plain process, and reading the results.

Real multi-process runs use ``ACCELERATE_USE_CPU=1 python -m torch.distributed.run --nproc_per_node N``
(``accelerate launch --cpu --num_processes N`` starts only one process). Every rank's stdout and
stderr go to their own files (torchrun ``--log-dir``/``--redirects 3``) so tests can check who printed.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "beit" / "pretrain.py"
FINETUNE = REPO / "beit" / "finetune.py"
BAD_KEYS = ("bad_bytes_0", "bad_bytes_1")


@functools.lru_cache(maxsize=None)
def assets() -> dict[str, str]:
    """Photo shards (+ one shard with 2 undecodable samples), digit shards, a fitted k-means tokenizer."""
    from beit.data.sample_sets import build_sample_shards
    from beit.data.storage.shard_format import add_member, iter_tar_samples
    from beit.tokenizers.images import shard_image_batches
    from beit.tokenizers.kmeans import KMeansTokenizer

    root = Path(tempfile.mkdtemp(prefix="beit_mp_"))
    atexit.register(shutil.rmtree, root, True)
    build_sample_shards(root / "photos", "photos")
    build_sample_shards(root / "digits", "digits")
    flawed = root / "photos" / "flawed-000000.tar"     # real crops of shard 13, two of them corrupted
    with open(root / "photos" / "train-000013.tar", "rb") as f, tarfile.open(flawed, "w") as out:
        for i, s in enumerate(iter_tar_samples(f)):
            key = BAD_KEYS[i // 7] if i in (3, 10) else s["__key__"]
            data = b"\xff\xd8 truncated jpeg" if key in BAD_KEYS else s["jpg"]
            add_member(out, f"{key}.jpg", data)
    train = str(root / "photos" / "train-{000000..000002}.tar")
    tok = KMeansTokenizer.fit(lambda: shard_image_batches(train, size=32, batch_size=64, max_images=192),
                              epochs=1, seed=0, init_patches=3000, progress=False,
                              vocab_size=32, patch_size=4, input_size=32)
    tok.save(root / "kmeans")
    return {"root": str(root), "photos": train, "flawed": str(flawed), "tok": str(root / "kmeans"),
            "photos_val": str(root / "photos" / "val-{000000..000002}.tar"),
            "digits_train": str(root / "digits" / "train-*.tar"), "digits_test": str(root / "digits" / "test-*.tar")}


# fp32 on every machine: the equivalence tolerances are for fp32 summation order; "auto" would pick bf16
# autocast on CPUs with AVX-512-BF16 / AMX, whose rounding is about 100x coarser.
FP32 = "no"


def pretrain_args(out: Path, **over) -> list[str]:
    """A tiny global-order pretraining run: global batch 16, drop path 0 (its RNG is per rank)."""
    a = assets()
    cfg = dict(train_shards=f"{a['photos']},{a['flawed']}", val_shards=a["photos_val"], tokenizer="kmeans",
               tokenizer_path=a["tok"],
               image_size=32, patch_size=4, model_size="tiny", embed_dim=32, depth=2, num_heads=2, drop_path=0,
               total_steps=48, warmup_steps=4, lr=2e-3, min_lr=1e-4, num_workers=0, checkpoint_every=8,
               keep_last=2, log_every=1, report_to="none", shuffle_buffer=32, data_order="global",
               global_batch_size=16, batch_size=8, max_bad_fraction=0.05, seed=0, output_dir=str(out),
               mixed_precision=FP32)
    cfg.update(over)
    return [x for k, v in cfg.items() for x in (f"--{k}", str(v))]


def finetune_args(out: Path, batch_size: int, **over) -> list[str]:
    """A tiny global-order fine-tune from scratch: no mixup/cutmix (per-batch, per-rank draws) and
    drop path 0; RandAugment and random erasing stay on (seeded per sample); activation checkpointing
    on (under DDP too)."""
    a = assets()
    cfg = dict(train_shards=a["digits_train"], val_shards=a["digits_test"], image_size=32, patch_size=8, embed_dim=32,
               depth=2, num_heads=2, epochs=1, batches_per_epoch=8, batch_size=batch_size, global_batch_size=16,
               num_workers=0, mixup=0, cutmix=0, drop_path=0, report_to="none", log_every=1, data_order="global",
               grad_checkpointing=True,
               warmup_epochs=0.25, auto_augment="rand-m5-mstd0.5-inc1", reprob=0.25, hflip=0.0, crop_pct=1.0,
               seed=0, output_dir=str(out), mixed_precision=FP32)
    cfg.update(over)
    return [x for k, v in cfg.items() for x in (f"--{k}", str(v))]


def command(script: Path, args: list[str], nproc: int, log_dir: Path | None = None) -> list[str]:
    """torchrun (``nproc`` > 1) or a plain single process."""
    if nproc == 1:
        return [sys.executable, str(script), *args]
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            *logs, str(script), *args]


def env(nproc: int) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # the test process's own W&B service
    return dict(inherited, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1" if nproc > 1 else "2",
                PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")


def popen(script: Path, args: list[str], nproc: int, log_dir: Path) -> subprocess.Popen:
    """Start the job in its own process group (``kill_job`` ends launcher and workers together)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "launcher.log", "ab") as out:
        return subprocess.Popen(command(script, args, nproc, log_dir), cwd=REPO, env=env(nproc), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_job(p: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker it started (cleanup after a failed test)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def rank_logs(log_dir: Path, rank: int) -> str:
    """Everything rank ``rank`` printed (stdout + stderr of every torchrun attempt)."""
    parts = sorted(log_dir.glob(f"**/attempt_*/{rank}/std*.log"))
    return "".join(p.read_text(errors="replace") for p in parts)


def all_logs(log_dir: Path) -> str:
    text = (log_dir / "launcher.log").read_text(errors="replace") if (log_dir / "launcher.log").exists() else ""
    for r in range(4):
        text += f"\n----- rank {r} -----\n" + rank_logs(log_dir, r)[-4000:]
    return text


def run(script: Path, args: list[str], nproc: int, log_dir: Path, timeout: float = 300) -> str:
    """Run to completion; fail the test with the logs on a non-zero exit. Returns the launcher log."""
    p = popen(script, args, nproc, log_dir)
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(p)
        raise AssertionError(f"{script.name} x{nproc} did not finish in {timeout}s:\n{all_logs(log_dir)}")
    assert rc == 0, f"{script.name} x{nproc} exited with {rc}:\n{all_logs(log_dir)}"
    return (log_dir / "launcher.log").read_text(errors="replace")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_records(out: Path, key: str = "loss") -> dict[int, dict]:
    """step -> record for the records that carry ``key``; fails on a step logged twice."""
    recs = [r for r in metrics(out) if key in r]
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step was logged more than once (two writers?): {steps}"
    return {r["step"]: r for r in recs}


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first), whatever session or process group it runs in."""
    out = []
    for child in children(pid):
        out += [child, *descendants(child)]
    return out


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the worker processes torchrun started (read from their RANK env var)."""
    found = {}
    for pid in children(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in environ:
            if kv.startswith(b"RANK="):
                found[int(kv[5:])] = pid
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@functools.lru_cache(maxsize=None)
def pretrain_reference(nproc: int) -> tuple[Path, Path, str]:
    """An uninterrupted ``pretrain_args`` run on ``nproc`` processes: (output_dir, log_dir, launcher log)."""
    root = Path(assets()["root"]) / f"pretrain_x{nproc}"
    out, logs = root / "run", root / "logs"
    text = run(PRETRAIN, pretrain_args(out), nproc, logs)
    return out, logs, text
