"""End-to-end pretraining on the real sample photo shards with a fitted k-means tokenizer."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

import beit.pretrain as pretrain
from beit.checkpoints.checkpointing import find_latest_complete, list_complete
from beit.data.sample_sets import build_sample_shards
from beit.engines.pretrain import NonFiniteLossError
from beit.runtime.run_logging import RunLogger, read_metrics
from beit.tokenizers.images import shard_image_batches
from beit.tokenizers.kmeans import KMeansTokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_assets")
    build_sample_shards(root / "photos", "photos")
    train = str(root / "photos" / "train-{000000..000013}.tar")
    tok = KMeansTokenizer.fit(lambda: shard_image_batches(train, size=32, batch_size=64, max_images=384),
                              epochs=1, seed=0, init_patches=4000, progress=False,
                              vocab_size=32, patch_size=4, input_size=32)
    tok.save(root / "kmeans")
    return {"train": train, "val": str(root / "photos" / "val-{000000..000002}.tar"), "tok": str(root / "kmeans")}


def tiny_cfg(assets, out, **kw) -> dict:
    cfg = dict(train_shards=[assets["train"]], val_shards=[assets["val"]], tokenizer="kmeans",
               tokenizer_path=assets["tok"], image_size=32, patch_size=4, model_size="tiny", embed_dim=32,
               depth=2, num_heads=2, drop_path=0.1, batch_size=16, total_steps=6, warmup_steps=2, lr=2e-3,
               min_lr=1e-4, crop_scale_min=0.3, num_workers=0, checkpoint_every=3, keep_last=2, log_every=1,
               report_to="none", eval_batches=2, seed=0, output_dir=str(out), shuffle_buffer=64)
    cfg.update(kw)
    return cfg


def run(cfg: dict) -> dict:
    """One in-process run with a fresh Accelerate state (as a new process would have)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return pretrain.main([], cfg=pretrain.PretrainConfig(**cfg))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def crash_after_step(monkeypatch, at: int, cfg: dict) -> None:
    """Run ``cfg`` and let it die (KeyboardInterrupt) right after logging step ``at``."""
    real_log = RunLogger.log

    def crash(self, metrics, step):
        real_log(self, metrics, step)
        if step == at:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(RunLogger, "log", crash)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(RunLogger, "log", real_log)


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def test_end_to_end_outputs(assets, tmp_path):
    out = tmp_path / "run"
    summary = run(tiny_cfg(assets, out, report_to="tensorboard", num_workers=2, grad_accum_steps=2, log_every=2,
                           eval_batches=0, eval_batch_size=10))
    recs = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in recs] == [2, 4, 6]
    for r in recs:
        assert 0 <= r["mim_acc"] <= 1 and 0 < r["majority_acc"] <= 1 and math.isfinite(r["loss"])
        assert r["data/samples"] > 0 and r["data/bad"] == 0 and r["lr"] > 0
    assert recs[-1]["lr"] == pytest.approx(1e-4)                  # cosine reached min_lr at the last step
    assert recs[0]["tokens"] == 2 * 16 * 2 * round(0.4 * 64)      # 2 steps x 2 micro-batches x 16 images
    assert [s for s, _ in list_complete(out)] == [3, 6]
    assert (out / "config.yaml").is_file() and yaml.safe_load((out / "config.yaml").read_text())["embed_dim"] == 32
    assert list((out / "tensorboard").rglob("events.out.tfevents*")), "no TensorBoard event file"
    weights = load_file(str(out / "pretrained.safetensors"))
    for k in ("cls_token", "mask_token", "lm_head.weight", "patch_embed.proj.weight",
              "rel_pos_bias.relative_position_bias_table", "blocks.1.attn.qkv.weight", "blocks.0.gamma_1",
              "norm.weight"):
        assert k in weights, k
    assert weights["lm_head.weight"].shape == (32, 32)
    meta = json.loads((out / "pretrained.json").read_text())
    assert meta["model"]["embed_dim"] == 32 and meta["tokenizer"] == "kmeans" and meta["step"] == 6
    final = json.loads((out / "final_metrics.json").read_text())
    assert final == json.loads(json.dumps(summary))
    assert final["step"] == 6 and final["val/tokens"] > 0
    assert 0 <= final["val/mim_acc"] <= 1 and 0 < final["val/majority_acc"] <= 1
    # every held-out image is scored once (partial last batch included)
    from beit.data.storage.shardspec import expand_shards, shard_sample_counts
    n_val = sum(shard_sample_counts(expand_shards(assets["val"])))
    assert final["val/images"] == n_val and final["val/bad_images"] == 0
    assert final["val/tokens"] == n_val * pretrain.PretrainConfig(**tiny_cfg(assets, out)).masked_count()


