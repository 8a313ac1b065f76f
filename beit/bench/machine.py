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


SQUARES = (512, 1024, 2048)
MAX_SHAPES = 24  # of a step's own matmul shapes, the largest by FLOPs


def step_matmul_shapes(step) -> list[tuple[int, int, int, int, bool, bool]]:
    """The distinct matmul shapes one call of ``step`` runs, as ``(batch, m, k, n, a transposed, b transposed)``
    (mm, addmm, bmm, baddbmm as dispatched: after autocast, forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    aten = torch.ops.aten
    ops = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2), aten.bmm.default: (0, 1),
           aten.baddbmm.default: (1, 2)}
    shapes: set = set()

    def transposed(t: torch.Tensor) -> bool:
        return not t.is_contiguous() and t.transpose(-1, -2).is_contiguous()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                ia, ib = ops[func]
                a, b = args[ia], args[ib]
                batch = a.shape[0] if a.dim() == 3 else 1
                shapes.add((batch, a.shape[-2], a.shape[-1], b.shape[-1], transposed(a), transposed(b)))
            return func(*args, **(kwargs or {}))
    with Record():
        step()
    return sorted(shapes, key=lambda s: -s[0] * s[1] * s[2] * s[3])[:MAX_SHAPES]


class MatmulPeak:
    """An upper bound of the matmul FLOP/s of this process in ``dtype`` at its thread count, the denominator of
    MFU: the best of every shape (squares, and the step's own shapes with their layouts) over every call of
    :meth:`measure` (call it between the step's timed rounds, so a load change moves both)."""

    def __init__(self, dtype: torch.dtype, device: torch.device, shapes=(), squares=SQUARES):
        self.dtype, self.device, self.threads = dtype, device, torch.get_num_threads()
        self.best, self.best_shape = 0.0, None
        self.operands = {}
        for shape in sorted({*shapes, *((1, n, n, n, False, False) for n in squares)}):
            b, m, k, n, ta, tb = shape
            x = torch.randn(b, k, m, device=device).transpose(1, 2) if ta else torch.randn(b, m, k, device=device)
            y = torch.randn(b, n, k, device=device).transpose(1, 2) if tb else torch.randn(b, k, n, device=device)
            x, y = x.to(dtype), y.to(dtype)
            self.operands[shape] = (x[0], y[0]) if b == 1 else (x, y)

    def measure(self, seconds: float = 0.5) -> float:
        """Time every shape (at least twice, about ``seconds`` in all) and return the best FLOP/s so far."""
        per = seconds / len(self.operands)
        for shape, (x, y) in self.operands.items():
            b, m, k, n = shape[:4]
            mm = torch.bmm if x.dim() == 3 else torch.mm
            mm(x, y)
            sync(self.device)
            reps, t_end = 0, time.perf_counter() + per
            while reps < 2 or time.perf_counter() < t_end:
                t0 = time.perf_counter()
                mm(x, y)
                sync(self.device)
                rate = 2 * b * m * k * n / (time.perf_counter() - t0)
                if rate > self.best:
                    self.best, self.best_shape = rate, shape
                reps += 1
        return self.best

    def describe(self) -> dict:
        b, m, k, n, ta, tb = self.best_shape
        layout = f" ({'A' if ta else ''}{'B' if tb else ''} transposed)" if ta or tb else ""
        return {"tflops": self.best / 1e12, "best_shape": f"batch {b}: {m}x{k} @ {k}x{n}{layout}",
                "shapes_timed": len(self.operands), "dtype": str(self.dtype).replace("torch.", ""),
                "threads": self.threads}

