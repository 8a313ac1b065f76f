"""AdamW and its parameter groups: no weight decay on biases, norms, tokens and position tables."""
from __future__ import annotations

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
