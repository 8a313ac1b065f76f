"""Alternating timed rounds and their medians."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def alternate(fns: dict[str, Callable[[], None]], rounds: int, reps: int = 1, warmup: int = 1) -> dict[str,
                                                                                                       list[float]]:
    """Seconds per call of each function: ``warmup`` untimed calls each, then ``rounds`` rounds in
    which every function runs ``reps`` times in turn (ours, peer, ours, peer, ...)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            out[name].append((time.perf_counter() - t0) / reps)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """(max - min) / median of the rounds: how noisy the machine was."""
    m = statistics.median(xs)
    return round((max(xs) - min(xs)) / m, 3) if m else 0.0


def rnd(x: float, digits: int = 3) -> float:
    return float(f"{x:.{digits}g}") if x else 0.0
