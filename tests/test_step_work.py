"""The optimizer step without Accelerate's per-call wrappers: the same norm, clipping and update, bit for bit."""
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from beit.optim import create_adamw, param_groups_weight_decay
from beit.optim.step_work import OptimizerStep


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.LayerNorm(32),
                                torch.nn.Linear(32, 5))
    model[2].weight.requires_grad_(False)  # a frozen parameter is left out of the norm, as torch's clip does
    acc = Accelerator(cpu=True)
    opt = create_adamw(param_groups_weight_decay(model, 0.05), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt


@pytest.mark.parametrize("max_norm", [0.05, float("inf")])
def test_direct_step_equals_accelerates(max_norm):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(4)]
    runs = []
    for direct in (False, True):
        acc, model, opt = _setup()
        step = OptimizerStep(acc, model, opt)
        assert step.direct and isinstance(step.inner, torch.optim.AdamW)
        norms = []
        for x, y in batches:
            acc.backward(torch.nn.functional.cross_entropy(model(x), y))
            if direct:
                norms.append(step.clip(max_norm))
                step.step()
                step.zero_grad()
            else:
                norms.append(acc.clip_grad_norm_(model.parameters(), max_norm))
                opt.step()
                opt.zero_grad(set_to_none=True)
            assert all(p.grad is None for p in model.parameters())
        runs.append((torch.stack(norms), [p.detach().clone() for p in model.parameters()]))
    (n_acc, p_acc), (n_dir, p_dir) = runs
    assert torch.equal(n_acc, n_dir) and all(torch.equal(a, b) for a, b in zip(p_acc, p_dir))
    if max_norm < 1:
        assert (n_dir > max_norm).all()  # the clipping really ran


def test_wrappers_run_where_they_do_more_than_torch():
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    scaled = SimpleNamespace(distributed_type=DistributedType.NO, scaler=object(), device=torch.device("cpu"))
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, scaler=None, device=torch.device("cpu"))
    assert not OptimizerStep(scaled, model, opt).direct and not OptimizerStep(fsdp, model, opt).direct
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, scaler=None, device=torch.device("cpu"))
    assert OptimizerStep(ddp, model, opt).direct
