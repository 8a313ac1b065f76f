"""The trained VQ-KD model: unilm's layout and tokens (on unilm's own fixture), the EMA codebook, k-means
initialisation and dead-code restarts."""
import pytest
import torch
import torch.nn.functional as F
from reference_fixtures import case

from beit.tokenizers.vqkd_model import NormEMAQuantizer, VQKDModel, cosine_distance, spherical_kmeans


def tiny(**kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, n_code=64, code_dim=8,
               decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, teacher_dim=512)
    return VQKDModel(**{**cfg, **kw})


def test_layout_and_tokens_equal_unilms_own_vqkd():
    """unilm's VQKD state dict (written by its code, tests/fixtures/reference/unilm_vqkd) loads strictly into
    the model we train, and our encoder + nearest-code lookup give unilm's get_codebook_indices tokens."""
    d, meta, io = case("unilm_vqkd")
    sd = torch.load(d / meta["checkpoint"], map_location="cpu", weights_only=True)["model"]
    model = tiny().eval()
    assert set(model.reference_state_dict()) == set(sd)
    assert all(model.reference_state_dict()[k].shape == v.shape for k, v in sd.items())
    model.load_state_dict(sd, strict=False)  # strict but for our own restart bookkeeping
    with torch.no_grad():
        tokens = model.quantize.lookup(model.encode(io["images"]))
    assert torch.equal(tokens.view(len(tokens), -1), io["tokens"].view(len(tokens), -1))


def test_spherical_kmeans_is_lloyds_fixed_point_and_improves_on_its_start():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    x = F.normalize(centres.repeat_interleave(50, 0) + 0.3 * torch.randn(300, 8, generator=g), dim=-1)
    start, _ = spherical_kmeans(x, 6, 0, torch.Generator().manual_seed(1))  # 0 iterations: the random picks
    means, sizes = spherical_kmeans(x, 6, 30, torch.Generator().manual_seed(1))
    assert sizes.sum() == 300 and torch.allclose(means.norm(dim=-1), torch.ones(6))
    assign = (x @ means.T).argmax(-1)
    for k in range(6):  # converged: each centroid is the normalised mean of the vectors nearest to it
        if sizes[k]:
            assert torch.allclose(means[k], F.normalize(x[assign == k].sum(0), dim=-1), atol=1e-5)
    assert (x @ means.T).max(-1).values.mean() > (x @ start.T).max(-1).values.mean()
    few, _ = spherical_kmeans(x[:3], 5, 2, torch.Generator().manual_seed(1))  # fewer vectors than codes
    assert few.shape == (5, 8)


def test_codebook_start():
    """k-means start (default): zero rows until the first batch initialises them; without: random unit rows."""
    assert not NormEMAQuantizer(8, 4).initialised and NormEMAQuantizer(8, 4).weight.abs().sum() == 0
    q = NormEMAQuantizer(8, 4, kmeans_init=False)
    assert q.initialised and torch.allclose(q.weight.norm(dim=-1), torch.ones(8))


def test_ema_update_moves_used_rows_only_and_keeps_them_unit():
    q = NormEMAQuantizer(4, 3, decay=0.9)
    q.init_from(F.normalize(torch.eye(4, 3) + 0.01, dim=-1), torch.Generator().manual_seed(0), iters=1)
    before = q.weight.clone()
    z = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [1.0, -0.2, 0.0], [0.0, 1.0, 0.1]]), dim=-1)
    idx = q.lookup(z)
    counts = q.ema_update(z, idx, step=7)
    assert counts.sum() == 3
    for k in range(4):
        rows = z[idx == k]
        if len(rows):
            mean = F.normalize(rows.mean(0), dim=-1)
            assert torch.allclose(q.weight[k], F.normalize(0.9 * before[k] + 0.1 * mean, dim=-1), atol=1e-6)
            assert q.last_used[k] == 7
        else:
            assert torch.equal(q.weight[k], before[k]) and q.last_used[k] == 0
    assert torch.allclose(q.weight.norm(dim=-1), torch.ones(4))
    assert torch.allclose(q.cluster_size, 0.1 * counts)


def test_restart_replaces_exactly_the_dead_rows_with_recent_outputs():
    q = NormEMAQuantizer(6, 4)
    q.init_from(F.normalize(torch.randn(64, 4), dim=-1), torch.Generator().manual_seed(0))
    q.last_used.copy_(torch.tensor([10, 3, 10, 0, 9, 10]))
    recent = F.normalize(torch.randn(5, 4), dim=-1)
    keep = q.weight[[0, 2, 4, 5]].clone()
    assert q.dead_count(10, after_steps=5) == 2
    n = q.restart_dead(recent, step=10, after_steps=5, generator=torch.Generator().manual_seed(3))
    assert n == 2 and q.dead_count(10, after_steps=5) == 0
    assert torch.equal(q.weight[[0, 2, 4, 5]], keep)
    for k in (1, 3):  # each dead row is now one of the recent outputs, two different ones
        assert (q.weight[k] @ recent.T).max() > 1 - 1e-6 and q.last_used[k] == 10
    assert not torch.allclose(q.weight[1], q.weight[3])


def test_forward_loss_and_gradients():
    torch.manual_seed(0)
    model = tiny()
    images, target = torch.rand(2, 3, 32, 32), torch.randn(2, 4, 4, 512)
    model.quantize.init_from(model.encode(images).detach().flatten(0, 1), torch.Generator().manual_seed(0))
    out = model(images, target)
    with torch.no_grad():
        rec = model.decode(model.quantize.weight[out["indices"]])
    assert out["rec_loss"] == pytest.approx(float(cosine_distance(rec, target.flatten(1, 2))), rel=1e-5)
    out["loss"].backward()
    # the straight-through estimator carries the decoder's gradient back into the encoder
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.decoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert not model.quantize.weight.requires_grad  # the codebook moves by EMA only
    with pytest.raises(ValueError, match="not divisible"):
        tiny(decoder_num_heads=5)
