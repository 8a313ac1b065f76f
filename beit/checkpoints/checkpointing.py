"""Atomic, resumable training checkpoints (Accelerate state + our JSON state) and weight export.

Layout::

    output_dir/checkpoints/step_0001000/   model.safetensors, optimizer.bin, random_states_<rank>.pkl,
                                           (scaler.pt), train_state.json, rank_<r>.json, COMPLETE

A checkpoint is written into ``.tmp_step_XXXXXXX`` by every rank; each rank then writes its own
``rank_<r>.json`` (data position), all ranks meet at a barrier, and only then does rank 0 check that
every rank's part is there, write ``COMPLETE`` and rename the folder to ``step_XXXXXXX``. A folder
without ``COMPLETE`` (a crash mid-save, a dead rank) is never resumed from. The filesystem under
``output_dir`` must be shared by all ranks (as on any multi-node cluster setup).

Nothing poisoned or partial is marked complete: before writing, every weight and optimizer-state
tensor is checked finite (one fused reduction) and the free space against the last checkpoint's
size; ``COMPLETE`` records every file's size and hash (``checkpoint_integrity``), which a resume
verifies; a failed write removes its temp folder. These faults raise ``RunFault`` with a message.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file

from beit.checkpoints.integrity import COMPLETE, TRAIN_STATE, checkpoint_bytes, file_manifest
from beit.runtime.faults import RunFault
from beit.runtime.finite_check import nonfinite_names, state_nonfinite

CHECKPOINTS = "checkpoints"
SPACE_MARGIN = 1.1  # free space wanted before a save: the last checkpoint's size x this
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step:07d}"


def list_complete(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest_complete(output_dir: str | Path) -> Path | None:
    """The newest checkpoint folder that every rank finished writing, or None."""
    done = list_complete(output_dir)
    return done[-1][1] if done else None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all), and stale temp
    folders older than the newest complete one. Returns what was removed."""
    done = list_complete(output_dir)
    removed = []
    if keep_last > 0:
        for _, p in done[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    newest = done[-1][0] if done else -1
    root = Path(output_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(".tmp_step_*"):
            m = re.match(r"^\.tmp_step_(\d+)$", p.name)
            if m and int(m.group(1)) <= newest:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _any_rank(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum").item()) > 0


def _gb(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


def _state_bytes(accelerator) -> int:
    """Bytes of the tensors a save writes (a lower bound for the first checkpoint's size)."""
    total = 0
    for m in accelerator._models:
        total += sum(t.numel() * t.element_size() for t in m.state_dict().values() if torch.is_tensor(t))
    for o in accelerator._optimizers:
        total += sum(v.numel() * v.element_size() for st in o.state_dict()["state"].values()
                     for v in st.values() if torch.is_tensor(v))
    return total


def space_needed(accelerator, output_dir: str | Path) -> int:
    """Bytes a new checkpoint needs: the last complete one's size (or the state's tensor bytes) x margin."""
    last = find_latest_complete(output_dir)
    size = checkpoint_bytes(last) if last is not None else 0
    return int(max(size, _state_bytes(accelerator)) * SPACE_MARGIN)


def _last_good(output_dir) -> str:
    last = find_latest_complete(output_dir)
    return f"the last good checkpoint is {last}" if last else "there is no earlier checkpoint"


def _seal(tmp: Path, final: Path, step: int, world: int) -> None:
    """Mark a written temp folder complete (every file's size and hash) and move it into place atomically."""
    _write_json(tmp / COMPLETE, {"step": step, "world_size": world, "time": time.time(), **file_manifest(tmp)})
    if final.exists():  # a re-save of the same step (e.g. the final step after a resume)
        trash = final.with_name(".old_" + final.name)
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def save_tensor_checkpoint(output_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], train_state: dict,
                           rank_state: dict | None = None) -> Path:
    """A one-process checkpoint without Accelerate (``state.safetensors`` + the JSON parts, e.g. the k-means fit),
    written and verified like ``save_checkpoint``'s; ``load_tensor_checkpoint`` reads it back."""
    final = checkpoint_path(output_dir, step)
    tmp = final.with_name(".tmp_" + final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        _write_json(tmp / "rank_0.json", {"rank": 0, "world_size": 1, "state": rank_state})
        _write_json(tmp / TRAIN_STATE, dict(train_state, step=step, world_size=1))
        _seal(tmp, final, step, 1)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunFault(f"step {step}: writing the checkpoint {final} failed ({e}); the partial {tmp.name} was "
                       f"removed; {_last_good(output_dir)}") from e
    return final


def load_tensor_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    """(tensors, train_state, rank_state) of a ``save_tensor_checkpoint`` folder."""
    path = Path(path)
    return (load_file(str(path / "state.safetensors")), json.loads((path / TRAIN_STATE).read_text()),
            json.loads((path / "rank_0.json").read_text())["state"])


def save_checkpoint(accelerator, output_dir: str | Path, step: int, train_state: dict,
                    rank_state: dict | None = None, keep_last: int = 0) -> Path:
    """Save a complete checkpoint for optimizer step ``step``; call on EVERY rank.

    ``train_state`` (JSON, rank 0's copy is kept) holds step/epoch/scheduler/config hash;
    ``rank_state`` (JSON, one per rank) holds what differs per rank, e.g. ``loader.state_dict()``.
    Raises RunFault (nothing marked complete, no temp folder left) for a non-finite state, too
    little free space or a failed write.
    """
    final = checkpoint_path(output_dir, step)
    tmp = final.with_name(".tmp_" + final.name)
    rank, world = accelerator.process_index, accelerator.num_processes
    bad = state_nonfinite(accelerator)
    if bad:
        raise RunFault(f"step {step}: the weights or optimizer state hold NaN/Inf (e.g. {', '.join(bad)}); this state "
                       f"was not saved, {_last_good(output_dir)}. Training diverged: lower --lr, lengthen the warmup "
                       f"or lower --clip_grad, then rerun the same command to resume from the last good checkpoint.")
    need = space_needed(accelerator, output_dir)
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if _any_rank(accelerator, accelerator.is_main_process and free < need):
        raise RunFault(f"step {step}: not enough free space for a checkpoint in {root}: about {_gb(need)} needed, "
                       f"{_gb(free)} free. Free some space (or lower --keep_last), then rerun the same command "
                       f"to resume; {_last_good(output_dir)}.")
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        _write_json(tmp / f"rank_{rank}.json", {"rank": rank, "world_size": world, "state": rank_state})
        if accelerator.is_main_process:
            _write_json(tmp / TRAIN_STATE, dict(train_state, step=step, world_size=world))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            missing = [r for r in range(world) if not (tmp / f"rank_{r}.json").is_file()]
            if missing:
                raise RuntimeError(f"checkpoint {tmp}: ranks {missing} did not write their part; not marking it "
                                   "complete")
            _seal(tmp, final, step, world)
            prune_checkpoints(output_dir, keep_last)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free if root.is_dir() else 0
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < max(need, 1 << 20)
        raise RunFault(f"step {step}: writing the checkpoint failed ({'the disk is full: ' if full else ''}{e}); the "
                       f"partial {tmp.name} was removed. A checkpoint needs about {_gb(need)}, {_gb(free)} are free in "
                       f"{root}. Fix that, then rerun the same command to resume; {_last_good(output_dir)}.") from e
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> tuple[dict, dict | None]:
    """Restore model/optimizer/scaler/RNG from ``path`` (a complete checkpoint) on every rank.

    Returns (train_state, rank_state). When the checkpoint was written by another number of processes,
    ``rank_state`` holds every saved rank's part instead, ``{key: {"saved_ranks": [part of rank 0, ...]}}``:
    the loaders' ``load_state_dict`` re-partitions what is left of the epoch (``data_order global``) or
    restarts it, and says which. ``rank_state`` is None when the per-rank files are missing.
    """
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    try:
        train_state = json.loads((path / TRAIN_STATE).read_text())
        accelerator.load_state(str(path))
    except Exception as e:  # verified files that still do not load: a version mismatch, not silent garbage
        raise RunFault(f"cannot load checkpoint {path}: {type(e).__name__}: {e}. Move it aside (to "
                       f"{path.parent / 'damaged'}) to resume from an older one, or use a new --output_dir") from e
    saved_world = int(train_state.get("world_size", 1))
    files = [path / f"rank_{r}.json" for r in range(saved_world)]
    if not all(f.is_file() for f in files):
        warnings.warn(f"checkpoint {path} has no data position for every one of its {saved_world} process(es): "
                      f"model/optimizer resume exactly, the data stream restarts epoch {train_state.get('epoch')} "
                      "from its beginning")
        return train_state, None
    if saved_world == accelerator.num_processes:
        return train_state, json.loads(files[accelerator.process_index].read_text())["state"]
    parts = [json.loads(f.read_text())["state"] or {} for f in files]
    return train_state, ({k: {"saved_ranks": [p.get(k) for p in parts]} for k in parts[0]} or None)


def resume_run(accelerator, path: str | Path, schedule, loader, rank_parts: dict | None = None) -> tuple[dict, bool]:
    """``load_checkpoint`` for a run whose train state holds ``{"train": {..., "epoch"}, "schedule": ...}``: also
    restores the schedule, this rank's data position and any other part of the rank state (``rank_parts``: key ->
    ``load_state_dict(part, rank)``). Returns (train_state, epoch_done); epoch_done is True when the checkpoint was
    saved right at the end of its epoch (the run then goes on with the next one)."""
    train_state, rank_state = load_checkpoint(accelerator, path)
    schedule.load_state_dict(train_state["schedule"])
    if rank_state is None:
        return train_state, False
    loader.load_state_dict(rank_state["loader"])
    for key, load in (rank_parts or {}).items():
        load(rank_state.get(key), accelerator.process_index)
    return train_state, loader.epoch == int(train_state["train"]["epoch"]) and loader.position >= len(loader)


def config_fingerprint(cfg: dict, keys: Iterable[str]) -> str:
    """Short hash of the config fields that must not change across a resume."""
    sub = {k: cfg.get(k) for k in sorted(keys)}
    return hashlib.sha256(json.dumps(sub, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_resume_compatible(saved: dict, current: dict, keys: Iterable[str], where: str = "") -> None:
    """Raise ValueError naming every field in ``keys`` whose value differs between the saved and
    the current config (e.g. model shape, tokenizer)."""
    diffs = [f"  {k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
             for k in sorted(keys) if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(
            f"cannot resume {where or 'the run'}: the saved config differs in fields that define the model or "
            f"its targets:\n" + "\n".join(diffs) +
            "\nUse a new --output_dir for a different setup, or set these fields back to the saved values.")


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, config: dict | None = None) -> Path:
    """Write ``state_dict`` as safetensors (atomically) and ``config`` beside it as ``<stem>.json``."""
    path = Path(path)
    bad = nonfinite_names(state_dict.items())
    if bad:
        raise RunFault(f"not writing {path}: the weights hold NaN/Inf (e.g. {', '.join(bad)}); the run diverged")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    if config is not None:
        _write_json(path.with_suffix(".json"), config)
    return path


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read weights written by ``save_weights`` (no pickle) and the config beside them, if any."""
    path = Path(path)
    cfg_path = path.with_suffix(".json")
    return load_file(str(path)), (json.loads(cfg_path.read_text()) if cfg_path.is_file() else None)
