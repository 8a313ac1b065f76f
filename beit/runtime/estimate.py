"""The run's estimated time, printed once from its first measured optimizer steps."""
from __future__ import annotations

import time


def duration(seconds: float) -> str:
    """'45 s', '4.8 min', '2.3 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class TimeEstimate:
    """Call after every optimizer step; once ``min_steps`` steps and ``min_seconds`` have passed since the first
    (the first step, with its warm-up, is not measured) it logs the estimated time of the remaining steps."""

    def __init__(self, total_steps: int, log, *, min_steps: int = 5, min_seconds: float = 3.0,
                 max_steps: int = 50, extra: str = ""):
        self.total, self.log, self.extra = total_steps, log, extra
        self.min_steps, self.min_seconds, self.max_steps = min_steps, min_seconds, max_steps
        self.start: tuple[int, float] | None = None
        self.done = False

    def __call__(self, step: int) -> None:
        if self.done:
            return
        now = time.perf_counter()
        if self.start is None:
            self.start = (step, now)
            return
        first, t0 = self.start
        steps, seconds = step - first, now - t0
        if step < self.total and steps < self.max_steps and (steps < self.min_steps or seconds < self.min_seconds):
            return
        self.done = True
        if step >= self.total:  # finished before there was anything to estimate
            return
        per_step = seconds / max(1, steps)
        left = (self.total - step) * per_step
        self.log(f"estimated time: {duration(left)} for the remaining {self.total - step:,} of {self.total:,} steps "
                 f"({per_step:.3f} s/step, measured over steps {first + 1}-{step}{self.extra}; other work on the "
                 "machine changes it)")
