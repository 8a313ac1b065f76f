import math

import numpy as np
import pytest
import torch
from timm.models.beit import Beit

from beit.masking import MaskingGenerator
from beit.modeling.mim import BEIT_SIZES, create_pretrain_model, timm_beit_kwargs

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, vocab_size=64)


def tiny(**kw):
    return create_pretrain_model("tiny", **{**TINY, **kw})


def masks(batch, grid, count, seed=0):
    return torch.from_numpy(MaskingGenerator(grid, count, min_num_patches=2, seed=seed).generate(batch))


def randomise_(model):
    """Non-trivial values everywhere (rel-pos table, gammas, norms are constant at init)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_shapes_square_and_non_square():
    m = tiny().eval()
    assert m.grid_size == (4, 4) and m.num_patches == 16
    x = torch.randn(3, 3, 32, 32)
    bm = masks(3, (4, 4), 6)
    assert m(x, bm).shape == (18, 64)
    assert m(x, bm.flatten(1)).shape == (18, 64)
    assert m.forward_features(x).shape == (3, 17, 48)
    assert m.forward_features(x, bm).shape == (3, 17, 48)
    r = tiny(img_size=(32, 48), patch_size=(8, 16)).eval()
    assert r.grid_size == (4, 3)
    out = r(torch.randn(2, 3, 32, 48), masks(2, (4, 3), 5))
    assert out.shape == (10, 64)


def test_only_masked_positions_reach_the_head():
    m = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    bm = torch.zeros(2, 4, 4, dtype=torch.bool)
    bm[0, 1, 2] = bm[0, 3, 0] = bm[1, 0, 0] = True
    seen = []
    h = m.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    logits = m(x, bm)
    h.remove()
    assert seen == [torch.Size([3, 48])] and logits.shape == (3, 64)
    # rows are the masked tokens in tokens.flatten(1)[mask.flatten(1)] order
    feats = m.forward_features(x, bm)[:, 1:]
    expect = m.lm_head(feats[bm.flatten(1)])
    torch.testing.assert_close(logits, expect)
    torch.testing.assert_close(logits[0], m.lm_head(feats[0, 1 * 4 + 2]))
    torch.testing.assert_close(logits[2], m.lm_head(feats[1, 0]))


@pytest.mark.parametrize("train", [False, True])
def test_masked_pixels_have_exactly_zero_influence(train):
    m = tiny(drop_path_rate=0.0)
    randomise_(m)
    m.train(train)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    bm = masks(2, (4, 4), 7)
    pix = bm.repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(1).expand(-1, 3, -1, -1)
    for out in (m(x, bm), m.forward_features(x, bm)):
        (g,) = torch.autograd.grad(out.sum(), x)
        assert (g[pix] == 0).all()
        assert (g[~pix] != 0).float().mean() > 0.99
    # and changing masked pixels changes nothing at all
    y = x.detach().clone()
    y[pix] = torch.randn(int(pix.sum()))
    torch.testing.assert_close(m.eval().forward_features(y, bm), m.forward_features(x.detach(), bm), rtol=0, atol=0)


def test_mask_token_replaces_patch_embedding():
    m = tiny().eval()
    x = torch.randn(1, 3, 32, 32)
    bm = torch.zeros(1, 16, dtype=torch.bool)
    bm[0, 5] = True
    seen = {}
    h = m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    m.forward_features(x, bm)
    h.remove()
    emb = m.patch_embed(x)
    torch.testing.assert_close(seen["x"][0, 0], m.cls_token[0, 0])
    torch.testing.assert_close(seen["x"][0, 1 + 5], m.mask_token[0, 0])
    torch.testing.assert_close(seen["x"][0, 1:6], emb[0, :5])


def test_init_facts():
    torch.manual_seed(0)
    m = create_pretrain_model("tiny", img_size=64, patch_size=8, depth=4, vocab_size=512)
    std = 0.02
    w = m.lm_head.weight
    # reference trunc-normal: +-1 std bounds, so the empirical std is 0.5396 * std
    assert w.abs().max() <= std and abs(w.std().item() - 0.5396 * std) < 0.05 * std
    assert (m.lm_head.bias == 0).all()
    for name in ("cls_token", "mask_token"):
        p = getattr(m, name)
        assert p.abs().max() <= std and p.std() > 0.3 * std
    assert (m.rel_pos_bias.relative_position_bias_table == 0).all()
    fc1_std = m.blocks[0].mlp.fc1.weight.std().item()
    for i, blk in enumerate(m.blocks, start=1):
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            ratio = w.std().item() / fc1_std
            assert abs(ratio - 1 / math.sqrt(2 * i)) < 0.06, (i, ratio)
            assert w.abs().max() <= std / math.sqrt(2 * i) + 1e-9
        assert (blk.gamma_1 == 0.1).all() and (blk.gamma_2 == 0.1).all()
        assert blk.attn.q_bias is not None and blk.attn.v_bias is not None
        assert "attn.k_bias" not in dict(blk.named_parameters())
        assert blk.norm1.eps == 1e-6
    assert m.norm.eps == 1e-6
    dp = [getattr(b.drop_path1, "drop_prob", 0.0) for b in m.blocks]
    assert dp == pytest.approx(np.linspace(0, 0.1, 4).tolist())
    large = BEIT_SIZES["large"]
    assert large["init_values"] == 1e-5 and BEIT_SIZES["base"]["init_values"] == 0.1
    assert (large["embed_dim"], large["depth"], large["num_heads"]) == (1024, 24, 16)


def test_sizes_and_overrides():
    assert {k: (v["embed_dim"], v["depth"], v["num_heads"]) for k, v in BEIT_SIZES.items()} == {
        "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
    m = create_pretrain_model("small", img_size=32, patch_size=16, depth=1, vocab_size=10)
    assert m.embed_dim == 384 and len(m.blocks) == 1 and m.blocks[0].attn.num_heads == 6
    custom = create_pretrain_model(None, img_size=32, patch_size=8, embed_dim=40, depth=1, num_heads=5,
                                   vocab_size=7, init_values=0.5)
    assert (custom.blocks[0].gamma_1 == 0.5).all() and custom.lm_head.out_features == 7
    with pytest.raises(ValueError, match="unknown BEiT size"):
        create_pretrain_model("huge")
    with pytest.raises(ValueError, match="unknown model option"):
        create_pretrain_model("tiny", embed_dims=10)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        create_pretrain_model("tiny", embed_dim=50, **{k: v for k, v in TINY.items() if k != "embed_dim"})
    with pytest.raises(ValueError, match="divisible by patch_size"):
        create_pretrain_model("tiny", img_size=30, patch_size=8)


def test_bad_inputs_raise_clear_errors():
    m = tiny()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="bool_masked_pos"):
        m(x, torch.zeros(2, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool_masked_pos"):
        m(x, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="images must be"):
        m(torch.randn(2, 3, 64, 64), torch.zeros(2, 16, dtype=torch.bool))
    # 0/1 ints and numpy masks are accepted
    bm = np.zeros((2, 4, 4), dtype=np.int64)
    bm[:, 0, 0] = 1
    assert m(x, bm).shape == (2, 64)


def test_no_weight_decay_names_exist():
    m = tiny()
    names = dict(m.named_parameters())
    nwd = m.no_weight_decay()
    assert nwd <= set(names)
    assert {"cls_token", "mask_token", "rel_pos_bias.relative_position_bias_table"} <= nwd
    timm_model = Beit(**m.timm_beit_kwargs(), num_classes=3)
    assert {n for n in timm_model.no_weight_decay() if n in dict(timm_model.named_parameters())} <= nwd


def test_grad_checkpointing_identical_loss_and_grads():
    def run(ckpt):
        torch.manual_seed(0)
        m = tiny(drop_path_rate=0.2)
        randomise_(m)
        m.train()
        m.set_grad_checkpointing(ckpt)
        x = torch.randn(2, 3, 32, 32)
        bm = masks(2, (4, 4), 6)
        target = torch.randint(0, 64, (12,))
        torch.manual_seed(5)  # same drop-path draws in both runs
        loss = torch.nn.functional.cross_entropy(m(x, bm), target)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    loss0, g0 = run(False)
    loss1, g1 = run(True)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 20
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7, msg=n)


def test_grad_checkpointing_really_recomputes():
    m = tiny()
    m.set_grad_checkpointing()
    calls = []
    m.blocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
    m(torch.randn(1, 3, 32, 32), masks(1, (4, 4), 4)).sum().backward()
    assert len(calls) == 2  # forward + recomputation in backward
    m.set_grad_checkpointing(False)
    calls.clear()
    m(torch.randn(1, 3, 32, 32), masks(1, (4, 4), 4)).sum().backward()
    assert len(calls) == 1


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_encoder_loads_into_timm_beit_and_features_agree(pool):
    m = tiny()
    randomise_(m)
    m.eval()
    sd = m.encoder_state_dict()
    assert "mask_token" not in sd and not any(k.startswith("lm_head") for k in sd)
    assert "rel_pos_bias.relative_position_bias_table" in sd and "blocks.1.attn.q_bias" in sd
    t = Beit(**timm_beit_kwargs("tiny", **TINY), num_classes=10, global_pool=pool).eval()
    res = t.load_state_dict(sd, strict=False)
    if pool == "avg":  # mean pooling: fc_norm is new, the final norm is unused
        assert sorted(res.missing_keys) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
        assert sorted(res.unexpected_keys) == ["norm.bias", "norm.weight"]
    else:
        assert sorted(res.missing_keys) == ["head.bias", "head.weight"] and res.unexpected_keys == []
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(t.forward_features(x), m.forward_features(x), rtol=1e-4, atol=1e-5)
    # the two helpers agree
    assert m.timm_beit_kwargs() == timm_beit_kwargs("tiny", **TINY)


def test_bf16_autocast_forward_and_backward():
    m = tiny()
    x = torch.randn(2, 3, 32, 32)
    bm = masks(2, (4, 4), 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(x, bm)
    assert logits.shape == (10, 64) and torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert m.mask_token.grad is not None and torch.isfinite(m.mask_token.grad).all()
    assert m.mask_token.grad.abs().sum() > 0
