"""Small-image pretraining speed (the ``beit compare`` recipe on the bundled 32 px digits), where the
per-sample loading costs as much as the model: figures for docs/performance.md.

    python beit/bench/small_data.py              # ~1 minute on one core
    python beit/bench/small_data.py --steps 600

Prints, with the CPU's capability: the shard tar reader against Python's ``tarfile`` stream reader (the
peer, same samples, same process) and a real ``beit pretrain`` run of the compare recipe (images/s and
the fraction of its time spent waiting for data, which is the loader's share with ``num_workers: 0``).
Compare commits by running it in two checkouts on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


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


def main(argv: list[str] | None = None) -> int:
    import torch

    from beit.compare import recipe
    from beit.compare.stages import fit_tokenizer, pretrain
    from beit.data.sample_sets import build_sample_shards
    from beit.data.storage.shard_format import iter_tar_samples
    from beit.runtime.precision import cpu_capability, cpu_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="pretraining steps of 64 images")
    p.add_argument("--out", default="", help="work folder (default: a temporary one)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_small_"))
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
                   {"total_steps": args.steps}, None, 0, "")
    wall = time.perf_counter() - t
    metrics = [json.loads(line) for line in (work / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    waits = [m["data_wait_fraction"] for m in metrics if "data_wait_fraction" in m]
    fig["pretrain"] = {"steps": args.steps, "img_per_s": round(args.steps * 64 / res.get("train_seconds", wall), 1),
                       "data_wait_fraction": round(waits[-1], 3) if waits else None}
    print(json.dumps(fig, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    from beit.cli import call
    sys.exit(call(main))
