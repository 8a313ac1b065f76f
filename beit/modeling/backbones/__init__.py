"""Backbones: the encoder families that pretraining builds (``--arch``) and fine-tuning builds (``--model``).

Each family is one module here with a ``Backbone`` subclass (``base.py`` says what one provides), registered
in ``_REGISTRY`` below and imported lazily, as ``beit.tokenizers`` does: adding a backbone is one new module
and one line here. A name belongs to the first family that claims it: ``beit``; ``swin_*`` (a timm Swin
Transformer); ``vit_*`` (a timm Vision Transformer); any other timm model fine-tunes as a plain timm
classifier (``timm``, no pretraining).
"""
from __future__ import annotations

import importlib
from functools import lru_cache

from beit.modeling.backbones.base import Backbone

# family -> (module, class, what it is); the last family claims every remaining name
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "beit": ("beit.modeling.backbones.beit", "BeitBackbone", "the BEiT ViT: relative position bias, layer scale"),
    "swin": ("beit.modeling.backbones.swin", "SwinBackbone", "a timm Swin Transformer (swin_tiny_patch4_window7_224)"),
    "vit": ("beit.modeling.backbones.vit", "VitBackbone", "a plain timm ViT (vit_small_patch16_224)"),
    "timm": ("beit.modeling.backbones.timm_models", "TimmBackbone", "any other timm model (fine-tuning only)"),
}


@lru_cache(maxsize=None)
def _family(name: str) -> Backbone:
    module, cls, _ = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)()


def backbone_for(name: str, *, pretraining: bool = False) -> Backbone:
    """The backbone family that builds ``name`` (checked: a clear error for a name it cannot build);
    ``pretraining``: only families with a masked-image-modelling model."""
    for family in _REGISTRY:
        backbone = _family(family)
        if backbone.claims(name):
            if pretraining and not backbone.pretrains:
                raise ValueError(f"--arch {name!r}: no BEiT pretraining for it; choose one of: {describe(True)}")
            backbone.check_name(name)
            return backbone
    raise ValueError(f"unknown backbone {name!r}; choose one of: {describe(pretraining)}")


def describe(pretraining: bool = False) -> str:
    """The families, one phrase each (for messages and --help)."""
    return "; ".join(f"{k}: {v[2]}" for k, v in _REGISTRY.items() if not pretraining or _family(k).pretrains)


__all__ = ["Backbone", "backbone_for", "describe"]
