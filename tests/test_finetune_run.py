"""End-to-end fine-tuning on the real sample digits shards: metrics, confusion PNG, export, resume,
linear probe with a frozen encoder, timm baseline, config errors."""
import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file

from beit.finetune import FinetuneConfig, main, run_finetune

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)
TINY_CFG = {("image_size" if k == "img_size" else k): v for k, v in TINY.items()}  # the config spells it image_size
FAST = dict(epochs=2, batches_per_epoch=3, batch_size=16, num_workers=0, lr=1e-3, warmup_epochs=0.5,
            auto_augment="rand-m5-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, hflip=0.0,
            report_to="none", log_every=1, crop_pct=1.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Weights in our pretraining format (BeitPretrainModel keys incl. mask_token / lm_head)."""
    from beit.modeling.mim import create_pretrain_model
    m = create_pretrain_model(None, vocab_size=32, **TINY)
    path = tmp_path_factory.mktemp("pre") / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


def cfg(digits, out, **kw):
    shards = dict(train_shards=str(digits / "train-*.tar"), val_shards=str(digits / "test-*.tar"))
    return FinetuneConfig(output_dir=str(out), **{**shards, **TINY_CFG, **FAST, **kw})


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_finetune_end_to_end_and_resume(digits, pretrained, tmp_path):
    out = tmp_path / "run"
    c = cfg(digits, out, init=str(pretrained), model_ema=True, model_ema_decay=0.9, checkpoint_every=3)
    res = run_finetune(c)
    final = json.loads((out / "final.json").read_text())
    assert final["samples"] == 360 and final["bad_samples"] == 0  # every held-out digit, once
    assert final["num_classes"] == 10 and final["class_names"][:2] == ["0", "1"]
    assert 0 <= final["top1"] <= final["top5"] <= 100 and "ema_top1" in final
    cm = json.loads((out / "confusion.json").read_text())
    assert sum(map(sum, cm)) == 360 and abs(100 * sum(cm[i][i] for i in range(10)) / 360 - final["top1"]) < 1e-6
    assert (out / "confusion_matrix.png").stat().st_size > 5000
    recs = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert steps[0]["lr"] < steps[1]["lr"] and steps[-1]["lr"] < steps[2]["lr"]  # warmup, then cosine
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    # export loads in timm with no missing keys and gives the same predictions
    conf = json.loads((out / "model.json").read_text())
    m = timm.create_model(conf["timm_entrypoint"], checkpoint_path=str(out / "model.safetensors"),
                          **conf["model_kwargs"]).eval()
    assert m.head.out_features == 10 and conf["model_kwargs"]["embed_dim"] == 48
    # re-export the EMA weights of the newest checkpoint with the CLI
    from beit.export import load_exported
    from beit.export.commands import export_main
    ema_path = export_main(["--run_dir", str(out), "--out", str(tmp_path / "ema.safetensors"), "--ema"])
    ema_model = load_exported(ema_path)
    assert not torch.equal(ema_model.head.weight, m.head.weight)

    # resume: drop the final checkpoint, run again -> continues from epoch 1 and ends where the
    # uninterrupted run ended (same data order, augmentation, dropout, EMA)
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_0000003", "step_0000006"]
    shutil.rmtree(ckpts[-1])
    res2 = run_finetune(c)
    assert res2["top1"] == res["top1"] and res2["loss"] == pytest.approx(res["loss"], abs=1e-5)
    assert res2["ema_loss"] == pytest.approx(res["ema_loss"], abs=1e-5)
    recs2 = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in recs2 if "loss" in r] == list(range(1, 7))
    assert [r["loss"] for r in recs2 if "loss" in r][3:] == pytest.approx([r["loss"] for r in steps][3:], abs=1e-5)


def test_linear_probe_keeps_encoder_frozen(digits, pretrained, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "probe"
    run_finetune(cfg(digits, out, init=str(pretrained), linear_probe=True, probe_block=1, mixup=0.0,
                     cutmix=0.0, auto_augment="", reprob=0.0, lr=1e-2, epochs=1))
    before = load_file(str(pretrained))
    after = load_file(str(out / "model.safetensors"))
    enc = {k[len("encoder."):]: v for k, v in after.items() if k.startswith("encoder.")}
    assert enc["blocks.1.mlp.fc2.weight"].equal(before["blocks.1.mlp.fc2.weight"])
    assert all(enc[k].equal(before[k]) for k in before if k in enc)
    assert enc["blocks.0.attn.relative_position_bias_table"].equal(before["rel_pos_bias.relative_position_bias_table"])
    assert not after["head.weight"].equal(torch.zeros_like(after["head.weight"]))
    conf = json.loads((out / "model.json").read_text())
    assert conf["linear_probe_block"] == 1


def test_timm_baseline_with_one_flag(digits, tmp_path):
    res = run_finetune(cfg(digits, tmp_path / "vit", model="vit_tiny_patch16_224", patch_size=16,
                           epochs=1, batches_per_epoch=2, mixup=0.0, cutmix=0.0))
    assert res["samples"] == 360


@pytest.mark.parametrize("flags, msg", [
    (["--task", "segmentation"], "segmentation needs --num_classes"),
    (["--task", "classification"], "no training data: pass --data"),
    (["--train_shards", "a", "--val_shards", "b", "--batch_size", "7"], "even --batch_size"),
    (["--train_shards", "a", "--val_shards", "b", "--init", "/nonexistent.pth"], "does not exist"),
    (["--train_shards", "a", "--val_shards", "b", "--linear_probe", "true", "--model", "mobilevit_s"],
     "--linear_probe is for BEiT"),
])
def test_config_errors_before_compute(flags, msg, capsys):
    with pytest.raises(SystemExit):
        main(flags)
    assert msg in capsys.readouterr().err


def test_missing_shards_fail_at_start_up(digits, tmp_path):
    with pytest.raises(ValueError, match="--val_shards: .*matches no files"):
        run_finetune(cfg(digits, tmp_path / "x", val_shards=str(digits / "nope-*.tar")))
    assert not (tmp_path / "x" / "config.yaml").exists()


def test_resume_with_another_micro_batch_keeps_the_global_batch(digits, tmp_path):
    """Resuming with a different micro-batch / process split of the same global batch continues the
    same run (as moving from 8 to 16 GPUs would); a different global batch is refused."""
    out = tmp_path / "run"
    # no per-micro-batch randomness (mixup, drop path); 12 steps per epoch
    same = dict(mixup=0.0, cutmix=0.0, drop_path=0.0, global_batch_size=16, lr=3e-3, batches_per_epoch=12,
                checkpoint_every=12, mixed_precision="no")  # fp32: bf16 ("auto" on AVX-512-BF16) rounds ~100x coarser
    res = run_finetune(cfg(digits, out, **same))
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    shutil.rmtree(ckpts[-1])
    with pytest.raises(ValueError, match="global batch of 16 .*--global_batch_size 16"):
        run_finetune(cfg(digits, out, **{**same, "global_batch_size": 32}))
    with pytest.raises(ValueError, match="planned for 24 optimizer steps"):
        run_finetune(cfg(digits, out, **{**same, "batch_size": 8}))  # 12 micro-batches -> 6 steps per epoch
    with pytest.warns(UserWarning, match="layout changed"):
        res2 = run_finetune(cfg(digits, out, **{**same, "batch_size": 8, "batches_per_epoch": 24}))
    assert res2["samples"] == 360
    # same samples, augmentation and schedule: the held-out loss after 12 more steps matches to ~1e-8
    assert res2["loss"] == pytest.approx(res["loss"], abs=1e-6) and res2["top1"] == res["top1"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == list(range(1, 25))


def test_fsdp_is_refused_at_start_up(digits, tmp_path, monkeypatch):
    from test_pretrain import _pretend_fsdp
    _pretend_fsdp(monkeypatch)
    with pytest.raises(ValueError, match="under FSDP .*fine-tune with DDP"):
        run_finetune(cfg(digits, tmp_path / "x"))
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_bf16_autocast_fine_tune_on_cpu(digits, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    def reset():  # Accelerate keeps one state per process; a new precision needs a fresh one
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    out = tmp_path / "bf16"
    reset()
    try:
        res = run_finetune(cfg(digits, out, mixed_precision="bf16", epochs=1))
    finally:
        reset()
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert res["samples"] == 360 and torch.isfinite(torch.tensor(res["loss"]))
    from safetensors.torch import load_file
    assert all(v.dtype == torch.float32 for v in load_file(str(out / "model.safetensors")).values())
