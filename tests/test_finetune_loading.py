"""Checkpoint loading for fine-tuning: every format built here in that format, rel-pos equivalence,
resizing, clear errors, layer-decay groups."""
import argparse

import pytest
import torch
from safetensors.torch import save_file
from timm.models.beit import Beit

from beit.checkpoints.loading import CheckpointMismatchError, load_beit_weights, read_state_dict
from beit.checkpoints.safe_pickle import UntrustedPickleError
from beit.modeling.classifier import build_beit_classifier, layer_decay_param_groups
from beit.optim import WarmupCosineSchedule

DIMS = dict(patch_size=8, embed_dim=48, depth=2, num_heads=2)


def shared_table_model(img_size=32, **kw):
    """A reference-style encoder: ONE relative position table shared by all blocks, random values."""
    m = Beit(img_size=img_size, num_classes=0, use_abs_pos_emb=False, use_rel_pos_bias=False,
             use_shared_rel_pos_bias=True, init_values=0.1, global_pool="avg", **{**DIMS, **kw})
    with torch.no_grad():
        m.rel_pos_bias.relative_position_bias_table.normal_(0, 1.0)
        m.fc_norm.weight.normal_(1, 0.1)
    return m.eval()


def reference_pretrain_state_dict(model):
    """Our pretraining / unilm pretraining layout: shared table + mask_token + lm_head + norm."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc_norm")}
    d = sd["cls_token"].shape[-1]
    sd["mask_token"] = torch.randn(1, 1, d)
    sd["norm.weight"], sd["norm.bias"] = torch.ones(d), torch.zeros(d)
    sd["lm_head.weight"], sd["lm_head.bias"] = torch.randn(64, d), torch.zeros(64)
    return sd


def finetune_model(img_size=32, **kw):
    return build_beit_classifier(10, img_size=img_size, drop_path_rate=0.0, **{**DIMS, **kw}).eval()


def test_our_pretrained_safetensors_and_accelerate_dir(tmp_path):
    src = shared_table_model()
    sd = reference_pretrain_state_dict(src)
    save_file(sd, str(tmp_path / "pretrained.safetensors"))
    ckdir = tmp_path / "checkpoint-100"
    ckdir.mkdir()
    save_file({f"_orig_mod.{k}": v for k, v in sd.items()}, str(ckdir / "model.safetensors"))
    for source in (tmp_path / "pretrained.safetensors", ckdir):
        m = finetune_model()
        rep = load_beit_weights(m, source)
        assert "mask_token" in rep.dropped and "lm_head.weight" in rep.dropped
        assert rep.missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
        assert not rep.unexpected
        for i in range(2):
            torch.testing.assert_close(m.blocks[i].attn.relative_position_bias_table,
                                       sd["rel_pos_bias.relative_position_bias_table"])
        torch.testing.assert_close(m.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
        assert "shared relative position table copied into 2 blocks" in rep.summary()


def test_unilm_torch_file_with_args_namespace(tmp_path):
    src = shared_table_model()
    sd = reference_pretrain_state_dict(src)
    n = src.patch_embed.num_patches + 1
    for i in range(2):  # unilm stores the derived index buffers too
        sd[f"blocks.{i}.attn.relative_position_index"] = torch.zeros(n, n, dtype=torch.long)
    path = tmp_path / "beit_pt22k.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1.5e-3, model="beit_base")}, path)
    m = finetune_model()
    rep = load_beit_weights(m, path)
    assert rep.kind.startswith("BEiT pretraining")
    assert "blocks.0.attn.relative_position_index" in rep.dropped
    torch.testing.assert_close(m.patch_embed.proj.weight, sd["patch_embed.proj.weight"])


def test_timm_weights_safetensors_and_pth_load_fully(tmp_path):
    src = finetune_model()
    with torch.no_grad():
        for b in src.blocks:
            b.attn.relative_position_bias_table.normal_()
    sd = src.state_dict()
    save_file(sd, str(tmp_path / "model.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "model.pth")
    x = torch.randn(2, 3, 32, 32)
    for f in ("model.safetensors", "model.pth"):
        m = finetune_model()
        rep = load_beit_weights(m, tmp_path / f)
        assert not rep.missing and not rep.unexpected and not rep.dropped
        torch.testing.assert_close(m(x), src(x))


def test_shared_to_per_block_is_numerically_equivalent():
    src = shared_table_model()
    dst = finetune_model()
    rep = load_beit_weights(dst, src.state_dict())
    assert rep.missing == ["head.bias", "head.weight"]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a = src.forward_features(x)
        b = dst.forward_features(x)
        assert a.abs().mean() > 0.1
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(src.forward_head(a, pre_logits=True), dst.forward_head(b, pre_logits=True))


def test_resize_to_larger_grid_keeps_centre_and_cls_entries():
    src = shared_table_model(img_size=32)  # 4x4 grid -> 7x7 table + 3
    table = src.rel_pos_bias.relative_position_bias_table.detach()
    dst = finetune_model(img_size=64)  # 8x8 grid -> 15x15 table + 3
    rep = load_beit_weights(dst, reference_pretrain_state_dict(src))
    assert "blocks.0.attn.relative_position_bias_table" in rep.resized
    new = dst.blocks[0].attn.relative_position_bias_table.detach()
    assert new.shape == (15 * 15 + 3, 2)
    old_grid, new_grid = table[:-3].view(7, 7, 2), new[:-3].view(15, 15, 2)
    # offsets 0 and +-1 sit exactly on source points of the geometric-progression grid
    torch.testing.assert_close(new_grid[6:9, 6:9], old_grid[2:5, 2:5])
    torch.testing.assert_close(new[-3:], table[-3:])
    # the far corner interpolates towards the source's corner value, within the source's range
    assert old_grid.min() - 1e-5 <= new_grid.min() and new_grid.max() <= old_grid.max() + 1e-5
    with torch.no_grad():
        assert torch.isfinite(dst(torch.randn(1, 3, 64, 64))).all()


def test_patch_size_change_resamples_patch_embed():
    src = shared_table_model(img_size=32)  # patch 8
    dst = finetune_model(img_size=32, patch_size=4)  # 8x8 grid, 4x4 patches
    rep = load_beit_weights(dst, reference_pretrain_state_dict(src))
    assert "patch_embed.proj.weight" in rep.resized
    assert dst.patch_embed.proj.weight.shape == (48, 3, 4, 4)
    with torch.no_grad():
        assert torch.isfinite(dst(torch.randn(1, 3, 32, 32))).all()


def test_head_with_other_class_count_is_reinitialised():
    src = build_beit_classifier(1000, img_size=32, drop_path_rate=0.0, **DIMS)
    dst = finetune_model()
    rep = load_beit_weights(dst, src.state_dict())
    assert set(rep.dropped) == {"head.weight", "head.bias"}
    assert "head re-initialised" in rep.summary()


@pytest.mark.parametrize("kw, msg", [
    (dict(embed_dim=64), "embedding dim mismatch"),
    (dict(depth=3), "depth mismatch: checkpoint has 2 blocks, model has 3"),
    (dict(num_heads=4), "heads"),
    (dict(mlp_ratio=2.0), "mlp.fc1.weight"),
])
def test_shapes_that_cannot_fit_are_refused(kw, msg):
    sd = reference_pretrain_state_dict(shared_table_model())
    with pytest.raises(CheckpointMismatchError, match=msg):
        load_beit_weights(finetune_model(**kw), sd)


def test_clear_errors_for_wrong_files(tmp_path):
    torch.save({"model": {"x": torch.zeros(1)}, "opt": object.__new__(argparse.ArgumentParser)}, tmp_path / "p.pth")
    with pytest.raises(UntrustedPickleError, match="argparse.ArgumentParser.*--trust_pickle true"):
        read_state_dict(tmp_path / "p.pth")
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="none of its 1 tensors match"):
        load_beit_weights(finetune_model(), tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="expected one of"):
        load_beit_weights(finetune_model(), tmp_path)
    sd = reference_pretrain_state_dict(shared_table_model())
    del sd["blocks.1.mlp.fc1.weight"]
    with pytest.raises(CheckpointMismatchError, match="blocks.1.mlp.fc1.weight"):
        load_beit_weights(finetune_model(), sd)


def test_layer_decay_groups_and_lr_scale_applied():
    m = finetune_model()  # depth L = 2
    groups = layer_decay_param_groups(m, weight_decay=0.05, layer_decay=0.5)
    scale = {}
    names = {id(p): n for n, p in m.named_parameters()}
    for g in groups:
        for p in g["params"]:
            scale[names[id(p)]] = (g["lr_scale"], g["weight_decay"])
    assert scale["cls_token"] == (0.5 ** 3, 0.0)
    assert scale["patch_embed.proj.weight"] == (0.5 ** 3, 0.05)
    assert scale["blocks.0.attn.relative_position_bias_table"][0] == 0.5 ** 2
    assert scale["blocks.0.attn.qkv.weight"] == (0.5 ** 2, 0.05)
    assert scale["blocks.1.mlp.fc1.weight"] == (0.5 ** 1, 0.05)
    assert scale["blocks.1.norm1.bias"] == (0.5, 0.0)
    assert scale["head.weight"] == (1.0, 0.05) and scale["fc_norm.weight"] == (1.0, 0.0)
    assert scale["blocks.0.attn.relative_position_bias_table"][1] == 0.0
    assert len(scale) == len(list(m.parameters()))
    opt = torch.optim.AdamW(groups, lr=1.0)
    WarmupCosineSchedule(opt, lr=2e-3, min_lr=0.0, total_steps=10, weight_decay=0.05).step()
    assert sorted({round(g["lr"], 9) for g in opt.param_groups}) == [2.5e-4, 5e-4, 1e-3, 2e-3]


def test_timm_baseline_from_local_weights_file(tmp_path):
    from beit.modeling.classifier import build_timm_model
    src = build_timm_model("vit_tiny_patch16_224", 1000, img_size=32)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    m = build_timm_model("vit_tiny_patch16_224", 10, weights=str(tmp_path / "vit.safetensors"), img_size=32)
    assert m.head.out_features == 10
    torch.testing.assert_close(m.blocks[5].mlp.fc2.weight, src.blocks[5].mlp.fc2.weight)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_timm_model("vit_tiny_patch16_224", 10, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown timm model"):
        build_timm_model("vit_tinyy_patch16", 10)
