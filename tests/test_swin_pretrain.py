"""A short real Swin BEiT pretraining run (`--arch swin_*`) on the sample photos, then fine-tuning of its
encoder in timm's SwinTransformer on the real digits."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from test_pretrain import assets, run, tiny_cfg  # noqa: F401  (the module-scoped photo shards + k-means fixture)

import beit.pretrain as pretrain
from beit.runtime.run_logging import read_metrics

ARCH = "swin_tiny_patch4_window7_224"
# 32 px, the fixture's k-means has 4 px tokens (8x8 grid); Swin patches of 2 px -> grids 16, 8, 4:
# each token cell is 2x2 Swin patches, the last stage (stride 8) is upsampled x2 to the token grid.
SWIN = dict(arch=ARCH, patch_size=4, swin_patch_size=2, embed_dim=16, swin_depths=[2, 2, 2], swin_heads=[1, 2, 4],
            swin_window_size=4, drop_path=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def swin_run(assets, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("swin") / "pretrain"
    summary = run(tiny_cfg(assets, out, total_steps=4, checkpoint_every=2, log_every=2, **SWIN))
    return out, summary


def test_swin_pretraining_run_outputs(swin_run):
    out, summary = swin_run
    recs = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in recs] == [2, 4] and all(r["tokens"] == 2 * 16 * 26 for r in recs)
    assert summary["step"] == 4 and 0 <= summary["val/mim_acc"] <= 1 and summary["val/tokens"] > 0
    w = load_file(str(out / "pretrained.safetensors"))
    assert w["mask_token"].shape == (1, 1, 1, 16) and w["lm_head.weight"].shape == (32, 32)
    assert "layers.2.blocks.1.attn.qkv.weight" in w and "patch_embed.proj.weight" in w
    meta = json.loads((out / "pretrained.json").read_text())["model"]
    assert meta["arch"] == ARCH and meta["token_grid"] == [8, 8] and meta["depths"] == [2, 2, 2]


def test_swin_resume_refuses_changed_architecture(assets, swin_run):  # noqa: F811
    out, _ = swin_run
    with pytest.raises(pretrain.SetupError, match="swin_depths"):
        run(tiny_cfg(assets, out, total_steps=4, checkpoint_every=2, **{**SWIN, "swin_depths": [2, 2, 4]}))


def test_swin_bad_options_fail_before_compute(assets, tmp_path):  # noqa: F811
    with pytest.raises(pretrain.SetupError, match="not a timm Swin"):
        run(tiny_cfg(assets, tmp_path / "a", **{**SWIN, "arch": "swin_tiny_typo"}))
    with pytest.raises(pretrain.SetupError, match="does not tile"):
        run(tiny_cfg(assets, tmp_path / "b", **{**SWIN, "swin_patch_size": 3}))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_swin_pretraining_fine_tunes_in_timm(swin_run, tmp_path):
    from beit.data.sample_sets import build_sample_shards
    from beit.finetune import FinetuneConfig, run_finetune
    out, _ = swin_run
    digits = tmp_path / "digits"
    build_sample_shards(digits, "digits")
    cfg = FinetuneConfig(train_shards=str(digits / "train-*.tar"), val_shards=str(digits / "test-*.tar"),
                         output_dir=str(tmp_path / "ft"), model=ARCH, image_size=32,
                         init=str(out / "pretrained.safetensors"),
                         epochs=1, batches_per_epoch=2, batch_size=16, num_workers=0, lr=1e-3, warmup_epochs=0.5,
                         auto_augment="", reprob=0.0, mixup=0.0, cutmix=0.0, hflip=0.0, crop_pct=1.0, report_to="none")
    cfg.validate()
    from beit.tasks import build_model
    logs = []
    model = build_model(cfg, 10, log=logs.append)
    pre = load_file(str(out / "pretrained.safetensors"))
    assert "missing (newly initialised): head.fc.bias, head.fc.weight" in logs[0] and "unexpected" not in logs[0]
    for k, v in model.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, pre[k]), k          # every encoder tensor is the pretrained one
    res = run_finetune(cfg)
    assert res["samples"] == 360
    conf = json.loads((tmp_path / "ft" / "model.json").read_text())
    assert conf["model_kwargs"]["depths"] == [2, 2, 2] and conf["model_kwargs"]["patch_size"] == 2
    m = timm.create_model(conf["architecture"], pretrained=False,
                          checkpoint_path=str(tmp_path / "ft" / "model.safetensors"),
                          **conf["model_kwargs"])
    assert m.head.fc.out_features == 10
