"""The faster BEiT block (beit/modeling/blocks.py) against timm's own Block, and the model's
masked-rows-only last block against the full encoder gathered at the mask."""
import pytest
import torch
from timm.models.beit import Block, RelativePositionBias

from beit.modeling.blocks import BeitAttention, BeitBlock
from beit.modeling.mim import create_pretrain_model

DIM, HEADS = 48, 3


def _pair(drop_path=0.2, init_values=0.1):
    torch.manual_seed(0)
    ref = Block(DIM, HEADS, qkv_bias=True, init_values=init_values, drop_path=drop_path).train()
    ours = BeitBlock(DIM, HEADS, qkv_bias=True, init_values=init_values, drop_path=drop_path).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _bias(seed=2):
    rp = RelativePositionBias((4, 4), HEADS)
    with torch.no_grad():
        rp.relative_position_bias_table.copy_(torch.randn(rp.relative_position_bias_table.shape,
                                                          generator=torch.Generator().manual_seed(seed)))
    return rp


def _run(block, x, rp, rows=None):
    x = x.detach().clone().requires_grad_(True)
    rp.zero_grad()
    block.zero_grad()
    torch.manual_seed(5)  # the same drop-path draws
    bias = rp()
    y = block(x, shared_rel_pos_bias=bias) if rows is None else block.forward_rows(x, bias, rows)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    return y.detach(), x.grad, rp.relative_position_bias_table.grad.clone(), grads


@pytest.mark.parametrize("init_values", [0.1, None])
def test_block_matches_timm_block(init_values):
    ref, ours = _pair(init_values=init_values)
    assert type(ours.attn) is BeitAttention and ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 17, DIM)
    y0, gx0, gb0, g0 = _run(ref, x, _bias())
    y1, gx1, gb1, g1 = _run(ours, x, _bias())
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb1, gb0, rtol=1e-5, atol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-5, msg=n)


def test_forward_rows_is_forward_gathered():
    ref, ours = _pair()
    x = torch.randn(3, 17, DIM)
    g = torch.Generator().manual_seed(3)
    rows = torch.stack([torch.randperm(16, generator=g)[:6].sort().values + 1 for _ in range(3)])
    take = rows[:, :, None].expand(-1, -1, DIM)
    y0, gx0, gb0, g0 = _run(ref, x, _bias(), rows=None)
    # the reference's loss must weight the same rows: rerun it on the gathered output
    x_ref = x.clone().requires_grad_(True)
    rp = _bias()
    ref.zero_grad()
    torch.manual_seed(5)
    out = ref(x_ref, shared_rel_pos_bias=rp()).gather(1, take)
    (out * torch.linspace(-1, 1, DIM)).sum().backward()
    y1, gx1, gb1, g1 = _run(ours, x, _bias(), rows=rows)
    torch.testing.assert_close(y1, y0.gather(1, take), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb1, rp.relative_position_bias_table.grad, rtol=1e-5, atol=1e-5)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(g1[n], p.grad, rtol=1e-5, atol=1e-5, msg=n)


def test_block_refuses_a_per_block_table():
    with pytest.raises(ValueError, match="shared relative position bias"):
        BeitBlock(DIM, HEADS, qkv_bias=True, window_size=(4, 4))


@pytest.mark.parametrize("equal_counts", [True, False])
def test_model_forward_matches_the_full_encoder(equal_counts):
    """Equal masked counts take the rows-only last block; unequal ones the full one. Both equal
    the full encoder gathered at the mask, in loss and in every gradient."""
    torch.manual_seed(0)
    m = create_pretrain_model("tiny", img_size=32, patch_size=8, embed_dim=DIM, depth=2, num_heads=HEADS,
                              vocab_size=64, drop_path_rate=0.2).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(3, 3, 32, 32, generator=g)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    for i, n in enumerate([5, 5, 5] if equal_counts else [5, 2, 7]):
        mask[i, torch.randperm(16, generator=g)[:n]] = True
    labels = torch.randint(0, 64, (int(mask.sum()),), generator=g)

    def loss_and_grads(fn):
        m.zero_grad()
        torch.manual_seed(5)
        loss = torch.nn.functional.cross_entropy(fn(), labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    calls = []
    h = m.blocks[-1].forward_rows
    m.blocks[-1].forward_rows = lambda *a: calls.append(1) or h(*a)
    l1, g1 = loss_and_grads(lambda: m(x, mask))
    del m.blocks[-1].forward_rows
    assert len(calls) == (1 if equal_counts else 0)
    l0, g0 = loss_and_grads(lambda: m.lm_head(m.forward_features(x, mask)[:, 1:][mask]))
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys() and len(g0) > 20
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=n)
