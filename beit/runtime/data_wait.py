"""The share of a training loop's wall time spent waiting for its data loader."""
from __future__ import annotations

import time


class DataWait:
    """Wraps a loader: wall time spent waiting for its batches, and the wall time since ``reset``."""

    def __init__(self, loader):
        self.loader = loader
        self.reset()

    def reset(self) -> None:
        self.waited, self.t0 = 0.0, time.perf_counter()

    def fraction(self) -> float:
        return self.waited / max(time.perf_counter() - self.t0, 1e-9)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.waited += time.perf_counter() - t
            yield batch
