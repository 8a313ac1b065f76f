"""Are a model's weights and its optimizer's state finite? One fused reduction on the device, one sync."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch


def _named_state(accelerator) -> Iterable[tuple[str, torch.Tensor]]:
    """Every floating tensor ``accelerator.save_state`` would write: models, optimizers, registered objects."""
    for i, model in enumerate(accelerator._models):
        for k, v in model.state_dict().items():
            yield f"model{i or ''}.{k}", v
    for i, opt in enumerate(accelerator._optimizers):
        for pid, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                yield f"optimizer{i or ''}.state[{pid}].{k}", v
    for i, obj in enumerate(accelerator._custom_objects):
        sd = obj.state_dict() if hasattr(obj, "state_dict") else {}
        for k, v in (sd.items() if isinstance(sd, dict) else ()):
            yield f"custom{i}.{k}", v


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]], limit: int = 3) -> list[str]:
    """Names of (up to ``limit``) tensors holding a NaN or an Inf; [] when all are finite.

    Fast path: one ``torch._foreach_norm`` per (device, dtype) group, the norms stacked and reduced
    into a single flag, read with one ``.item()``. A norm can overflow for huge finite values, so
    only a non-finite flag triggers the exact (slow, rare) per-tensor pass that names the culprits.
    """
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for name, t in named:
        if torch.is_tensor(t) and t.is_floating_point() and t.numel():
            groups[(t.device, t.dtype)].append((name, t.detach()))
    if not groups:
        return []
    flags = []
    for items in groups.values():
        norms = torch._foreach_norm([t for _, t in items])
        flags.append(torch.stack([n.float() for n in norms]).isfinite().all())
    device = next(iter(groups))[0]
    if bool(torch.stack([f.to(device) for f in flags]).all().item()):
        return []
    bad = [name for items in groups.values() for name, t in items if not bool(t.isfinite().all())]
    return bad[:limit]


def state_nonfinite(accelerator, limit: int = 3) -> list[str]:
    """``nonfinite_names`` over everything the accelerator checkpoints, agreed by all ranks (a rank
    with a non-finite shard stops them all): [] when finite everywhere, else this rank's culprits
    (or ``["(on another rank)"]``)."""
    bad = nonfinite_names(_named_state(accelerator), limit)
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(bool(bad))], device=accelerator.device)
        if float(accelerator.reduce(flag, reduction="sum").item()) > 0 and not bad:
            bad = ["(on another rank)"]
    return bad
