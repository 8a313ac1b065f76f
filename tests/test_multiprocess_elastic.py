"""Elastic exactly-once resume with ``--data_order global``, on real processes (torchrun, gloo, CPU) with the
project's real checkpoints: checkpointed on N processes mid-epoch, resumed on M (2 -> 1, 1 -> 2, 2 -> 3), every
sample of the epoch is trained on exactly once and the global batches are those of the uninterrupted run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from data_testutil import good_shards
from mp.common import PRETRAIN, pretrain_args, pretrain_reference, run, step_records

from beit.data.loading.global_order import build_global_order_loader

WORKER = Path(__file__).parent / "mp" / "elastic_worker.py"
GLOBAL_BATCH, N_IMAGES, FIRST_STEPS = 6, 36, 2          # 6 steps per epoch; checkpoint after 2


def uninterrupted(spec: str) -> list[list[str]]:
    """The keys of every global batch of epoch 0 (one process, the same loader settings)."""
    ld = build_global_order_loader(spec, map_fn=lambda img, s: {"x": 0}, batch_size=GLOBAL_BATCH,
                                   num_workers=0, seed=3, shuffle_buffer=7)
    return [sorted(b["__key__"]) for b in ld]


def steps_of(out: Path, phase: str, procs: int) -> tuple[list[list[str]], list[str]]:
    """(sorted keys of each global step over all ranks, rank 0's warnings)."""
    ranks = [json.loads((out / f"{phase}_rank{r}.json").read_text()) for r in range(procs)]
    assert len({len(r["keys"]) for r in ranks}) == 1, "ranks ran different step counts"
    return [sorted(k for r in ranks for k in r["keys"][i]) for i in range(len(ranks[0]["keys"]))], ranks[0]["warnings"]


@pytest.mark.slow
def test_elastic_resume_every_sample_once(tmp_path):
    root = tmp_path / "shards"
    good_shards(root, 4, N_IMAGES // 4)
    spec = str(root / "train-{000000..000003}.tar")
    full = uninterrupted(spec)
    assert len(full) == N_IMAGES // GLOBAL_BATCH
    for before, afters in ((2, (1, 3)), (1, (2,))):
        first = tmp_path / f"x{before}"
        first.mkdir()
        run(WORKER, [spec, str(first), "first", str(GLOBAL_BATCH), str(FIRST_STEPS), "0"], before,
            tmp_path / f"l{before}")
        head, _ = steps_of(first, "first", before)
        assert head == full[:FIRST_STEPS]
        for after in afters:
            out = tmp_path / f"x{before}to{after}"
            shutil.copytree(first, out)
            run(WORKER, [spec, str(out), "resume", str(GLOBAL_BATCH), "0", "2"], after, tmp_path / f"l{before}{after}")
            tail, said = steps_of(out, "resume", after)
            assert head + tail == full, f"{before} -> {after}: not the uninterrupted run's batches"
            seen = [k for step in head + tail for k in step]
            assert len(seen) == len(set(seen)) == N_IMAGES, f"{before} -> {after}: a sample repeated or skipped"
            assert any(f"written by {before} process(es), this run has {after}" in w and "re-partitioned" in w
                       for w in said), said


@pytest.mark.slow
def test_pretraining_checkpointed_on_two_processes_resumes_on_one(tmp_path):
    """The real entry point: the 2-process global-order run (tests/mp/common.py), stopped after its checkpoint at
    step 40 (mid-epoch: 21 steps an epoch), resumed on 1 process, trains steps 41-48 on the uninterrupted
    run's batches: its losses match the 1-process reference (a restarted epoch would not)."""
    ref1, _, _ = pretrain_reference(1)
    ref2, _, _ = pretrain_reference(2)
    out = tmp_path / "run"
    shutil.copytree(ref2, out)
    shutil.rmtree(out / "checkpoints" / "step_0000048")
    text = run(PRETRAIN, pretrain_args(out), 1, tmp_path / "logs")
    assert "resumed from" in text and "step_0000040" in text
    assert "written by 2 process(es), this run has 1: epoch 1 goes on from sample 304" in text   # 19 steps x 16
    one, resumed = step_records(ref1), step_records(out)
    assert sorted(resumed) == list(range(1, 49))
    for s in range(41, 49):
        assert resumed[s]["loss"] == pytest.approx(one[s]["loss"], rel=1e-4), f"step {s}"
        assert resumed[s]["data/samples"] == one[s]["data/samples"] == 16 * s    # counts carried over
