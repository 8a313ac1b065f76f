import math

import pytest
import torch
from torch import nn

from beit.optim import WarmupCosineSchedule, cosine_value, create_adamw, param_groups_weight_decay


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.table = nn.Parameter(torch.zeros(5, 2))      # 2-D but named by no_weight_decay()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3, bias=False)
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)

    def no_weight_decay(self):
        return {"cls_token", "table"}


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_groups_exclude_biases_norms_and_named_params():
    m = Tiny()
    groups = param_groups_weight_decay(m, 0.05)
    by_name = {g["name"]: g for g in groups}
    assert _names(m, by_name["decay"]) == ["fc.weight", "head.weight"]
    assert _names(m, by_name["no_decay"]) == ["cls_token", "fc.bias", "norm.bias", "norm.weight", "table"]
    assert by_name["decay"]["weight_decay"] == 0.05 and by_name["no_decay"]["weight_decay"] == 0.0
    assert all("frozen" not in _names(m, g) for g in groups)


def test_cosine_values_warmup_peak_end():
    kw = dict(total_steps=110, start=1.0, end=0.01, warmup_steps=10)
    assert cosine_value(0, **kw) == pytest.approx(0.1)
    assert cosine_value(4, **kw) == pytest.approx(0.5)
    assert cosine_value(9, **kw) == pytest.approx(1.0)            # last warmup step reaches the peak
    assert cosine_value(10, **kw) == pytest.approx(1.0)           # cosine starts at the peak
    mid = 10 + 99 / 2
    assert cosine_value(int(mid),
                        **kw) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * int(mid - 10) / 99)))
    assert cosine_value(109, **kw) == pytest.approx(0.01)          # last step reaches the end value
    assert cosine_value(500, **kw) == pytest.approx(0.01)
    vals = [cosine_value(s, **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))            # monotone decay after warmup


def test_schedule_applies_lr_scale_and_keeps_zero_wd_groups():
    m = Tiny()
    groups = param_groups_weight_decay(m, 0.05)
    groups[0]["lr_scale"] = 0.5                                    # e.g. a layer-decayed group
    opt = create_adamw(groups, lr=1e-3)
    sched = WarmupCosineSchedule(opt, lr=1e-3, min_lr=1e-5, total_steps=20, warmup_steps=4,
                                 weight_decay=0.05, weight_decay_end=0.2)
    lrs, wds = [], []
    for _ in range(20):
        lr, wd = sched.step()
        lrs.append(lr), wds.append(wd)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * lr)
        assert opt.param_groups[1]["lr"] == pytest.approx(lr)
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(wd)
        assert opt.param_groups[1]["weight_decay"] == 0.0
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[3] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-5)
    assert wds[0] == pytest.approx(0.05) and wds[-1] == pytest.approx(0.2)
    assert all(a <= b for a, b in zip(wds, wds[1:]))               # wd rises along the cosine


def test_schedule_state_resumes_exactly():
    m = Tiny()
    opt = create_adamw(param_groups_weight_decay(m, 0.05), lr=1.0)
    a = WarmupCosineSchedule(opt, lr=1.0, min_lr=0.0, total_steps=30, warmup_steps=5, weight_decay=0.05)
    for _ in range(12):
        a.step()
    b = WarmupCosineSchedule(opt, lr=1.0, min_lr=0.0, total_steps=30, warmup_steps=5, weight_decay=0.05)
    b.load_state_dict(a.state_dict())
    assert b.step() == a.step()


def test_schedule_rejects_bad_lengths():
    opt = create_adamw(param_groups_weight_decay(Tiny(), 0.05), lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosineSchedule(opt, lr=1.0, min_lr=0.0, total_steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosineSchedule(opt, lr=1.0, min_lr=0.0, total_steps=0)
