"""Load a timm encoder's pretraining output (our ``pretrained.safetensors`` of ``--arch swin_*`` / ``vit_*``) or
plain timm weights into a timm classifier or segmentation backbone.

The pretraining checkpoint holds timm's own key names plus the pretraining-only tensors (``mask_token``,
the masked-token head); those are dropped, the model family's timm ``checkpoint_filter_fn`` adapts what
timm adapts (relative position tables for another window, absolute position embeddings for another grid),
and every encoder key of the target model must be filled (only the new classifier head ``head.*`` may be
missing), else it is an error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from beit.checkpoints.loading import CheckpointMismatchError, LoadReport, read_state_dict


def load_timm_encoder(model: nn.Module, source: str | Path | dict[str, torch.Tensor], *, kind: str,
                      pretraining_only: Callable[[str], bool], filter_fn) -> LoadReport:
    """Copy a pretraining (or plain timm) state dict of the ``kind`` family into ``model`` (a timm model of it).

    ``pretraining_only(key)`` names the keys that exist only for pretraining; ``filter_fn`` is timm's
    ``checkpoint_filter_fn`` of the family. Raises :class:`CheckpointMismatchError` if any encoder tensor of
    ``model`` is left without a value or a shape cannot be made to fit."""
    sd, name = (dict(source), "<state dict>") if isinstance(source, dict) else (read_state_dict(source), str(source))
    report = LoadReport(source=name, kind=f"{kind} BEiT pretraining" if "mask_token" in sd else f"{kind} encoder")
    report.dropped = sorted(k for k in sd if pretraining_only(k) or k.startswith("head."))
    sd = {k: v for k, v in sd.items() if k not in set(report.dropped)}
    target = model.state_dict()
    try:
        sd = filter_fn(sd, model)
    except (RuntimeError, ValueError) as e:
        raise CheckpointMismatchError(f"{name}: cannot adapt the {kind} weights to this model: {e}") from None
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
           for k, v in sd.items() if k in target and v.shape != target[k].shape]
    if bad:
        raise CheckpointMismatchError(f"{name}: shapes differ ({'; '.join(bad[:4])}); build the model with the "
                                      f"pretraining run's {kind} sizes (they are in pretrained.json)")
    result = model.load_state_dict(sd, strict=False)
    report.loaded = sorted(k for k in sd if k in target)
    report.missing = sorted(result.missing_keys)
    report.unexpected = sorted(result.unexpected_keys)
    encoder_missing = [k for k in report.missing if not k.startswith("head.")]
    if encoder_missing or report.unexpected:
        raise CheckpointMismatchError(
            f"{name} does not fit this {kind}: missing encoder tensors {encoder_missing[:6]}, unexpected "
            f"{report.unexpected[:6]}; build it with the pretraining run's {kind} sizes (pretrained.json)")
    return report