def test_same_config_same_numbers_and_exact_resume(assets, tmp_path, monkeypatch):
    # 3 batches per epoch: the checkpoint at step 3 falls exactly on an epoch boundary
    a = losses(run(tiny_cfg(assets, tmp_path / "a", batches_per_epoch=3))["output_dir"])
    b = losses(run(tiny_cfg(assets, tmp_path / "b", batches_per_epoch=3))["output_dir"])
    assert list(a) == [1, 2, 3, 4, 5, 6] and a == b
    c = losses(run(tiny_cfg(assets, tmp_path / "c", batches_per_epoch=3, seed=1))["output_dir"])
    assert c != a

    # crash after step 5 (the checkpoint is at 3), then rerun: steps 4.. must repeat exactly
    crash_after_step(monkeypatch, 5, tiny_cfg(assets, tmp_path / "d", batches_per_epoch=3))
    assert find_latest_complete(tmp_path / "d").name == "step_0000003"
    summary = run(tiny_cfg(assets, tmp_path / "d", batches_per_epoch=3))
    assert summary["epoch"] == 1
    d = losses(tmp_path / "d")
    assert list(d) == [1, 2, 3, 4, 5, 6]                          # truncated at 3, then continued once
    assert d == pytest.approx(a, rel=1e-6, abs=1e-7)


def test_epoch_end_checkpoint_with_another_loader_layout_moves_on(assets, tmp_path, monkeypatch):
    """A checkpoint right at an epoch's end, resumed with another loader layout (num_workers 0 -> 2): the
    finished epoch is not replayed, the run goes on in the next epoch (it replayed epoch 0 before)."""
    cfg = tiny_cfg(assets, tmp_path / "e", batches_per_epoch=3, memory_cache_mb=0)  # the stream's loader state
    crash_after_step(monkeypatch, 4, cfg)  # the checkpoint is at step 3, the end of epoch 0
    with pytest.warns(UserWarning, match="epoch 0 was complete; epoch 1 starts"):
        summary = run({**cfg, "num_workers": 2})
    assert summary["epoch"] == 1 and summary["step"] == 6  # the bug ran steps 4-6 on epoch 0 again (epoch 0)
    assert list(losses(tmp_path / "e")) == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_changed_model(assets, tmp_path):
    run(tiny_cfg(assets, tmp_path / "r", total_steps=3))
    with pytest.raises(ValueError, match=r"embed_dim: saved 32, now 64"):
        run(tiny_cfg(assets, tmp_path / "r", total_steps=6, embed_dim=64, num_heads=2))
    other = KMeansTokenizer.fit(lambda: shard_image_batches(assets["train"], size=32, batch_size=64, max_images=128),
                                epochs=1, seed=1, init_patches=2000, progress=False,
                                vocab_size=32, patch_size=4, input_size=32)
    other.save(tmp_path / "other_kmeans")
    with pytest.raises(ValueError, match="tokenizer at .* has other weights"):
        run(tiny_cfg(assets, tmp_path / "r", total_steps=6, tokenizer_path=str(tmp_path / "other_kmeans")))


def test_bad_inputs_fail_before_compute(assets, tmp_path):
    with pytest.raises(ValueError, match=r"token grid .* patch grid is 4x4"):
        run(tiny_cfg(assets, tmp_path / "x", image_size=32, patch_size=8))
    with pytest.raises(ValueError, match="nothing|no such|not exist|match"):
        run(tiny_cfg(assets, tmp_path / "x", train_shards=[str(tmp_path / "missing-{000..003}.tar")]))
    with pytest.raises(ValueError, match="global_batch_size 50 is not divisible"):
        run(tiny_cfg(assets, tmp_path / "x", global_batch_size=50))
    assert not (tmp_path / "x").exists()


