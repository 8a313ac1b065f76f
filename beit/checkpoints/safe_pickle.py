"""The one safe-loading policy for every file a user hands us (checkpoints, tokenizer weights).

safetensors are read as they are. A torch pickle is read weights-only: tensors, containers, numbers,
strings, plus the plain data records of :data:`ALLOWED_RECORDS` (``argparse.Namespace``: how unilm
stores its training ``args``). Anything else (whole pickled modules such as DALL-E's ``encoder.pkl``,
custom classes) is unpickled only when the caller passes ``trust_pickle=True`` -- the ``--trust_pickle
true`` option, spelt the same in every command -- because unpickling runs arbitrary code.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

ALLOWED_RECORDS = (argparse.Namespace,)
TRUST_PICKLE_HELP = ("unpickle files that hold more than tensors and plain data (e.g. DALL-E's encoder.pkl); "
                     "unpickling runs code: only for files you trust")


class UntrustedPickleError(ValueError):
    """A file that cannot be read weights-only and was not trusted."""


def load_torch_file(path: str | Path, *, trust_pickle: bool = False) -> object:
    """Read ``path`` (``.safetensors`` or a torch pickle) under the policy above."""
    import torch
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    try:
        with torch.serialization.safe_globals(list(ALLOWED_RECORDS)):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        if not _is_refusal(e):
            raise
        if not trust_pickle:
            import re
            m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            first = f"it needs {m.group(1)}" if m else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UntrustedPickleError(
                f"{path} holds Python objects other than tensors and plain data ({first}); unpickling it would "
                "run code, so it is refused. If you trust the file, pass --trust_pickle true (Python: "
                "trust_pickle=True); better, convert it once to safetensors and use that.") from None
    return torch.load(str(path), map_location="cpu", weights_only=False)


def _is_refusal(e: Exception) -> bool:
    """weights-only refusals come as UnpicklingError (sometimes wrapped); real I/O errors must pass through."""
    text = str(e)
    return isinstance(e, pickle.UnpicklingError) or "weights_only" in text or "Weights only load failed" in text
