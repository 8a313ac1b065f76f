"""Stop a run on SIGTERM, SIGINT or SIGUSR1 without losing a step.

Preemption (SLURM, Kubernetes eviction, spot reclaim) sends SIGTERM and SIGKILL after a grace period;
``sbatch --signal=USR1@N`` warns N seconds before the time limit; Ctrl-C sends SIGINT to every process of the
terminal. While a run holds ``stop_signals()`` these signals only set a flag. After every optimizer step the trainer
calls ``stop.check(accelerator, step, save)``: every rank learns whether any rank was signalled (one small
all-reduce, so a signal that reached one rank, or reached the ranks at different steps, stops them all at the same
step), and if so ``save()`` writes the checkpoint of that step and ``RunStopped`` is raised; ``beit.cli.call``
prints its one line and exits with ``EXIT_STOPPED``. Signals after the first are noted and ignored, so the save
completes (SIGKILL still ends a process at once; the atomic save then leaves the previous checkpoint as the resume
point). Any trainer hooks in with two lines::

    with stop_signals() as stop:
        ...                                                   # after each optimizer step, on every rank:
        stop.check(accelerator, step, lambda: save_checkpoint(...))
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from typing import Callable, Iterable, Iterator

from beit.runtime.faults import RunStopped

EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL: stopped on request with a checkpoint; rerun the same command to resume
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _note(text: str) -> None:
    """One line on stderr from a signal handler: os.write, since the handler may interrupt a print."""
    if _is_main_process():
        with contextlib.suppress(OSError):
            os.write(2, f"\n{text}\n".encode())


class StopSignals:
    """The process's stop request: the first stop signal received while installed (``signum``), repeats counted."""

    def __init__(self):
        self.signum: int | None = None
        self.repeats = 0
        self.forward: Callable[[], Iterable[int]] | None = None  # pids that get every stop signal passed on
        self._depth = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """A stop signal reached this process (not yet agreed with the other ranks)."""
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop signal"

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            _note(f"{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint and stopping")
        else:
            self.repeats += 1
            _note(f"{signal.Signals(signum).name} again: already stopping (the checkpoint is being written; kill -9 "
                  "ends it now and leaves the previous checkpoint as the resume point)")
        for pid in list(self.forward() if self.forward else ()):
            with contextlib.suppress(OSError):
                os.kill(pid, signum)

    def install(self) -> None:
        """Catch the stop signals in this process (nested: the outermost install decides; main thread only). A signal
        this process was started with ignored stays ignored, as Python itself does for SIGINT (a shell script's
        background job ignores Ctrl-C; ``ignore_stop_signals``)."""
        if self._depth == 0:
            if threading.current_thread() is not threading.main_thread():
                return  # signal handlers live in the main thread; a run in another thread is stopped by its owner
            self.signum, self.repeats, self.forward = None, 0, None
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS
                              if signal.getsignal(s) is not signal.SIG_IGN}
        self._depth += 1

    def uninstall(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            for s, previous in self._previous.items():
                signal.signal(s, previous)
            self._previous, self.forward = {}, None

    def due(self, accelerator=None) -> bool:
        """Whether any rank was signalled; every rank must call it at the same point (one all-reduce of the signal
        number when there are several processes). The first signal seen anywhere names the stop."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.requested
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0], dtype=torch.int32, device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed and self.signum is None:
            self.signum = agreed  # signalled elsewhere: this rank stops with the others
        return bool(agreed)

    def check(self, accelerator, step: int, save: Callable[[], object]) -> None:
        """After an optimizer step, on every rank: when a stop is due, ``save()`` (on every rank; returns the
        checkpoint's path), end the accelerator's trackers (their last events reach the disk) and raise
        ``RunStopped``."""
        if self.due(accelerator):
            path = save()
            if accelerator is not None:
                accelerator.end_training()
            raise self.stopped(step, path)

    def stopped(self, step: int, checkpoint) -> RunStopped:
        return RunStopped(f"stopped at step {step} on {self.name}; the checkpoint is {checkpoint}; rerun the same "
                          "command to resume", step=step, checkpoint=str(checkpoint))

    def raise_if_requested(self, where: str) -> None:
        """Between stages of a longer command: stop before starting ``where``."""
        if self.requested:
            raise RunStopped(f"stopped before {where} on {self.name}; rerun the same command to resume")


STOP = StopSignals()  # one per process: signal handlers are process-wide


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Hold the stop signals for a run (nested holds share the outermost one's request)."""
    STOP.install()
    try:
        yield STOP
    finally:
        STOP.uninstall()


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of data-loader workers: a Ctrl-C (the whole process group) or a SLURM signal (every
    process of the job) must not kill them while their training process finishes its step and saves; they end
    with it (and their own loader checks that it is still alive)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def run_child(cmd: list[str], **popen_kwargs) -> int:
    """Run a command to its end, passing every stop signal this process gets on to it (a training child then stops
    with its checkpoint); returns its exit status (negative: killed by that signal)."""
    with stop_signals() as stop:
        child = subprocess.Popen(cmd, **popen_kwargs)
        previous, stop.forward = stop.forward, (lambda: [child.pid])
        try:
            while child.poll() is None:
                time.sleep(0.1)
        finally:
            stop.forward = previous
    return child.returncode
