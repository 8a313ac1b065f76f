"""The fine-tune epoch: a non-finite loss anywhere in an accumulation window drops that optimizer
step (weights untouched, counted), decided once per step; data_wait_fraction is reported."""
import math

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from beit.engines.finetune import train_one_epoch


class _Schedule:
    def step(self):
        return 0.1, 0.0


def test_nonfinite_micro_step_drops_its_window():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = acc.prepare(model, opt)
        batches = [{"image": torch.randn(2, 4), "label": torch.tensor([0, 1])} for _ in range(6)]
        calls = {"n": 0}

        def criterion(logits, y):  # micro-step 3 (the first of window 2) is non-finite
            calls["n"] += 1
            loss = torch.nn.functional.cross_entropy(logits, y)
            return loss * float("nan") if calls["n"] == 3 else loss

        before = {}
        seen = []

        def on_step(step, metrics):
            seen.append(metrics)
            before[step] = [p.detach().clone() for p in model.parameters()]

        start = [p.detach().clone() for p in model.parameters()]
        step, stats = train_one_epoch(model, batches, opt, _Schedule(), acc, criterion, epoch=0, step=0, max_steps=3,
                                      on_step=on_step)
        assert step == 3 and stats["skipped_steps"] == 1
        assert math.isnan(seen[1]["loss"]) and math.isfinite(seen[0]["loss"]) and math.isfinite(seen[2]["loss"])
        assert not all(torch.equal(a, b) for a, b in zip(start, before[1]))       # step 1 updated
        assert all(torch.equal(a, b) for a, b in zip(before[1], before[2]))       # step 2 dropped whole
        assert not all(torch.equal(a, b) for a, b in zip(before[2], before[3]))   # step 3 updated
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert 0 <= stats["data_wait_fraction"] < 1 and "data_wait_fraction" in seen[0]
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
