"""What the machine computes fast, and the ``mixed_precision auto`` choice built on it.

Detected, never guessed: the CPU's instruction-set flags (``/proc/cpuinfo``) and torch's own
vectorisation level (``torch.backends.cpu.get_cpu_capability()``). bf16 is *fast* on a CPU only
with AMX (``amx_bf16``) or AVX-512-BF16 (``avx512_bf16``): there bf16 matmuls run several times
faster than fp32; on AVX2-only CPUs bf16 is emulated and slower than fp32, so fp32 stays.
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability(flags=None, torch_capability: str | None = None) -> dict:
    """{"torch": torch's vector level, "avx2", "avx512", "avx512_bf16", "amx", "fast_bf16"} from a
    flag set (default: this CPU's) and torch's capability string (default: this torch's)."""
    if flags is None:
        flags = cpu_flags()
    if torch_capability is None:
        import torch
        torch_capability = torch.backends.cpu.get_cpu_capability()
    flags = set(flags)
    cap = {"torch": torch_capability,
           "avx2": "avx2" in flags or torch_capability in ("AVX2", "AVX512"),
           "avx512": "avx512f" in flags or torch_capability == "AVX512",
           "avx512_bf16": "avx512_bf16" in flags,
           "amx": {"amx_bf16", "amx_tile"} <= flags}
    # torch built without AVX-512 kernels (or running with ATEN_CPU_CAPABILITY lowered) cannot use them
    cap["fast_bf16"] = (cap["amx"] or cap["avx512_bf16"]) and torch_capability == "AVX512"
    return cap


def cpu_has_fast_bf16(flags=None, torch_capability: str | None = None) -> bool:
    return cpu_capability(flags, torch_capability)["fast_bf16"]


def _cpu_forced() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")


def resolve_mixed_precision(choice: str, *, cpu_fast_bf16: bool | None = None) -> str | None:
    """``auto``: the launcher's fp16/bf16 if ``accelerate launch`` set one (its default "no" is not a
    choice; None is returned so Accelerate reads it), else bf16 on GPUs that support it, fp16 on
    other GPUs, bf16 on CPUs with fast bf16 (AMX / AVX-512-BF16), fp32 ("no") on other CPUs.
    Any other choice is returned as given."""
    if choice != "auto":
        return choice
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower() not in ("", "no"):
        return None
    import torch
    if torch.cuda.is_available() and not _cpu_forced():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    fast = cpu_has_fast_bf16() if cpu_fast_bf16 is None else cpu_fast_bf16
    return "bf16" if fast else "no"
