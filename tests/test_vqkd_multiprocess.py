"""VQ-KD on 2 processes (torchrun, gloo, CPU) vs 1 process: with ``data_order global`` every step sees the same
16 images, the k-means start and the EMA codebook updates are summed over the processes and the restarts
are drawn from the gathered codes, so the loss, codebook usage and restarts follow the 1-process run;
only rank 0 writes, and the held-out images are split over the ranks."""
import json

import pytest
from vqkd_testutil import run_process, timm_teacher, tiny_vqkd

from beit.runtime.run_logging import read_metrics


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    from beit.data.sample_sets import build_sample_shards
    build_sample_shards(tmp_path / "photos", "photos")
    shards = {"train": str(tmp_path / "photos" / "train-{000000..000013}.tar"),
              "val": str(tmp_path / "photos" / "val-{000000..000002}.tar")}
    teacher = timm_teacher(tmp_path / "teacher")
    runs = {}
    for n in (1, 2):
        cfg = tiny_vqkd(shards, teacher, tmp_path / f"x{n}", data_order="global", batch_size=16 // n,
                        global_batch_size=16, total_steps=8, checkpoint_every=4, eval_every=4)
        text = run_process(cfg, nproc=n)
        runs[n] = {r["step"]: r for r in read_metrics(tmp_path / f"x{n}") if "rec_loss" in r}
        assert text.count("finished: 8 steps") == 1  # rank 0 only
    one, two = runs[1], runs[2]
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for s in one:
        assert two[s]["loss"] == pytest.approx(one[s]["loss"], rel=1e-4), s
        assert two[s]["codebook_usage"] == pytest.approx(one[s]["codebook_usage"], abs=2 / 64), s
        assert two[s]["data/samples"] == one[s]["data/samples"] == 16 * s
    assert two[8]["codes_restarted_total"] > 0
    assert abs(two[8]["codes_restarted_total"] - one[8]["codes_restarted_total"]) <= 2
    f1, f2 = (json.loads((tmp_path / f"x{n}" / "final_metrics.json").read_text()) for n in (1, 2))
    assert f1["val/images"] == f2["val/images"] == 222  # every held-out image once, split over the ranks
    assert f2["val/codebook_usage"] == pytest.approx(f1["val/codebook_usage"], abs=3 / 64)
    ckpt = tmp_path / "x2" / "checkpoints" / "step_0000008"
    assert {"rank_0.json", "rank_1.json", "COMPLETE", "model.safetensors"} <= {p.name for p in ckpt.iterdir()}
