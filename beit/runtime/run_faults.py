"""Faults found while a run is going (not bad input at start-up): printed as a message, not a traceback."""
from __future__ import annotations


class RunFault(RuntimeError):
    """A fault the run cannot recover from by itself (non-finite state, no intact checkpoint, a full
    disk, a second run on the same output_dir); the message says what happened and what to do."""
