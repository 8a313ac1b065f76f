"""How a command ends other than by finishing, each reported with one line instead of a traceback (``beit.cli.call``
turns them into exit codes): bad input found before any compute (2), a fault during the run (1), and a stop on a
signal after a checkpoint (75, ``beit.runtime.stopping``)."""
from __future__ import annotations


class SetupError(ValueError):
    """A problem with the inputs, found before any compute (exit code 2, like any ValueError)."""


class RunFault(RuntimeError):
    """A fault the run cannot recover from by itself (non-finite state, no intact checkpoint, a full
    disk, a second run on the same output_dir, too many bad samples); the message says what happened and
    what to do (exit code 1)."""


class NonFiniteLossError(RunFault):
    """A training loss was NaN or Inf (pretraining: for too many consecutive steps; VQ-KD: once)."""


class RunStopped(Exception):
    """The run stopped on SIGTERM / SIGINT / SIGUSR1 after writing a checkpoint (``step``, ``checkpoint``); the
    message is the one line to print, e.g. ``stopped at step N on SIGTERM; the checkpoint is ...; rerun the same
    command to resume`` (exit code 75). Not a RunFault: nothing went wrong."""

    def __init__(self, message: str, step: int | None = None, checkpoint: str | None = None):
        super().__init__(message, step, checkpoint)
        self.message, self.step, self.checkpoint = message, step, checkpoint

    def __str__(self) -> str:
        return self.message
