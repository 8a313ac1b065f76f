"""Backbones, fine-tune tasks and lr schedules are registered, not branched on: a plain timm ViT added as one
module + one registration pretrains and fine-tunes end to end; unknown names fail with the choices; a schedule
registered in one place is an option at once; the old option names still work, with a warning."""
import json

import pytest
import torch
from safetensors.torch import load_file

from beit.config import parse_config
from beit.data.sample_sets import build_sample_shards
from beit.modeling.backbones import backbone_for
from beit.options.finetune import FinetuneConfig
from beit.options.pretrain import PretrainConfig
from beit.tokenizers.images import shard_image_batches
from beit.tokenizers.kmeans import KMeansTokenizer

VIT = "vit_tiny_patch16_224"
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit_assets")
    build_sample_shards(root / "photos", "photos")
    train = str(root / "photos" / "train-*.tar")
    tok = KMeansTokenizer.fit(lambda: shard_image_batches(train, size=32, batch_size=64, max_images=256),
                              epochs=1, seed=0, init_patches=2000, progress=False,
                              vocab_size=16, patch_size=4, input_size=32)
    tok.save(root / "kmeans")
    return {"train": train, "tok": str(root / "kmeans")}


def test_a_plain_timm_vit_pretrains_and_fine_tunes(photos, digits, tmp_path):
    from beit.tasks import build_model
    from beit.training.finetuning import run_finetuning
    from beit.training.pretraining import run_pretraining

    out = tmp_path / "pre"
    summary = run_pretraining(PretrainConfig(
        arch=VIT, train_shards=[photos["train"]], tokenizer="kmeans", tokenizer_path=photos["tok"], image_size=32,
        patch_size=4, embed_dim=32, depth=2, num_heads=2, batch_size=8, total_steps=4, warmup_steps=1,
        num_workers=0, checkpoint_every=2, report_to="none", log_every=1, shuffle_buffer=16, mixed_precision="no",
        output_dir=str(out)))
    assert summary["step"] == 4 and summary["nonfinite_steps"] == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    pre = load_file(str(out / "pretrained.safetensors"))
    assert pre["mask_token"].shape == (1, 1, 32) and pre["lm_head.weight"].shape == (16, 32)
    meta = json.loads((out / "pretrained.json").read_text())["model"]
    assert meta["arch"] == VIT and meta["token_grid"] == [8, 8] and meta["depth"] == 2

    cfg = FinetuneConfig(model=VIT, init=str(out / "pretrained.safetensors"), train_shards=str(digits / "train-*.tar"),
                         val_shards=str(digits / "test-*.tar"), image_size=32, epochs=1, batches_per_epoch=2,
                         batch_size=16, num_workers=0, warmup_epochs=0.5, auto_augment="", reprob=0.0, mixup=0.0,
                         cutmix=0.0, hflip=0.0, crop_pct=1.0, report_to="none", output_dir=str(tmp_path / "ft"))
    cfg.validate()
    logs = []
    model = build_model(cfg, 10, log=logs.append)
    assert "missing (newly initialised): head.bias, head.weight" in logs[0] and "unexpected" not in logs[0]
    for k, v in model.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, pre[f"encoder.{k}"]), k          # every encoder tensor is the pretrained one
    res = run_finetuning(cfg)
    assert 0 <= res["top1"] <= 100 and res["samples"] == 360
    from beit.export import load_exported
    exported = load_exported(tmp_path / "ft" / "model.safetensors")
    assert isinstance(exported, torch.nn.Module) and exported.head.out_features == 10


def test_backbones_are_looked_up_by_name():
    assert backbone_for("beit").pretrains and backbone_for("beit").linear_probe
    assert backbone_for("swin_tiny_patch4_window7_224").segments
    assert backbone_for(VIT).pretrains and not backbone_for(VIT).segments
    assert not backbone_for("mobilevit_xxs").pretrains  # any other timm model fine-tunes only
    with pytest.raises(ValueError, match="not a timm Vision Transformer"):
        backbone_for("vit_typo")
    with pytest.raises(ValueError, match="no BEiT pretraining for it"):
        backbone_for("mobilevit_xxs", pretraining=True)
    with pytest.raises(ValueError, match="unknown timm model"):
        backbone_for("no_such_model")
    with pytest.raises(ValueError, match="--compile compiles the blocks of the beit and timm ViT"):
        PretrainConfig(train_shards="x", arch="swin_tiny_patch4_window7_224", compile=True).validate()
    with pytest.raises(ValueError, match="--linear_probe is for BEiT encoders"):
        FinetuneConfig(train_shards="x", model=VIT, linear_probe=True).validate()


def test_tasks_are_looked_up_by_name():
    from beit.tasks import TASKS, get_task
    assert TASKS == ("classification", "segmentation", "distill")
    assert get_task("segmentation").labelled_folders is False and get_task("classification").labelled_folders
    with pytest.raises(SystemExit):
        parse_config(FinetuneConfig, ["--train_shards", "x", "--task", "segmentatoin"])
    with pytest.raises(ValueError, match="is not one of"):
        FinetuneConfig(train_shards="x", task="nope").validate()


def test_a_registered_lr_schedule_is_an_option(monkeypatch):
    from beit.optim import schedules

    class Constant(schedules.WarmupCosineSchedule):
        def lr_at(self, step: int) -> float:
            return self.lr

    monkeypatch.setitem(schedules.SCHEDULES, "constant", Constant)
    cfg = parse_config(PretrainConfig, ["--train_shards", "x", "--lr_schedule", "constant"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = schedules.create_schedule(cfg.lr_schedule, opt, lr=0.01, min_lr=0.0, total_steps=10)
    assert [sched.step()[0] for _ in range(3)] == [0.01] * 3
    monkeypatch.delitem(schedules.SCHEDULES, "constant")
    with pytest.raises(SystemExit):
        parse_config(PretrainConfig, ["--train_shards", "x", "--lr_schedule", "constant"])


@pytest.mark.parametrize("module, cls, argv, field, value", [
    ("beit.options.pretrain", "PretrainConfig", ["--data_shards", "a-{0..1}.tar"], "train_shards", ["a-{0..1}.tar"]),
    ("beit.tokenizers.fitting", "KMeansTrainConfig", ["--shards", "a.tar"], "train_shards", ["a.tar"]),
    ("beit.tokenizers.cache", "TokenCacheConfig", ["--shards", "a.tar"], "train_shards", ["a.tar"]),
    ("beit.tokenizers.report", "ReportConfig", ["--shards", "v.tar"], "val_shards", ["v.tar"]),
    ("beit.options.finetune", "FinetuneConfig", ["--train_shards", "a.tar", "--img_size", "64"], "image_size", 64),
])
def test_old_option_names_still_work_with_a_warning(module, cls, argv, field, value, capsys):
    import importlib
    cfg = parse_config(getattr(importlib.import_module(module), cls), argv)
    assert getattr(cfg, field) == value
    old = argv[-2].lstrip("-")
    assert f"option {old} is deprecated, use {field}" in capsys.readouterr().err


def test_train_shards_is_one_list_option_everywhere():
    cfg = parse_config(FinetuneConfig, ["--train_shards", "a.tar", "b-{0..3}.tar", "--val_shards", "v.tar"])
    assert cfg.train_shards == ["a.tar", "b-{0..3}.tar"] and cfg.val_shards == ["v.tar"]
    assert FinetuneConfig(train_shards="a.tar").train_shards == ["a.tar"]  # one spec from Python
    with pytest.raises(SystemExit):
        parse_config(PretrainConfig, ["--data_shards", "a.tar", "--train_shards", "b.tar"])  # they disagree
