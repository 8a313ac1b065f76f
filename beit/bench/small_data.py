"""Small-image pretraining speed (the ``beit compare`` recipe on the bundled 32 px digits), where the
per-sample loading costs as much as the model: figures for docs/performance.md.

    beit bench --sections small_data                        # ~1 minute on one core
    beit bench --sections small_data --small_data_steps 600

Prints, with the CPU's capability: the shard tar reader against Python's ``tarfile`` stream reader (the
peer, same samples, same process) and a real ``beit pretrain`` run of the compare recipe (images/s and
the fraction of its time spent waiting for data, which is the loader's share with ``num_workers: 0``).
Compare commits by running it in two checkouts on an otherwise idle machine.
"""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path


def tarfile_samples(data: bytes) -> int:
    """The peer: Python's tarfile in stream mode, members grouped by key as the shard reader does."""
    from beit.data.storage.shard_format import split_member_name
    keys = set()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as t:
        for m in t:
            if m.isfile():
                keys.add(split_member_name(m.name)[0])
                t.extractfile(m).read()
    return len(keys)


def best_of(fn, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run(steps: int = 300, work_dir: str = "") -> dict:
    """The tar reader beside Python's tarfile, and a ``steps``-step pretraining run of the compare recipe."""
    import torch

    from beit.compare import recipe
    from beit.compare.stages import fit_tokenizer, pretrain
    from beit.data.sample_sets import build_sample_shards
    from beit.data.storage.shard_format import iter_tar_samples
    from beit.runtime.precision import cpu_capability, cpu_model

    torch.set_num_threads(1)
    work = Path(work_dir or tempfile.mkdtemp(prefix="bench_small_"))
    build_sample_shards(work / "digits", "digits")
    shards = sorted((work / "digits").glob("train-*.tar"))
    blobs = [s.read_bytes() for s in shards]
    n = sum(sum(1 for _ in iter_tar_samples(io.BytesIO(b))) for b in blobs)
    ours = best_of(lambda: [sum(1 for _ in iter_tar_samples(io.BytesIO(b))) for b in blobs])
    peer = best_of(lambda: [tarfile_samples(b) for b in blobs])
    fig = {"cpu": cpu_model(), "capability": cpu_capability(), "torch": torch.__version__,
           "tar_read_us_per_sample": {"ours": round(ours / n * 1e6, 1), "tarfile": round(peer / n * 1e6, 1),
                                      "ratio": round(peer / ours, 2)}}
    model = dict(recipe.MODEL)
    tok = fit_tokenizer(str(work / "digits" / "train-*.tar"), work / "tokenizer", 0, model, {})

    shutil.rmtree(work / "pretrain", ignore_errors=True)  # a fresh run, never a cached stage
    t = time.perf_counter()
    res = pretrain(str(work / "digits" / "train-*.tar"), "kmeans", tok["path"], work / "pretrain", 0, model,
                   {"total_steps": steps}, None, 0, "")
    wall = time.perf_counter() - t
    metrics = [json.loads(line) for line in (work / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    waits = [m["data_wait_fraction"] for m in metrics if "data_wait_fraction" in m]
    fig["pretrain"] = {"steps": steps, "img_per_s": round(steps * 64 / res.get("train_seconds", wall), 1),
                       "data_wait_fraction": round(waits[-1], 3) if waits else None}
    return fig
