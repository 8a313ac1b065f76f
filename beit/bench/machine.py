"""The machine a benchmark ran on: CPU/GPU model, capability, threads, load, library versions, and
the matmul peak (FLOP/s) measured in the same run, the denominator of MFU."""
from __future__ import annotations

import os
import platform
import time

import torch

from beit.runtime.precision import cpu_capability, cpu_model


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in ("torch", "timm", "transformers", "accelerate", "webdataset", "pillow", "numpy", "DALL-E"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def machine_info(device: torch.device) -> dict:
    info = {"cpu": cpu_model(), "cpu_capability": cpu_capability(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "device": str(device), "versions": versions()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": p.name, "cuda_arch": f"sm_{p.major}{p.minor}",
                       "memory_gib": round(p.total_memory / 2**30, 1),
                       "bf16": torch.cuda.is_bf16_supported(), "cuda": torch.version.cuda}
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 1024, seconds: float = 0.5) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` over a few timed repeats (about ``seconds``)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n ** 3 / dt)
        if time.perf_counter() > t_end:
            return best
