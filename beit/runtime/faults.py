"""The two kinds of failure every command reports with a message instead of a traceback (``beit.cli.call``
turns them into exit codes): bad input found before any compute (2), and a fault during the run (1)."""
from __future__ import annotations


class SetupError(ValueError):
    """A problem with the inputs, found before any compute (exit code 2, like any ValueError)."""


class RunFault(RuntimeError):
    """A fault the run cannot recover from by itself (non-finite state, no intact checkpoint, a full
    disk, a second run on the same output_dir, too many bad samples); the message says what happened and
    what to do (exit code 1)."""


class NonFiniteLossError(RunFault):
    """A training loss was NaN or Inf (pretraining: for too many consecutive steps; VQ-KD: once)."""
