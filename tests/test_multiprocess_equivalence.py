"""2 processes (torchrun, gloo, CPU) vs 1 process: same seed, global batch and data -> the same
loss curve, for pretraining and fine-tuning (with gradient accumulation on 1 process); metrics are
reduced over ranks and written by rank 0 only.

Both runs use ``data_order: global`` (same samples per global batch and the same per-sample
augmentation/mask for any process count) and drop path 0 (its RNG is per rank). Tolerance: losses
agree to rtol 1e-4 (observed ~1e-7: only the summation order of the gradient all-reduce differs).
"""
import json
import math

import pytest
from mp.common import BAD_KEYS, FINETUNE, assets, finetune_args, pretrain_reference, rank_logs, run, step_records

from beit.data.storage.shardspec import expand_shards, shard_sample_counts

RTOL = 1e-4


def test_pretrain_two_processes_match_one():
    out1, logs1, text1 = pretrain_reference(1)
    out2, logs2, _ = pretrain_reference(2)
    one, two = step_records(out1), step_records(out2)
    assert sorted(one) == sorted(two) == list(range(1, 49))
    for s in one:
        a, b = one[s], two[s]
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), f"step {s}"
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)
        assert b["tokens"] == a["tokens"] == 16 * 26           # 16 images x round(0.4 * 64) masked each
        assert abs(b["mim_acc"] - a["mim_acc"]) <= 1e-3
        assert abs(b["majority_acc"] - a["majority_acc"]) <= 1e-9
        # data counts are summed over the ranks before logging: 16 slots per optimizer step in total
        assert b["data/samples"] == a["data/samples"] == 16 * s
        assert b["data/bad"] == a["data/bad"]
    assert two[48]["data/bad"] >= len(BAD_KEYS)                # the corrupt samples were counted, once each
    assert two[48]["loss"] < two[1]["loss"] - 0.1               # and it learns
    # the held-out evaluation scores every held-out image once, split over the ranks
    f1, f2 = (json.loads((o / "final_metrics.json").read_text()) for o in (out1, out2))
    n_val = sum(shard_sample_counts(expand_shards(assets()["photos_val"])))
    assert f1["val/images"] == f2["val/images"] == n_val and f1["val/bad_images"] == f2["val/bad_images"] == 0
    assert f1["val/tokens"] == f2["val/tokens"] == n_val * 26
    assert abs(f1["val/mim_acc"] - f2["val/mim_acc"]) <= 1e-3
    # the effective batch and lr are printed at start-up; global batch kept by gradient accumulation
    assert "effective batch 16 = 8 x 2 accum x 1 proc; lr 0.002 (not rescaled)" in text1
    rank0, rank1 = rank_logs(logs2, 0), rank_logs(logs2, 1)
    assert "effective batch 16 = 8 x 1 accum x 2 proc; lr 0.002 (not rescaled)" in rank0
    # only rank 0 prints, shows progress and writes the shared checkpoint files
    assert "pretrain:" in rank0 and "checkpoint saved" in rank0
    assert "effective batch" not in rank1 and "pretrain:" not in rank1 and "checkpoint saved" not in rank1
    ckpt = out2 / "checkpoints" / "step_0000048"
    assert {p.name for p in ckpt.iterdir()} >= {"COMPLETE", "train_state.json", "rank_0.json", "rank_1.json",
                                                "random_states_0.pkl", "random_states_1.pkl", "model.safetensors"}


def test_finetune_two_processes_match_one(tmp_path):
    assets()
    out1, out2 = tmp_path / "x1", tmp_path / "x2"
    # 1 process accumulates 2 micro-batches of 8 (16 micro-batches = 8 steps); 2 processes take 8 each
    text1 = run(FINETUNE, finetune_args(out1, batch_size=8, batches_per_epoch=16), 1, tmp_path / "logs1")
    run(FINETUNE, finetune_args(out2, batch_size=8), 2, tmp_path / "logs2")
    one, two = step_records(out1), step_records(out2)
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for s in one:
        assert two[s]["loss"] == pytest.approx(one[s]["loss"], rel=RTOL), f"step {s}"
        assert two[s]["lr"] == pytest.approx(one[s]["lr"], rel=1e-9)
    final1, final2 = step_records(out1, "val_top1"), step_records(out2, "val_top1")
    assert final1[8]["val_top1"] == pytest.approx(final2[8]["val_top1"], abs=1e-6)
    assert final1[8]["val_samples"] == final2[8]["val_samples"] == 360   # every held-out digit once
    assert "effective batch 16 = 8 per process x 2 accumulation x 1 process(es); lr 0.004 (not rescaled; " \
           "global batch kept by gradient accumulation)" in text1
    rank0, rank1 = rank_logs(tmp_path / "logs2", 0), rank_logs(tmp_path / "logs2", 1)
    assert "effective batch 16 = 8 per process x 1 accumulation x 2 process" in rank0
    assert "effective batch" not in rank1 and "finetune:" not in rank1


def test_segmentation_on_two_processes(tmp_path):
    """DDP with BatchNorm heads: every parameter gets a gradient (no DDP error), the ranks split the
    held-out images and the mIoU is over all of them."""
    from test_finetune_seg import write_seg_shards
    root = write_seg_shards(tmp_path / "seg")
    out = tmp_path / "run"
    args = ["--task", "segmentation", "--train_shards", str(root / "train" / "train-*.tar"),
            "--val_shards", str(root / "val" / "val-*.tar"), "--num_classes", "4", "--seg_channels", "16",
            "--image_size", "32", "--patch_size", "8", "--embed_dim", "32", "--depth", "4", "--num_heads", "2",
            "--epochs", "1", "--warmup_epochs", "0.5", "--batches_per_epoch", "4", "--batch_size", "4", "--num_workers",
            "0",
            "--report_to", "none", "--log_every", "1", "--output_dir", str(out)]
    run(FINETUNE, args, 2, tmp_path / "logs")
    steps = step_records(out)
    assert sorted(steps) == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in steps.values())
    final = json.loads((out / "final.json").read_text())
    assert final["samples"] == 16 and final["bad_samples"] == 0 and 0 <= final["mIoU"] <= 100
    assert "finetune:" not in rank_logs(tmp_path / "logs", 1)
