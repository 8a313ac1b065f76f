"""Per-optimizer-step schedules of the learning rate and weight decay, and the warmup length.

Shared by every training stage. A parameter group may carry an ``lr_scale`` key (layer-wise lr decay on
the fine-tune side); the schedule multiplies the scheduled lr by it. Groups created with
``weight_decay == 0`` (biases, norms, tokens) stay at 0; every other group follows the weight-decay schedule.

``SCHEDULES`` names every schedule (``--lr_schedule``); a new one is a subclass of ``WarmupCosineSchedule``
with its own ``lr_at`` (and ``wd_at``), registered there.
"""
from __future__ import annotations

import math

import torch


def cosine_value(step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0,
                 warmup_start: float = 0.0) -> float:
    """Value at optimizer step ``step`` (0-based): linear from ``warmup_start`` so that step
    ``warmup_steps - 1`` reaches ``start``, then half-cosine from ``start`` to ``end`` at the
    last step ``total_steps - 1``; steps past the end stay at ``end``."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Per-optimizer-step lr (warmup + cosine to ``min_lr``) and weight decay (cosine ``wd`` ->
    ``wd_end``), written into every param group before each ``optimizer.step()``.

    Call ``schedule.step()`` once per optimizer step, before ``optimizer.step()``. The state is just
    the step counter (``state_dict``/``load_state_dict``), so a resumed run continues exactly.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, total_steps: int,
                 warmup_steps: int = 0, weight_decay: float = 0.0, weight_decay_end: float | None = None,
                 warmup_start_lr: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) must be in [0, total_steps={total_steps}]")
        self.optimizer = optimizer
        self.lr, self.min_lr, self.warmup_start_lr = lr, min_lr, warmup_start_lr
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.weight_decay = weight_decay
        self.weight_decay_end = weight_decay if weight_decay_end is None else weight_decay_end
        # decided once, before any step: a group built with weight_decay 0 never gets decay
        self._decays = [g.get("weight_decay", 0.0) > 0 for g in optimizer.param_groups]
        self.next_step = 0

    def lr_at(self, step: int) -> float:
        return cosine_value(step, self.total_steps, self.lr, self.min_lr, self.warmup_steps,
                            self.warmup_start_lr)

    def wd_at(self, step: int) -> float:
        return cosine_value(step, self.total_steps, self.weight_decay, self.weight_decay_end)

    def apply(self, step: int) -> tuple[float, float]:
        """Write the values of ``step`` into the optimizer's groups; returns (lr, wd)."""
        lr, wd = self.lr_at(step), self.wd_at(step)
        for group, decays in zip(self.optimizer.param_groups, self._decays):
            group["lr"] = lr * group.get("lr_scale", 1.0)
            group["weight_decay"] = wd if decays else 0.0
        return lr, wd

    def step(self) -> tuple[float, float]:
        """Apply the values of the next optimizer step and advance; returns (lr, wd)."""
        out = self.apply(self.next_step)
        self.next_step += 1
        return out

    def state_dict(self) -> dict:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict) -> None:
        self.next_step = int(state["next_step"])


SCHEDULES: dict[str, type[WarmupCosineSchedule]] = {"cosine": WarmupCosineSchedule}


def create_schedule(name: str, optimizer: torch.optim.Optimizer, **kw) -> WarmupCosineSchedule:
    """The schedule registered as ``name`` (``--lr_schedule``) over ``optimizer``."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](optimizer, **kw)


def warmup_for(steps_per_epoch: int, total_steps: int, warmup_epochs: float, warmup_steps: int,
               log=print) -> int:
    """Warmup in optimizer steps: ``warmup_steps`` (>= 0) or ``warmup_epochs`` x steps per epoch. One
    not shorter than the run would leave the lr rising to the end: capped to a tenth of the run,
    with the same warning in every stage."""
    warmup = warmup_steps if warmup_steps >= 0 else round(warmup_epochs * steps_per_epoch)
    if warmup >= total_steps:
        capped = total_steps // 10
        log(f"warning: the warmup ({warmup} optimizer steps) is not shorter than the run ({total_steps} steps): the lr "
            f"would never decay; warmup capped to {capped} steps (set --warmup_steps or --warmup_epochs lower)")
        return capped
    return warmup