def _pretend_fsdp(monkeypatch):
    """Make ``accelerate.Accelerator`` report FSDP (no GPU here to run real FSDP)."""
    import accelerate
    from accelerate.utils import DistributedType

    class FsdpAccelerator(accelerate.Accelerator):
        @property
        def distributed_type(self):
            return DistributedType.FSDP
    monkeypatch.setattr(accelerate, "Accelerator", FsdpAccelerator)


def test_fsdp_with_held_out_evaluation_is_refused_at_start_up(assets, tmp_path, monkeypatch):
    _pretend_fsdp(monkeypatch)
    with pytest.raises(pretrain.SetupError, match="under FSDP holds only this rank's shard.*leave --val_shards empty"):
        run(tiny_cfg(assets, tmp_path / "x"))
    assert not (tmp_path / "x").exists()  # nothing written, nothing computed
    from accelerate.utils import DistributedType

    from beit.runtime.scaling import refuse_under_fsdp
    for ok in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.DEEPSPEED):
        refuse_under_fsdp(ok, "x", "y")


def test_nonfinite_loss_skips_the_step_then_aborts(assets, tmp_path, monkeypatch):
    from beit.modeling.mim import BeitPretrainModel

    real_forward = BeitPretrainModel.forward
    calls = {"n": 0, "bad": {3}, "bad_grad": {4}}

    def forward(self, images, mask):
        calls["n"] += 1
        logits = real_forward(self, images, mask)
        if self.training and calls["n"] in calls["bad_grad"]:      # finite loss, nan gradients
            logits.register_hook(lambda g: g * float("nan"))
        return logits * float("nan") if self.training and calls["n"] in calls["bad"] else logits

    monkeypatch.setattr(BeitPretrainModel, "forward", forward)
    out = tmp_path / "nan"
    summary = run(tiny_cfg(assets, out, total_steps=5, eval_batches=1))
    assert summary["nonfinite_steps"] == 2 and summary["step"] == 5
    recs = {r["step"]: r for r in read_metrics(out) if "nonfinite_steps" in r}
    assert [recs[s]["nonfinite_steps"] for s in (2, 3, 4, 5)] == [0, 1, 2, 2]
    assert "loss" not in recs[3]                                   # nothing from the skipped step is averaged in
    assert math.isnan(float(recs[4]["grad_norm"])) and math.isfinite(recs[5]["grad_norm"])
    w = load_file(str(out / "pretrained.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())

    calls.update(n=0, bad=set(range(4, 100)), bad_grad=set())
    with pytest.raises(NonFiniteLossError, match="non-finite for 3 consecutive optimizer steps"):
        run(tiny_cfg(assets, tmp_path / "nan2", total_steps=20, max_nonfinite_steps=3))
    # the checkpoint written at step 3 (before the bad steps) is intact
    ck = find_latest_complete(tmp_path / "nan2")
    assert ck.name == "step_0000003"
    assert all(torch.isfinite(v).all() for v in load_file(str(ck / "model.safetensors")).values())


def test_sigkill_and_rerun_resumes(assets, tmp_path):
    out = tmp_path / "killed"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_cfg(assets, out, total_steps=40, checkpoint_every=4, keep_last=3,
                                                num_workers=1, eval_batches=1)))
    cmd = [sys.executable, "-m", "beit.pretrain", "--config", str(cfg_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while find_latest_complete(out) is None:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)                        # the run and its data worker
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    resume_step = int(find_latest_complete(out).name.split("_")[1])
    assert 4 <= resume_step < 40
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{resume_step:07d}'} at step {resume_step}" in done.stdout
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(1, 41))                             # metrics.jsonl continues, no gaps or repeats
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["step"] == 40 and final["train_seconds"] > 0        # training time summed over both runs
    assert [s for s, _ in list_complete(out)] == [32, 36, 40]


def test_bf16_autocast_training_on_cpu(assets, tmp_path):
    """A real bf16 run (autocast on the CPU): finite losses, fp32 master weights saved, eval in bf16."""
    out = tmp_path / "bf16"
    summary = run(tiny_cfg(assets, out, mixed_precision="bf16", total_steps=6, lr=3e-3))
    recs = [r for r in read_metrics(out) if "loss" in r]
    assert len(recs) == 6 and all(math.isfinite(r["loss"]) for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert summary["val/tokens"] > 0 and 0 <= summary["val/mim_acc"] <= 1
    weights = load_file(str(out / "pretrained.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert yaml.safe_load((out / "config.yaml").read_text())["mixed_precision"] == "bf16"
