"""Import names from Hugging Face transformers even when run from this repository's root.

``python -m ...`` and ``python -m pytest`` put the working directory on ``sys.path``; from the repository
root its ``tokenizers/`` folder (our package, installed as ``beit.tokenizers``) then shadows Hugging Face's
``tokenizers``, which transformers imports lazily. The names are imported with that folder hidden.
"""
from __future__ import annotations

import sys
from pathlib import Path

_OURS = Path(__file__).resolve().parents[2] / "tokenizers"


def _shadows(entry: str) -> bool:
    return (Path(entry or ".").resolve() / "tokenizers") == _OURS


def transformers_names(*names: str) -> tuple:
    """``transformers.<name>`` for each name (an ImportError says to install the ``hf`` extra)."""
    stale = sys.modules.get("tokenizers")
    if stale is not None and Path(getattr(stale, "__file__", "") or "").resolve().parent == _OURS:
        del sys.modules["tokenizers"]
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if not _shadows(p)]
    try:
        try:
            import transformers
        except ImportError as e:
            raise ImportError(f"transformers is needed for this ({e}); pip install -e '.[hf]'") from None
        return tuple(getattr(transformers, n) for n in names)
    finally:
        sys.path[:] = saved
