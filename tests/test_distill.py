"""Distillation of a fine-tuned BEiT classifier into MobileViT on the real digits (labelled + unlabelled)."""
import json
import shutil

import pytest
import timm
import torch
import torch.nn.functional as F

from beit.finetune import FinetuneConfig, run_finetune
from beit.modeling.distill import DistillLoss, load_teacher

FAST = dict(num_workers=0, lr=1e-3, warmup_epochs=0.5, auto_augment="", reprob=0.0, mixup=0.0, cutmix=0.0,
            hflip=0.0, crop_pct=1.0, report_to="none", log_every=1, image_size=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def teacher(digits, tmp_path_factory):
    """A BEiT classifier fine-tuned (briefly, for real) on the digits: the teacher's export."""
    out = tmp_path_factory.mktemp("teacher")
    run_finetune(FinetuneConfig(train_shards=str(digits / "train-*.tar"), val_shards=str(digits / "test-*.tar"),
                                output_dir=str(out), patch_size=8, embed_dim=48, depth=2, num_heads=2, epochs=1,
                                batches_per_epoch=3, batch_size=16, **FAST))
    return out / "model.safetensors"


def distill_cfg(digits, teacher_path, out, **kw):
    base = dict(task="distill", model="mobilevit_xxs", teacher=str(teacher_path),
                train_shards=str(digits / "train-*.tar"),
                val_shards=str(digits / "test-*.tar"), unlabelled_shards=str(digits / "train-*.tar"),
                epochs=2, batches_per_epoch=2, batch_size=8, unlabelled_batch_size=6, model_ema=True,
                model_ema_decay=0.9, drop_path=0.0, checkpoint_every=2, output_dir=str(out), **FAST)
    return FinetuneConfig(**{**base, **kw})


def test_distill_loss_matches_its_definition():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.tensor([0, 3, -1, 4, -1, -1])
    T, a = 3.0, 0.3
    soft = (F.softmax(t / T, -1) * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    hard = F.cross_entropy(s[y >= 0], y[y >= 0])
    assert torch.allclose(DistillLoss(T, a)(s, y, t), a * hard + (1 - a) * soft, atol=1e-6)
    assert torch.allclose(DistillLoss(T, 1.0)(s, y, t), hard)                       # unlabelled rows: soft only
    assert torch.allclose(DistillLoss(T, a)(s, torch.full((6,), -1), t), (1 - a) * soft)
    assert DistillLoss(T, a)(t, y, t) > 0 and DistillLoss(T, 0.0)(t, y, t).abs() < 1e-6  # student == teacher


@pytest.mark.slow
def test_distill_mobilevit_run_export_and_exact_resume(digits, teacher, tmp_path):
    out = tmp_path / "run"
    c = distill_cfg(digits, teacher, out)
    c.validate()
    res = run_finetune(c)
    assert res["samples"] == 360 and "ema_top1" in res
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if "data/unlabelled/samples" in r]
    assert epochs and epochs[-1]["data/unlabelled/samples"] >= 2 * 2 * 6                  # 2 epochs x 2 batches x 6
    conf = json.loads((out / "model.json").read_text())
    assert conf["architecture"] == "mobilevit_xxs"
    m = timm.create_model(conf["architecture"], checkpoint_path=str(out / "model.safetensors"), **conf["model_kwargs"])
    assert m.head.fc.out_features == 10
    # resume from the first epoch's checkpoint: the same final numbers (labelled + unlabelled streams, EMA)
    steps = [r for r in recs if "loss" in r and "epoch" in r and "step" in r and "lr" in r]
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert len(ckpts) == 2
    shutil.rmtree(ckpts[-1])
    res2 = run_finetune(c)
    assert res2["top1"] == res["top1"] and res2["loss"] == pytest.approx(res["loss"], abs=1e-5)
    assert res2["ema_loss"] == pytest.approx(res["ema_loss"], abs=1e-5)
    recs2 = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps2 = [r for r in recs2 if "loss" in r and "epoch" in r and "step" in r and "lr" in r]
    assert [r["loss"] for r in steps2][-2:] == pytest.approx([r["loss"] for r in steps][-2:], abs=1e-5)


def test_teacher_must_fit_the_student(digits, teacher):
    with pytest.raises(ValueError, match="predicts 10 classes, the student 7"):
        load_teacher(teacher, num_classes=7, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="--mean"):
        load_teacher(teacher, num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.229, 0.224, 0.225))
    t = load_teacher(teacher, num_classes=10, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    t.train()
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert t(torch.randn(2, 3, 48, 48)).shape == (2, 10)                                    # resized to its 32 px


@pytest.mark.parametrize("kw, msg", [
    (dict(model="beit"), "timm student"),
    (dict(teacher=""), "needs --teacher"),
    (dict(mixup=0.8), "not mixup/cutmix"),
    (dict(distill_alpha=1.5), "distill_alpha"),
])
def test_distill_config_errors(digits, teacher, tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        distill_cfg(digits, teacher, tmp_path / "x", **kw).validate()


def test_beit_distill_command_needs_unlabelled_shards(digits, teacher, tmp_path, capsys):
    from beit.cli import main
    rc = main(["distill", "--model", "mobilevit_xxs", "--teacher", str(teacher), "--train_shards",
               str(digits / "train-*.tar"), "--val_shards", str(digits / "test-*.tar"), "--mixup", "0", "--cutmix", "0",
               "--output_dir", str(tmp_path / "d")])
    assert rc == 2 and "--unlabelled_shards" in capsys.readouterr().err
