"""Checkpoint integrity: every file's size and hash in the COMPLETE marker, verified before a resume.

A damaged checkpoint (a truncated, empty, garbled or missing file, a broken JSON, no marker) is
reported by path and reason and moved to ``checkpoints/damaged/`` (never deleted); the resume then
falls back to the newest intact checkpoint. Hash: xxh3-128 when ``xxhash`` is installed (~0.2 s/GB
on a 2-core AMD EPYC), else SHA-256 (~1.4 s/GB there).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

from beit.runtime.faults import RunFault

COMPLETE = "COMPLETE"
TRAIN_STATE = "train_state.json"
DAMAGED = "damaged"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")
_CHUNK = 8 << 20


def _hasher(name: str):
    if name == "xxh3_128":
        import xxhash
        return xxhash.xxh3_128()
    return hashlib.new(name)


def default_hash() -> str:
    try:
        import xxhash  # noqa: F401
        return "xxh3_128"
    except ImportError:
        return "sha256"


def hash_available(name: str) -> bool:
    try:
        _hasher(name)
        return True
    except (ImportError, ValueError):
        return False


def file_digest(path: Path, algo: str) -> str:
    h = _hasher(algo)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_manifest(folder: Path, algo: str | None = None) -> dict:
    """{"hash": algo, "files": {relative path: {"size", "hash"}}} of every file under ``folder``."""
    algo = algo or default_hash()
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != COMPLETE:
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "hash": file_digest(p, algo)}
    return {"hash": algo, "files": files}


def checkpoint_bytes(path: Path) -> int:
    """Size of a checkpoint on disk (from its marker when it lists the files)."""
    try:
        files = json.loads((path / COMPLETE).read_text()).get("files")
        if files:
            return sum(int(f["size"]) for f in files.values())
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        pass
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _json_reason(path: Path, what: str) -> str | None:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return f"{what} {path.name} is missing"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{what} {path.name} is not valid JSON ({e})"
    return None if isinstance(obj, dict) else f"{what} {path.name} is not a JSON object"


def verify_checkpoint(path: str | Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, or None when it is intact."""
    path = Path(path)
    marker = path / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} marker (the save never finished)"
    reason = _json_reason(marker, "the marker")
    if reason:
        return reason
    info = json.loads(marker.read_text())
    files, algo = info.get("files"), info.get("hash")
    if files is not None:
        if not isinstance(files, dict):
            return "the marker's file list is malformed"
        check_hash = hash_available(algo)
        if not check_hash:
            warnings.warn(f"{path}: its files were hashed with {algo}, which is not installed here "
                          f"(pip install xxhash); checking sizes only")
        for rel, rec in sorted(files.items()):
            f = path / rel
            if not f.is_file():
                return f"{rel} is missing"
            size = f.stat().st_size
            if size != rec.get("size"):
                return f"{rel} is {size} bytes, the marker records {rec.get('size')} (truncated or overwritten)"
            if check_hash and file_digest(f, algo) != rec.get("hash"):
                return f"{rel} does not match its recorded {algo} hash (its bytes were changed)"
    else:  # a checkpoint from before the file list: check what can be checked without loading it
        for name in ("model.safetensors", "optimizer.bin"):
            if (path / name).is_file() and (path / name).stat().st_size == 0:
                return f"{name} is empty"
    reason = _json_reason(path / TRAIN_STATE, "the train state")
    if reason:
        return reason
    world = json.loads((path / TRAIN_STATE).read_text()).get("world_size", 1)
    for r in range(int(world) if isinstance(world, int) else 1):
        reason = _json_reason(path / f"rank_{r}.json", f"rank {r}'s data position")
        if reason:
            return reason
        if "state" not in json.loads((path / f"rank_{r}.json").read_text()):
            return f"rank {r}'s data position rank_{r}.json has no 'state'"
    return None


def quarantine(path: Path, reason: str) -> Path:
    """Move a damaged checkpoint to ``checkpoints/damaged/`` with a REASON.txt; returns where it went."""
    dest_root = path.parent / DAMAGED
    dest_root.mkdir(exist_ok=True)
    dest = dest_root / path.name
    n = 1
    while dest.exists():
        dest, n = dest_root / f"{path.name}.{n}", n + 1
    os.rename(path, dest)
    try:
        (dest / "REASON.txt").write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {reason}\n")
    except OSError:
        pass
    return dest


def step_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``step_*`` folder (complete or not), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def select_resume(output_dir: str | Path, *, move_aside: bool, log: Callable[[str], None] = print) -> Path | None:
    """The newest intact checkpoint of ``output_dir`` (None: it has none at all, a fresh start).

    Damaged ones are reported (``log``) and, when ``move_aside`` (one process: rank 0), moved to
    ``checkpoints/damaged/``. Only damaged ones: RunFault, never a silent fresh start."""
    damaged = []
    for step, path in reversed(step_folders(output_dir)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        where = path
        if move_aside:
            try:
                where = quarantine(path, reason)
            except OSError as e:
                log(f"could not move {path} aside: {e}")
        log(f"checkpoint {path} is damaged: {reason}; " +
            (f"moved to {where}, " if where != path else "") + "falling back to an older one")
        damaged.append(f"  {path}: {reason}")
    if damaged:
        raise RunFault(
            f"no intact checkpoint to resume {output_dir} from; every one is damaged:\n" + "\n".join(damaged) +
            f"\nThey were moved to {Path(output_dir) / 'checkpoints' / DAMAGED} (nothing was deleted). To start "
            f"over, use a new --output_dir (or move {Path(output_dir) / 'checkpoints'} away).")
    return None


def remove_stale_temp(output_dir: str | Path) -> list[Path]:
    """Remove the half-written ``.tmp_step_*`` / ``.old_step_*`` folders a dead run left (call only
    while holding the run lock: no live writer then)."""
    root = Path(output_dir) / "checkpoints"
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if re.match(r"^\.(tmp|old)_step_\d+$", p.name):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone
