"""One writer per run folder, and no training process outliving its launcher.

``hold_output_dir`` takes an exclusive ``fcntl.flock`` on ``output_dir/.run.lock`` for the run's
life; the OS drops it when the process dies, so a crash leaves nothing to clean up. A second run on
the same folder is refused with the holder's host and PID. ``end_with_launcher`` asks Linux to
SIGTERM this process when its parent (``accelerate launch`` / ``torchrun``) dies.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from beit.runtime.faults import RunFault, SetupError

LOCK_NAME = ".run.lock"
PR_SET_PDEATHSIG = 1
_LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_BACKEND")  # set by torchrun / accelerate launch


class OutputDirError(SetupError):
    """output_dir cannot be used (a file, read-only, not creatable): bad input, a message."""


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"host {info['host']}, PID {info['pid']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse an output_dir that is a file (a read-only check, for the start-up checks)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir {out} is a file, not a folder: pass a folder path (new or existing) "
                             "as --output_dir")


def _writable_dir(out: Path) -> None:
    check_output_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"cannot create output_dir {out}: {e.strerror}; pass a writable --output_dir") from None


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@contextlib.contextmanager
def hold_output_dir(output_dir: str | Path, *, is_main: bool = True) -> Iterator[None]:
    """Hold the run lock of ``output_dir`` (only on the main process; the others just proceed)."""
    if not is_main:
        yield
        return
    import fcntl

    out = Path(output_dir)
    created = not out.exists()
    _writable_dir(out)
    path = out / LOCK_NAME
    try:
        fd = _open_lock(path)
    except OSError as e:
        kind = "read-only" if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else "not usable"
        raise OutputDirError(f"output_dir {out} is {kind} ({e.strerror}): pass a writable --output_dir") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFault(f"output_dir {out} is in use by another run ({_holder(fd)}); a folder takes one run at a "
                           f"time. Wait for that run to end (or stop it), or pass another --output_dir.") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                      "started": time.time()}).encode(), 0)
        except OSError as e:
            raise OutputDirError(f"cannot write to output_dir {out} ({e.strerror}): pass a writable "
                                 "--output_dir") from None
        yield
    finally:
        if created and [p.name for p in out.iterdir()] == [LOCK_NAME]:  # a new run refused before writing
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        os.close(fd)  # also releases the lock


def end_with_launcher() -> None:
    """When started by a launcher, die (SIGTERM) with it instead of training on as an orphan
    (Linux only; elsewhere a no-op). A run started from a shell is left alone (``nohup`` works)."""
    if not sys.platform.startswith("linux") or not any(k in os.environ for k in _LAUNCHER_ENV):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def is_main_process() -> bool:
    """Rank 0 of the launch (before an Accelerator exists)."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    """Processes of the launch (before an Accelerator exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def main_print(msg: str) -> None:
    """Print on the main process only (before the run's logger exists)."""
    if is_main_process():
        print(msg, flush=True)


@contextlib.contextmanager
def open_run(output_dir: str | Path, resume: bool = True) -> Iterator[Path | None]:
    """Hold ``output_dir`` for this run (one writer per folder) and yield the checkpoint to resume: the newest
    intact one (damaged ones are moved aside, stale temp folders removed, by the main process), or None."""
    from beit.checkpoints.integrity import remove_stale_temp, select_resume

    rank0 = is_main_process()
    with hold_output_dir(output_dir, is_main=rank0):
        latest = None
        if resume:
            if rank0:
                remove_stale_temp(output_dir)
            warn = (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True)) if rank0 else (lambda m: None)
            latest = select_resume(output_dir, move_aside=rank0, log=warn)
        yield latest
