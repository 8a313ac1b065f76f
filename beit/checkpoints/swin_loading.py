"""Load our Swin BEiT pretraining output (``pretrained.safetensors`` of ``--arch swin_*``) into a timm
``SwinTransformer`` classifier or segmentation backbone.

The pretraining checkpoint holds timm's own Swin key names plus the pretraining-only ``mask_token``,
``mim_up``, ``mim_norm`` and ``lm_head``; those are dropped, timm's ``checkpoint_filter_fn`` resizes
relative position tables for another window size, and every encoder key of the target model must
be filled (only the new classifier head ``head.*`` may be missing), else it is an error.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from beit.checkpoints.loading import CheckpointMismatchError, LoadReport, read_state_dict


def swin_pretrain_config(path: str | Path) -> dict | None:
    """The ``model`` config recorded beside a Swin pretraining checkpoint (``<stem>.json``), or None."""
    p = Path(path)
    if p.is_dir():
        p = p / "pretrained.safetensors"
    meta = p.with_suffix(".json")
    if not meta.is_file():
        return None
    model = json.loads(meta.read_text()).get("model") or {}
    return model if str(model.get("arch", "")).startswith("swin") else None


def swin_timm_kwargs(pretrain_config: dict) -> dict:
    """The timm constructor overrides of a Swin pretraining config (architecture only)."""
    from beit.modeling.swin_mim import SWIN_ARGS
    return {k: pretrain_config[k] for k in SWIN_ARGS if k in pretrain_config}


def load_swin_encoder(model: nn.Module, source: str | Path | dict[str, torch.Tensor]) -> LoadReport:
    """Copy a Swin pretraining (or plain timm Swin) state dict into ``model`` (a timm SwinTransformer).

    Raises :class:`CheckpointMismatchError` if any encoder tensor of ``model`` is left without a value
    or a shape cannot be made to fit."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    from beit.modeling.swin_mim import is_mim_only_key
    sd, name = (dict(source), "<state dict>") if isinstance(source, dict) else (read_state_dict(source), str(source))
    report = LoadReport(source=name, kind="Swin BEiT pretraining" if "mask_token" in sd else "Swin encoder")
    report.dropped = sorted(k for k in sd if is_mim_only_key(k) or k.startswith("head."))
    sd = {k: v for k, v in sd.items() if k not in set(report.dropped)}
    target = model.state_dict()
    try:
        sd = checkpoint_filter_fn(sd, model)
    except (RuntimeError, ValueError) as e:
        raise CheckpointMismatchError(f"{name}: cannot adapt the Swin weights to this model: {e}") from None
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
           for k, v in sd.items() if k in target and v.shape != target[k].shape]
    if bad:
        raise CheckpointMismatchError(f"{name}: shapes differ ({'; '.join(bad[:4])}); build the model with the "
                                      "pretraining run's Swin sizes (they are in pretrained.json)")
    result = model.load_state_dict(sd, strict=False)
    report.loaded = sorted(k for k in sd if k in target)
    report.missing = sorted(result.missing_keys)
    report.unexpected = sorted(result.unexpected_keys)
    encoder_missing = [k for k in report.missing if not k.startswith("head.")]
    if encoder_missing or report.unexpected:
        raise CheckpointMismatchError(
            f"{name} does not fit this Swin: missing encoder tensors {encoder_missing[:6]}, unexpected "
            f"{report.unexpected[:6]}; build it with the pretraining run's Swin sizes (pretrained.json)")
    return report
