"""Checkpoint faults, injected and checked by their end state: a non-finite state is never saved, every
kind of damage is found and the resume falls back to the newest intact checkpoint (the damaged one
moved aside, never deleted), a full disk leaves no temp folder and says how much space is needed."""
import errno
import json
import os
import subprocess

import pytest
import torch

import beit.checkpoints.checkpointing as ckpt
from beit.checkpoints.checkpointing import (
    COMPLETE,
    checkpoint_path,
    list_complete,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from beit.checkpoints.integrity import DAMAGED, select_resume, verify_checkpoint
from beit.runtime.faults import RunFault


def _setup(acc, width=4):
    torch.manual_seed(0)
    model = torch.nn.Linear(width, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return acc.prepare(model, opt)


def _step(model, opt):
    model(torch.randn(8, model.in_features)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _leftovers(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("where", ["weight", "optimizer"])
def test_nonfinite_state_is_never_saved(acc, tmp_path, where):
    model, opt = _setup(acc)
    _step(model, opt)
    save_checkpoint(acc, tmp_path, 1, {"epoch": 0})
    _step(model, opt)
    with torch.no_grad():
        if where == "weight":
            model.weight[1, 2] = float("inf")
        else:
            opt.optimizer.state[model.bias]["exp_avg_sq"][0] = float("nan")
    with pytest.raises(RunFault, match=r"step 2: the weights or optimizer state hold NaN/Inf \(e\.g\. "
                                       + ("model.weight" if where == "weight" else r"optimizer.state\[1\].exp_avg_sq")
                                       + r"\); this state was not saved, the last good checkpoint is .*step_0000001"):
        save_checkpoint(acc, tmp_path, 2, {"epoch": 0})
    assert [s for s, _ in list_complete(tmp_path)] == [1] and _leftovers(tmp_path) == []
    with pytest.raises(RunFault, match="not writing .*pretrained.safetensors: the weights hold NaN/Inf"):
        save_weights(model.state_dict() if where == "weight" else {"x": torch.tensor([float("nan")])},
                     tmp_path / "pretrained.safetensors")
    assert not (tmp_path / "pretrained.safetensors").exists()


def test_complete_records_every_file_size_and_hash(acc, tmp_path):
    model, opt = _setup(acc)
    path = save_checkpoint(acc, tmp_path, 3, {"epoch": 0}, {"pos": 1})
    marker = json.loads((path / COMPLETE).read_text())
    on_disk = {p.name for p in path.iterdir() if p.name != COMPLETE}
    assert set(marker["files"]) == on_disk >= {"model.safetensors", "optimizer.bin", "train_state.json", "rank_0.json"}
    for name, rec in marker["files"].items():
        assert rec["size"] == (path / name).stat().st_size and len(rec["hash"]) >= 32
    assert marker["hash"] in ("xxh3_128", "sha256") and verify_checkpoint(path) is None


def _garble(f):
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0x5A for b in data[mid:mid + 16])  # same size, other bytes
    f.write_bytes(bytes(data))


DAMAGE = {  # kind -> (how, reason the report gives)
    "truncated model": (lambda p: os.truncate(p / "model.safetensors", 40), "model.safetensors is 40 bytes"),
    "empty model": (lambda p: os.truncate(p / "model.safetensors", 0), "model.safetensors is 0 bytes"),
    "truncated optimizer": (lambda p: os.truncate(p / "optimizer.bin", 100), "optimizer.bin is 100 bytes"),
    "empty optimizer": (lambda p: os.truncate(p / "optimizer.bin", 0), "optimizer.bin is 0 bytes"),
    "garbled model bytes": (lambda p: _garble(p / "model.safetensors"), "model.safetensors does not match its"),
    "garbled optimizer bytes": (lambda p: _garble(p / "optimizer.bin"), "optimizer.bin does not match its"),
    "broken train_state.json": (lambda p: (p / "train_state.json").write_text('{"step": 2,'), "train_state.json"),
    "missing file": (lambda p: (p / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
    "bad rank json": (lambda p: (p / "rank_0.json").write_text("[1, 2"), "rank_0.json"),
    "broken COMPLETE marker": (lambda p: (p / COMPLETE).write_text("{garbage"),
                               "the marker COMPLETE is not valid JSON"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(acc, tmp_path, kind):
    model, opt = _setup(acc)
    _step(model, opt)
    good = save_checkpoint(acc, tmp_path, 1, {"epoch": 0}, {"pos": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, opt)
    bad = save_checkpoint(acc, tmp_path, 2, {"epoch": 0}, {"pos": 2})
    how, reason = DAMAGE[kind]
    how(bad)
    logs = []
    assert select_resume(tmp_path, move_aside=True, log=logs.append) == good
    assert len(logs) == 1 and str(bad) in logs[0] and reason in logs[0], logs
    moved = tmp_path / "checkpoints" / DAMAGED / "step_0000002"
    assert moved.is_dir() and not bad.exists() and reason in (moved / "REASON.txt").read_text()  # kept, not deleted
    _step(model, opt)
    state, rank_state = load_checkpoint(acc, good)
    assert rank_state == {"pos": 1} and all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_no_intact_checkpoint_is_a_message_never_a_fresh_start(acc, tmp_path):
    model, opt = _setup(acc)
    for s in (1, 2):
        save_checkpoint(acc, tmp_path, s, {"epoch": 0})
    os.truncate(checkpoint_path(tmp_path, 1) / "model.safetensors", 0)
    (checkpoint_path(tmp_path, 2) / "optimizer.bin").unlink()
    with pytest.raises(RunFault, match=r"(?s)no intact checkpoint to resume .*step_0000002: optimizer.bin is missing"
                                       r".*step_0000001: model.safetensors is 0 bytes.*nothing was deleted"):
        select_resume(tmp_path, move_aside=True, log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "checkpoints" / DAMAGED).iterdir()) == ["step_0000001", "step_0000002"]
    assert select_resume(tmp_path / "new", move_aside=True) is None  # an empty folder is a fresh start


def test_failed_save_removes_its_temp_folder_and_says_how_much_space(acc, tmp_path, monkeypatch):
    model, opt = _setup(acc)
    save_checkpoint(acc, tmp_path, 1, {"epoch": 0})
    real = acc.save_state

    def full_disk(out, **kw):  # writes part of the checkpoint, then the disk is full
        real(out, **kw)
        raise OSError(errno.ENOSPC, "No space left on device", str(out) + "/optimizer.bin")

    monkeypatch.setattr(acc, "save_state", full_disk)
    with pytest.raises(RunFault, match=r"step 2: writing the checkpoint failed \(the disk is full: .*the partial "
                                       r"\.tmp_step_0000002 was removed\. A checkpoint needs about [\d.]+ [KMG]?B"):
        save_checkpoint(acc, tmp_path, 2, {"epoch": 0})
    assert _leftovers(tmp_path) == [] and [s for s, _ in list_complete(tmp_path)] == [1]


def test_too_little_free_space_is_refused_before_writing(acc, tmp_path, monkeypatch):
    model, opt = _setup(acc)
    save_checkpoint(acc, tmp_path, 1, {"epoch": 0})
    need = ckpt.space_needed(acc, tmp_path)
    assert need >= ckpt.checkpoint_bytes(checkpoint_path(tmp_path, 1))
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: type("U", (), {"free": need // 2})())
    with pytest.raises(RunFault, match="not enough free space for a checkpoint .*about .* needed"):
        save_checkpoint(acc, tmp_path, 2, {"epoch": 0})
    assert _leftovers(tmp_path) == [] and [s for s, _ in list_complete(tmp_path)] == [1]


@pytest.fixture
def tmpfs(tmp_path):
    """A real 1 MiB tmpfs (the tests run as root); skipped where mounting is not allowed."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_really_full_tmpfs(acc, tmpfs, monkeypatch):
    model, opt = _setup(acc, width=2048)          # ~25 KB weights, ~50 KB Adam state
    _step(model, opt)
    save_checkpoint(acc, tmpfs, 1, {"epoch": 0})
    filler = tmpfs / "filler"
    free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
    filler.write_bytes(b"\0" * (free - 30_000))   # room for less than one more checkpoint
    with pytest.raises(RunFault, match="not enough free space for a checkpoint"):  # the real free-space check
        save_checkpoint(acc, tmpfs, 2, {"epoch": 0})
    monkeypatch.setattr(ckpt, "space_needed", lambda a, o: 0)  # skip the check: the write itself hits ENOSPC
    with pytest.raises(RunFault, match=r"writing the checkpoint failed \(the disk is full: .*was removed"):
        save_checkpoint(acc, tmpfs, 2, {"epoch": 0})
    assert _leftovers(tmpfs) == [] and [s for s, _ in list_complete(tmpfs)] == [1]
    filler.unlink()
    monkeypatch.undo()
    assert save_checkpoint(acc, tmpfs, 2, {"epoch": 0}).name == "step_0000002"  # space freed: saves again
