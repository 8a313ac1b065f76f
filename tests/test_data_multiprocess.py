"""REAL 2-process run (torchrun, gloo on CPU), 2 loader workers per rank: exactly-once per epoch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from data_testutil import good_shards


def test_two_processes_two_workers_exactly_once(tmp_path):
    good_shards(tmp_path / "shards", n_shards=8, per_shard=6)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    worker = Path(__file__).with_name("mp_data_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(tmp_path / "shards"), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["world"] for x in res] == [2, 2]
    assert res[0]["len"] == res[1]["len"] == 8
    everything = sorted(f"s{i:05d}" for i in range(48))
    for e in range(2):
        k0, k1 = res[0]["epochs"][e]["keys"], res[1]["epochs"][e]["keys"]
        assert res[0]["epochs"][e]["batches"] == res[1]["epochs"][e]["batches"] == 8
        assert sorted(k0 + k1) == everything  # every sample exactly once across ranks and workers
    assert res[0]["epochs"][0]["keys"] != res[0]["epochs"][1]["keys"]  # reshuffled per epoch
    assert all(x["stats"] == {"samples": 48, "bad": 0} for x in res)
