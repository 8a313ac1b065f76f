"""BEiT pretraining of a timm Swin encoder: masking on the token grid, the heads, loading into timm."""
import json

import pytest
import timm
import torch

from beit.checkpoints.loading import CheckpointMismatchError
from beit.modeling.backbones.swin import load_swin_encoder
from beit.modeling.swin_mim import SwinMimModel

ARCH = "swin_tiny_patch4_window7_224"
# 32 px, 2 px Swin patches: stage grids 16, 8, 4, 2; 8 px tokens -> a 4x4 token grid (4x4 Swin patches a cell)
SMALL = dict(img_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=4)


def small(head="last", **kw):
    torch.manual_seed(0)
    return SwinMimModel(ARCH, token_grid=(4, 4), vocab_size=24, head=head, drop_path_rate=0.0, **{**SMALL, **kw})


def block_mask(b=2):
    m = torch.zeros(b, 4, 4, dtype=torch.bool)
    m[0, 1:3, 0:2] = True
    m[1, 0, 3] = m[1, 3, 1] = True
    return m


def test_geometry_at_224_matches_the_token_grid():
    with torch.device("meta"):
        last = SwinMimModel(ARCH, token_grid=(14, 14), vocab_size=8192)
        stage = SwinMimModel(ARCH, token_grid=(14, 14), vocab_size=8192, head="stage")
    assert (last.ratio, last.upsample) == (4, 2)           # 16 px token = 4x4 Swin patches; stride 32 -> 16
    assert (stage.ratio, stage.stage) == (4, 2)            # the third stage has stride 16
    assert last.mim_up.out_features == 4 * 384 and last.lm_head.in_features == 384


def test_patch_mask_maps_each_token_cell_to_its_block():
    m = small()
    tok = block_mask()
    fine = m.patch_mask(tok.flatten(1))
    assert fine.shape == (2, 16, 16)
    assert torch.equal(fine[:, ::4, ::4], tok) and int(fine.sum()) == 16 * int(tok.sum())
    assert fine[0, 4:12, 0:8].all() and not fine[0, :4].any() and not fine[0, 4:12, 8:].any()


@pytest.mark.parametrize("head", ["last", "stage"])
def test_masked_pixels_have_exactly_zero_influence(head):
    m = small(head).train()
    mask = block_mask()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = m(x, mask)
    assert out.shape == (int(mask.sum()), 24)
    out.square().sum().backward()
    per_cell = x.grad.abs().view(2, 3, 4, 8, 4, 8).sum(dim=(1, 3, 5))    # [B, 4, 4] token cells
    assert (per_cell[mask] == 0).all(), "a masked token's pixels reached the head"
    assert (per_cell[~mask] > 0).all(), "visible pixels must matter"
    y = x.detach().clone()
    y.view(2, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5)[mask] = 7.0       # overwrite every masked cell's pixels
    assert torch.equal(m.eval()(y, mask), m(x.detach(), mask))


def test_logits_only_for_masked_cells_in_token_order():
    m = small().eval()
    x, mask = torch.randn(2, 3, 32, 32), block_mask()
    feats = m.forward_features(x, mask).flatten(1, 2)
    assert feats.shape == (2, 16, 64)          # last stage (2x2, dim 128) pixel-shuffled x2: 4x4 cells of dim 64
    expect = m.lm_head(m.mim_norm(feats))[mask.flatten(1)]
    assert torch.allclose(m(x, mask), expect, atol=1e-6)


def test_stage_head_freezes_the_stages_it_does_not_read():
    m = small("stage")
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in m.named_parameters() if n.startswith(("layers.3.", "norm."))}
    assert "norm.weight" in frozen and "layers.3.downsample.reduction.weight" in frozen
    x = torch.randn(2, 3, 32, 32)
    m(x, block_mask()).sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("head", ["last", "stage"])
def test_encoder_loads_into_timm_swin_with_no_missing_keys_and_same_features(head):
    m = small(head).eval()
    clf = timm.create_model(ARCH, num_classes=10, **SMALL).eval()
    report = load_swin_encoder(clf, m.state_dict())
    assert report.missing == ["head.fc.bias", "head.fc.weight"] and not report.unexpected
    assert set(report.dropped) >= {"mask_token", "lm_head.weight", "mim_norm.weight"}
    assert set(report.loaded) == set(m.encoder_state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(clf.forward_features(x), m.norm(m.layers(m.patch_embed(x))))


def test_loading_into_another_swin_size_is_a_clear_error():
    m = small()
    other = timm.create_model(ARCH, num_classes=10, **{**SMALL, "depths": [2, 2, 4, 2]})
    with pytest.raises(CheckpointMismatchError, match="missing encoder tensors.*layers.2.blocks.2"):
        load_swin_encoder(other, m.state_dict())
    wider = timm.create_model(ARCH, num_classes=10, **{**SMALL, "embed_dim": 24})
    with pytest.raises(CheckpointMismatchError, match="shapes differ"):
        load_swin_encoder(wider, m.state_dict())


def test_bad_geometry_and_names_raise_clear_errors():
    with pytest.raises(ValueError, match="does not tile"):
        SwinMimModel(ARCH, token_grid=(3, 3), vocab_size=8, **SMALL)
    with pytest.raises(ValueError, match="coarser than Swin's last stage"):
        SwinMimModel(ARCH, token_grid=(1, 1), vocab_size=8, **{**SMALL, "depths": [2, 2], "num_heads": [1, 2]})
    with pytest.raises(ValueError, match="not a timm Swin"):
        SwinMimModel("vit_tiny_patch16_224", token_grid=(4, 4), vocab_size=8)
    with pytest.raises(ValueError, match="swin_head"):
        SwinMimModel(ARCH, token_grid=(4, 4), vocab_size=8, head="middle", **SMALL)
    with pytest.raises(ValueError, match="bool_masked_pos must be"):
        small()(torch.randn(2, 3, 32, 32), torch.zeros(2, 8, 8, dtype=torch.bool))


def test_no_weight_decay_names_exist():
    m = small()
    names = dict(m.named_parameters())
    nwd = m.no_weight_decay()
    assert "mask_token" in nwd and all(n in names for n in nwd)
    assert sum("relative_position_bias_table" in n for n in nwd) == 8


def test_config_records_the_timm_architecture():
    m = small()
    cfg = json.loads(json.dumps(m.config))
    assert cfg["arch"] == ARCH and cfg["depths"] == [2, 2, 2, 2] and cfg["window_size"] == [4, 4, 4, 2]
    rebuilt = timm.create_model(cfg["arch"], num_classes=0, **{k: cfg[k] for k in SMALL})
    assert set(rebuilt.state_dict()) == set(m.encoder_state_dict())
