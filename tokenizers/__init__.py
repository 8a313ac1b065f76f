"""Frozen visual tokenizers: images -> LongTensor[B, h, w] (imported as beit.tokenizers).

``load_tokenizer(kind, path=None, **kw)`` is the one entry point the pretraining loop uses; the
loop never needs to know which kind it got.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from beit.tokenizers.base import VisualTokenizer

# kind -> (module, loader function, what it is); modules are imported lazily (vqkd needs timm, dalle needs dall_e).
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "kmeans": ("beit.tokenizers.kmeans", "load_kmeans", "k-means visual words fit on your own shards (offline)"),
    "dalle": ("beit.tokenizers.dalle", "load_dalle", "OpenAI DALL-E dVAE encoder (8192 codes), converted weights"),
    "vqkd": ("beit.tokenizers.vqkd", "load_vqkd", "BEiT v2 VQ-KD tokenizer (official vqkd_encoder_*.pth, or trained "
             "with `beit tokenizer train vqkd`)"),
    "dvae": ("beit.tokenizers.dvae", "load_dvae", "small discrete VAE trained on your shards"),
}
TOKENIZER_KINDS: tuple[str, ...] = tuple(_REGISTRY)


def load_tokenizer(kind: str, path: str | Path | None = None, **kw: Any) -> VisualTokenizer:
    """Build a frozen tokenizer of ``kind`` (one of TOKENIZER_KINDS) from ``path``.

    ``kw`` go to the kind's loader (e.g. ``trust_pickle=True`` for an official DALL-E ``encoder.pkl``;
    see ``beit.checkpoints.safe_pickle`` -- kinds that never unpickle ignore it;
    ``input_size=`` to change the tokenizer view). Errors say how to obtain the weights.
    """
    if kind not in _REGISTRY:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {list(TOKENIZER_KINDS)}")
    module, fn, _ = _REGISTRY[kind]
    loader = getattr(importlib.import_module(module), fn)
    if "trust_pickle" in kw and "trust_pickle" not in inspect.signature(loader).parameters:
        kw.pop("trust_pickle")  # this kind reads only safetensors + JSON: nothing to trust
    tok = loader(path, **kw)
    if not isinstance(tok, VisualTokenizer):
        raise TypeError(f"loader for {kind!r} returned {type(tok).__name__}, not a VisualTokenizer")
    return tok.freeze()


def describe_kinds() -> str:
    """One line per kind, for --help texts."""
    return "\n".join(f"  {k}: {v[2]}" for k, v in _REGISTRY.items())


__all__ = ["VisualTokenizer", "load_tokenizer", "TOKENIZER_KINDS", "describe_kinds"]
