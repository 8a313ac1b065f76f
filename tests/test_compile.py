"""`compile: true`: the blocks run through torch.compile in place, with the eager model's outputs,
gradients and state-dict keys. The equality test traces with the aot_eager backend (dynamo + AOT
autograd, no C++ build: inductor's CPU compile takes minutes on a busy 2-core machine; its speed and
compile time are `beit bench --compile` figures)."""
import torch
import torch.nn.functional as F

from beit.modeling.mim import create_pretrain_model


def test_compiled_blocks_match_eager():
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, vocab_size=16, drop_path_rate=0.0)
    eager = create_pretrain_model(None, **kw)
    comp = create_pretrain_model(None, **kw)
    comp.load_state_dict(eager.state_dict())
    comp.compile_blocks(backend="aot_eager")
    assert list(comp.state_dict()) == list(eager.state_dict())      # checkpoints keep their keys
    x = torch.randn(3, 3, 32, 32)
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    labels = torch.randint(0, 16, (int(mask.sum()),))
    losses = []
    for m in (eager, comp):
        loss = F.cross_entropy(m(x, mask), labels)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    for (n, p), (_, q) in zip(eager.named_parameters(), comp.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=n)
    assert all(b._compiled_call_impl is not None for b in comp.blocks)


def test_compile_is_a_config_switch():
    from beit.options.pretrain import PretrainConfig
    from beit.training.pretraining import build_model
    cfg = PretrainConfig(model_size="tiny", image_size=32, patch_size=16, compile=True, train_shards=["x"])
    model = build_model(cfg, vocab_size=16)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model.blocks)
    assert build_model(PretrainConfig(model_size="tiny", image_size=32, patch_size=16, train_shards=["x"]),
                       16).blocks[0]._compiled_call_impl is None


def test_every_block_of_a_deep_model_is_compiled():
    """12 blocks with 12 drop-path rates: one compiled frame each, none left eager by dynamo's
    recompile limit (8 by default)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    m = create_pretrain_model(None, img_size=16, patch_size=8, embed_dim=16, depth=12, num_heads=2,
                              vocab_size=8, drop_path_rate=0.1)
    m.compile_blocks(backend="eager")
    m(torch.randn(2, 3, 16, 16), torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)).sum().backward()
    assert counters["stats"]["unique_graphs"] > 8  # the default limit would stop at 8
