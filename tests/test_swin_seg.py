"""Semantic segmentation with a timm Swin backbone: the Swin encoder of a real (short) Swin BEiT pretraining
run loads into the UperNet segmenter with no missing encoder key, fine-tunes on image + seg.png shards,
scores mIoU on every held-out image and exports a model that rebuilds."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_finetune_seg import write_seg_shards
from test_pretrain import assets, run, tiny_cfg  # noqa: F401  (the module-scoped photo shards + k-means fixture)
from test_swin_pretrain import ARCH, SWIN

from beit.export.segmentation import load_seg_model
from beit.finetune import FinetuneConfig, run_finetune
from beit.modeling.segmenter import SegLoss, seg_layer_decay_groups
from beit.modeling.swin_segmenter import SwinSegmenter
from beit.tasks import build_model

SIZES = dict(patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def swin_pretrained(assets, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("swin_seg_pre") / "pretrain"
    run(tiny_cfg(assets, out, total_steps=2, checkpoint_every=2, log_every=2, **SWIN))
    return out / "pretrained.safetensors"


def seg_cfg(root, out, **kw):
    base = dict(task="segmentation", model=ARCH, train_shards=str(root / "train" / "train-*.tar"),
                val_shards=str(root / "val" / "val-*.tar"), num_classes=4, seg_channels=16, epochs=2, batch_size=8,
                batches_per_epoch=3, num_workers=0, lr=2e-3, warmup_epochs=0.5, layer_decay=0.9, report_to="none",
                log_every=1, drop_path=0.0, image_size=32)
    return FinetuneConfig(output_dir=str(out), **{**base, **kw})


def test_swin_segmenter_levels_heads_and_layer_decay():
    m = SwinSegmenter(5, arch=ARCH, img_size=32, channels=16, aux_channels=8, drop_path_rate=0.0, **SIZES)
    x = torch.randn(2, 3, 32, 32)
    main, aux = m.train()(x)
    assert main.shape == aux.shape == (2, 5, 32, 32)
    assert len(m.decode.lateral) == 2 and m.aux.body[0][0].in_channels == 32  # 3 stages; aux on the middle one
    SegLoss()((main, aux), torch.randint(0, 5, (2, 32, 32))).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []  # every parameter used (DDP)
    groups = seg_layer_decay_groups(m, 0.05, 0.5)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in m.parameters())
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(m.named_parameters())
    assert scale[id(named["decode.classify.1.weight"])] == 1.0
    first = named["backbone.layers.0.blocks.0.attn.qkv.weight"]
    last = named["backbone.layers.2.blocks.1.attn.qkv.weight"]
    assert scale[id(named["backbone.patch_embed.proj.weight"])] < scale[id(first)] < scale[id(last)] < 1.0
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd[id(named["backbone.layers.0.blocks.0.attn.relative_position_bias_table"])] == 0.0
    assert wd[id(first)] == 0.05


def test_swin_pretraining_fine_tunes_for_segmentation(swin_pretrained, tmp_path):
    root = write_seg_shards(tmp_path / "seg")
    cfg = seg_cfg(root, tmp_path / "run", init=str(swin_pretrained))
    cfg.validate()
    logs = []
    model = build_model(cfg, 4, log=logs.append)
    assert isinstance(model, SwinSegmenter)
    assert "missing" not in logs[0] and "unexpected" not in logs[0], logs[0]
    pre = load_file(str(swin_pretrained))
    backbone = model.backbone.state_dict()
    assert not [k for k in backbone if k not in pre]           # every encoder tensor comes from the pretraining
    assert all(torch.equal(v, pre[k]) for k, v in backbone.items())
    assert sorted(k for k in pre if k not in backbone) == sorted(
        k for k in pre if k == "mask_token" or k.startswith(("mim_", "lm_head")))  # only the MIM head is left out
    out = tmp_path / "run"
    res = run_finetune(cfg)
    final = json.loads((out / "final.json").read_text())
    assert final["samples"] == 16 and final["bad_samples"] == 0 and 0 <= final["mIoU"] <= 100
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 6 and all(np.isfinite(losses))
    conf = json.loads((out / "model.json").read_text())
    assert conf["architecture"] == "beit.modeling.swin_segmenter.SwinSegmenter"
    assert conf["model_kwargs"]["depths"] == [2, 2, 2] and conf["model_kwargs"]["arch"] == ARCH
    exported = load_seg_model(out / "model.safetensors")
    trained = load_file(str(sorted((out / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))
    assert trained.keys() == exported.state_dict().keys()
    assert all(torch.equal(trained[k], v) for k, v in exported.state_dict().items())
    assert res["mIoU"] == final["mIoU"]


def test_swin_segmentation_errors(swin_pretrained, tmp_path):
    root = tmp_path
    with pytest.raises(ValueError, match="BEiT encoder .* or a timm Swin"):
        seg_cfg(root, tmp_path / "x", model="resnet18", train_shards="a", val_shards="b").validate()
    bad = seg_cfg(root, tmp_path / "y", model="swin_small_patch4_window7_224", init=str(swin_pretrained))
    with pytest.raises(ValueError, match=f"pass --model {ARCH}"):
        build_model(bad, 4)
