"""Faults across processes: SIGKILL one rank of a 2-process pretraining run -> the job ends within
a bounded time; the same command resumes every rank from the last COMPLETE checkpoint and the
step count and losses continue exactly as in an uninterrupted run (the data position, RNG states,
optimizer and schedule are restored). A hung rank (no exit) ends the job via dist_timeout_s."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from mp.common import (
    PRETRAIN,
    REPO,
    alive,
    all_logs,
    env,
    kill_job,
    popen,
    pretrain_args,
    pretrain_reference,
    rank_logs,
    rank_pids,
    run,
    step_records,
)

from beit.checkpoints.checkpointing import find_latest_complete, list_complete

EXIT_BOUND_S = 60


def test_killed_rank_ends_job_and_restart_resumes(tmp_path):
    ref_out, _, _ = pretrain_reference(2)
    out, logs = tmp_path / "run", tmp_path / "logs"
    args = pretrain_args(out)
    p = popen(PRETRAIN, args, 2, logs)
    try:
        first = out / "checkpoints" / "step_0000008" / "COMPLETE"
        deadline = time.time() + 240
        while not first.exists():
            assert p.poll() is None, f"run ended before its first checkpoint:\n{all_logs(logs)}"
            assert time.time() < deadline, f"no checkpoint after 240 s:\n{all_logs(logs)}"
            time.sleep(0.05)
        pids = rank_pids(p.pid)
        assert sorted(pids) == [0, 1], f"torchrun workers not found: {pids}"
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.time()
        rc = p.wait(timeout=EXIT_BOUND_S)
        took = time.time() - t0
    finally:
        if p.poll() is None:
            kill_job(p)
    assert rc != 0 and took < EXIT_BOUND_S
    assert not alive(pids[0]), "rank 0 survived its peer's death"
    latest = find_latest_complete(out)
    step = int(latest.name.split("_")[1])
    assert 8 <= step < 48, f"the run finished before the kill (latest checkpoint {latest}); lengthen it"
    leftovers = [d.name for d in (out / "checkpoints").iterdir() if not (d / "COMPLETE").exists()]
    print(f"rank 1 killed after step {step}; job exited in {took:.1f}s; incomplete folders: {leftovers}")

    run(PRETRAIN, args, 2, logs)                               # the same command again
    assert f"resumed from {latest} at step {step}" in rank_logs(logs, 0)
    ref, got = step_records(ref_out), step_records(out)
    assert sorted(got) == list(range(1, 49))                  # every step exactly once, none lost or repeated
    for s in range(1, 49):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-4), f"step {s}"
        assert got[s]["data/samples"] == ref[s]["data/samples"]
    assert find_latest_complete(out).name == "step_0000048"
    for _, ck in list_complete(out):                          # complete == every rank wrote its part
        assert {f.name for f in ck.glob("rank_*.json")} == {"rank_0.json", "rank_1.json"}


def test_hung_rank_fails_the_job_after_dist_timeout(tmp_path):
    """Rank 1 stops answering without exiting; rank 0's next collective times out after 5 s."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "mp" / "hang_worker.py"), "5"]
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=REPO, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        text, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            kill_job(p)
    took = time.time() - t0
    assert p.returncode != 0 and took < EXIT_BOUND_S, text[-3000:]
    m = re.search(r"rank 0: collective failed after ([\d.]+)s", text)
    assert m, text[-3000:]
    assert 4.0 <= float(m.group(1)) < 30, text[-3000:]
