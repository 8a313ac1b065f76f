"""AdamW parameter groups and the per-step warmup + cosine schedules for lr and weight decay.

Shared by pretraining and fine-tuning. A parameter group may carry an ``lr_scale`` key (layer-wise
lr decay on the fine-tune side); the scheduler multiplies the scheduled lr by it. Groups created
with ``weight_decay == 0`` (biases, norms, tokens) stay at 0; every other group follows the
weight-decay schedule.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch


def no_weight_decay_names(model: torch.nn.Module, extra: Iterable[str] = ()) -> set[str]:
    """Names excluded from weight decay: 1-D params (biases, norm weights, layer scale), and the
    model's own ``no_weight_decay()`` names (tokens, position tables), plus ``extra``."""
    skip = set(extra)
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    names = set()
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            names.add(name)
            continue
        # the model may name a module prefix (e.g. "rel_pos_bias.relative_position_bias_table")
        if any(name.startswith(s + ".") or name.endswith("." + s) for s in skip):
            names.add(name)
    return names


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float,
                              extra_no_decay: Iterable[str] = ()) -> list[dict]:
    """Two AdamW groups: ``decay`` (weight_decay) and ``no_decay`` (0). Frozen params are left out."""
    skip = no_weight_decay_names(model, extra_no_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip else decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create_adamw(param_groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the lr and weight decay are then driven by the scheduler.

    ``fused``: torch's fused AdamW kernel (CPU and CUDA): one pass over each parameter instead of
    torch's default per-tensor loop on CPU; the same update up to float rounding."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


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
