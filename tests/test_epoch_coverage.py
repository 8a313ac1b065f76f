"""No image is silently left out of an epoch, on 1 and on 2 real processes (torchrun, gloo), with a
data size that is not a multiple of the batch, uneven shards, workers and gradient accumulation;
every rank runs the same number of optimizer steps (a DDP model would hang otherwise)."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_testutil import jpeg

from beit.data.storage.shard_writer import Item, WriteOptions, write_shards

WORKER = Path(__file__).with_name("mp_epoch_worker.py")
N_IMAGES = 37  # not a multiple of any batch below


def uneven_shards(root: Path) -> str:
    """37 real JPEGs in shards of 9, 3, 7, 5, 11 and 2 images."""
    sizes, items, i = (9, 3, 7, 5, 11, 2), [], 0
    for s, n in enumerate(sizes):
        part = [Item(key=f"img{i + j:03d}", image=jpeg(i + j), ext="jpg") for j in range(n)]
        write_shards(part, root, prefix=f"train{s}", opts=WriteOptions(max_samples=n, validate="none"),
                     source=f"test{s}", overwrite=True, progress=False)
        items += part
        i += n
    assert len(items) == N_IMAGES
    return str(root / "train*-*.tar")


def run(spec: str, out: Path, procs: int, batch: int, accum: int, workers: int, *extra: str) -> list[dict]:
    out.mkdir()
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    args = [str(WORKER), spec, str(out), str(batch), str(accum), str(workers), *extra]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] + args
           if procs > 1 else [sys.executable] + args)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(procs)]


@pytest.mark.parametrize("procs,batch,accum,workers", [(1, 5, 2, 8), (2, 3, 2, 2)])
def test_every_image_seen_every_epoch(tmp_path, procs, batch, accum, workers):
    spec = uneven_shards(tmp_path / "shards")
    res = run(spec, tmp_path / "out", procs, batch, accum, workers)
    everything = {f"img{i:03d}" for i in range(N_IMAGES)}
    assert len({r["len"] for r in res}) == 1 and res[0]["len"] % accum == 0
    for e in range(2):
        steps = [r["epochs"][e]["optimizer_steps"] for r in res]
        assert len(set(steps)) == 1 and steps[0] == res[0]["len"] // accum  # same step count on every rank
        seen = collections.Counter(k for r in res for k in r["epochs"][e]["keys"])
        assert set(seen) == everything, f"left out: {sorted(everything - set(seen))}"
        slots = res[0]["len"] * batch * procs
        assert sum(seen.values()) == slots and slots >= N_IMAGES
        if procs == 2:  # disjoint shards: a repeat stays on the rank that owns the image
            assert not set(res[0]["epochs"][e]["keys"]) & set(res[1]["epochs"][e]["keys"])
    desc = res[0]["describe"]
    assert f"{N_IMAGES} images" in desc and "every image once" in desc
    assert (f"{slots - N_IMAGES} repeat" in desc) == (slots > N_IMAGES)
    if workers == 8:  # 6 shards allow 6 workers on 1 process, and the log says so
        assert res[0]["notes"] and "clamped from 8 to 6" in res[0]["notes"][0]
    else:  # 6 shards allow 2 workers on each of 2 processes
        assert not res[0]["notes"]


def test_memory_cache_every_image_once_on_two_processes(tmp_path):
    """The memory cache's loader on 2 real processes: every image once an epoch, the same step count on both
    (a DDP model would hang otherwise), the repeats only fill the last global batch."""
    spec = uneven_shards(tmp_path / "shards")
    res = run(spec, tmp_path / "out", 2, 3, 2, 0, "memory")
    everything = {f"img{i:03d}" for i in range(N_IMAGES)}
    assert res[0]["len"] == res[1]["len"] == 8  # ceil(37 / (2 x 3)) = 7, rounded up to the accumulation
    for e in range(2):
        assert res[0]["epochs"][e]["optimizer_steps"] == res[1]["epochs"][e]["optimizer_steps"] == 4
        seen = collections.Counter(k for r in res for k in r["epochs"][e]["keys"])
        assert set(seen) == everything and sum(seen.values()) == 8 * 3 * 2
    assert "37 images" in res[0]["describe"] and "every image once, 11 repeat(s)" in res[0]["describe"]
