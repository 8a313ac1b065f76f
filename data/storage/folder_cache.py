"""``--data DIR``: a folder of images in, shards out, written once into a cache and reused.

``plan_folder`` lists and checks a folder (flat and recursive for pretraining and tokenizers; one
sub-folder per class for fine-tuning) and writes nothing, so a command can run all its other checks
first; ``FolderPlan.shards()`` then writes it with the shard writer (``train-*.tar``, plus ``val-*.tar``
for a held-out fraction, seeded and stratified by class) unless the set exists, and returns the
shard patterns. ``folder_shards`` does both.

A set's folder name is its key: ``<folder name>-<path hash>-<images|labelled>-<settings>-<content>``.
``settings`` hashes the conversion settings (labelled, val_fraction, seed), so the caches of one
folder for pretraining and for fine-tuning live side by side; ``content`` hashes every image's
relative path, size and mtime and the class map, so a changed folder gets a new set.

The held-out part (``hold_out``) is split per sub-folder, each shuffled by the seed and its name, so a folder
of class folders holds out the same images listed with labels (fine-tuning) or without (the tokenizer,
pretraining): no stage of one folder trains on the images another stage is scored on.

Nothing in use is deleted. A run holds a shared lock (``<cache>/.locks/<set>.lock``) on the set it
reads until it exits. A conversion holds the set's exclusive lock, builds it in a hidden
``.<set>.tmp<pid>`` folder and moves it into place only when complete; a failed or interrupted
one (an error, Ctrl-C, SIGTERM) removes its temporary folder, and one killed outright leaves it for
the next conversion of that set, which removes it first. Afterwards the older sets of the same
folder with the same settings (the only ones this conversion owns) are removed when no run holds
them; sets with other settings, or written by another version, are never touched.
"""
from __future__ import annotations

import atexit
import fcntl
import glob
import hashlib
import json
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from beit.data.storage.shard_format import KEY_RULE, MANIFEST_NAME, read_manifest, written_counts
from beit.data.storage.shard_writer import Item

DEFAULT_CACHE = os.environ.get("BEIT_CACHE", str(Path.home() / ".cache" / "beit" / "shards"))
CACHE_VERSION = 2
SPLIT_RULE = 2          # per sub-folder, each seeded by its name (1: one seeded shuffle over the labels)
MIN_SPLIT_IMAGES = 10   # smaller folders hold nothing out
MAX_HELD_OUT = 5000     # a large folder holds out at most this many images
LOCKS = ".locks"
INFO = "cache.json"
_HELD: dict[str, IO] = {}  # set folder -> its lock file, shared-locked until this process exits


@dataclass(frozen=True)
class FolderShards:
    """Where a folder's shards are: ``train`` / ``val`` patterns (val "" without a held-out part)."""
    train: str
    val: str
    directory: Path
    images: int                 # written (train + val)
    classes: list[str] | None
    reused: bool
    skipped: tuple[str, ...] = ()   # the unreadable files left out
    held_out: str = ""              # the held-out rule, or why nothing was held out
    val_images: int = 0             # held out (written)

    def describe(self) -> str:
        what = f"{self.images} images" + (f" in {len(self.classes)} classes" if self.classes else "")
        if self.skipped:
            what += f" ({len(self.skipped)} unreadable file(s) left out, listed in {self.directory / MANIFEST_NAME})"
        held = f"{self.val_images} held out ({self.held_out})" if self.val_images else self.held_out
        return f"{what}, {'reused' if self.reused else 'written to'} {self.directory}" + (f"; {held}" if held else "")


def fingerprint(files: list[Path], root: Path, options: dict) -> str:
    """sha256 over (relative path, size, mtime_ns) of every file and the options."""
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "options": options}, sort_keys=True).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _lock(path: Path, how: int) -> IO:
    """``path`` opened (created if missing) and flock-ed; raises BlockingIOError for a refused LOCK_NB.
    Retried when the file was removed or replaced while this process waited for it."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            f = open(path, "a+")
        except FileNotFoundError:  # the folder was removed between the two lines
            continue
        try:
            fcntl.flock(f, how)
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                return f
        except FileNotFoundError:
            pass
        except BaseException:
            f.close()
            raise
        f.close()


@contextmanager
def _sigterm_as_exception():
    """SIGTERM (preemption, a launcher ending the job) raises inside the block, so the conversion cleans up;
    the process then dies of the signal as it would have. Only where SIGTERM has its default action."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    class Terminated(BaseException):
        pass

    def stop(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise SystemExit(128 + signal.SIGTERM) from None  # reached only where the signal is blocked
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass
class FolderPlan:
    """A listed, checked folder and the cache set it becomes; nothing is written until ``shards()``."""
    root: Path
    cache_root: Path
    name: str                     # the set's folder name (its key)
    settings: dict[str, Any]
    content: str
    splits: list[tuple[str, list[Item]]]
    label_map: dict[str, int] | None
    held_out: str = ""            # what the held-out split is, or why there is none

    @property
    def directory(self) -> Path:
        return self.cache_root / self.name

    @property
    def images(self) -> int:
        return sum(len(part) for _, part in self.splits)

    @property
    def classes(self) -> list[str] | None:
        return sorted(self.label_map, key=self.label_map.get) if self.label_map else None

    def _info(self) -> dict[str, Any]:
        return {"version": CACHE_VERSION, "folder": str(self.root), "settings": self.settings,
                "content": self.content}

    def _complete(self, directory: Path | None = None) -> bool:
        directory = directory or self.directory
        manifest = read_manifest(directory) if directory.is_dir() else None
        return bool(manifest) and (directory / INFO).is_file() and all(
            manifest.get("writes", {}).get(p, {}).get("complete") for p, _ in self.splits)

    def _lock_path(self, name: str) -> Path:
        return self.cache_root / LOCKS / f"{name}.lock"

    def shards(self, log=print) -> FolderShards:
        """The set, written now unless it exists; this process holds a shared lock on it until it exits."""
        wrote = False
        for _ in range(5):
            held = _HELD.pop(self.name, None) or _lock(self._lock_path(self.name), fcntl.LOCK_SH)
            if self._complete():
                _HELD[self.name] = held
                self._remove_stale(log)
                return self._result(reused=not wrote, log=log)
            held.close()  # our own shared lock would block the exclusive one
            with _lock(self._lock_path(self.name), fcntl.LOCK_EX):
                if not self._complete():
                    self._write(log)
                    wrote = True
        raise RuntimeError(f"the cache set {self.directory} disappeared five times while this run waited for it: is "
                           f"another program cleaning {self.cache_root}?")

    def _write(self, log) -> None:
        """Write the set (the caller holds its exclusive lock)."""
        from beit.data.storage.shard_writer import WriteOptions, auto_samples_per_shard, write_shards

        for stray in self.cache_root.glob(f".{glob.escape(self.name)}.tmp*"):  # a conversion killed outright
            shutil.rmtree(stray, ignore_errors=True)
        tmp = self.cache_root / f".{self.name}.tmp{os.getpid()}"
        log(f"writing {self.root} ({self.images} images) once into {self.directory}")
        with _sigterm_as_exception():
            try:
                for prefix, part in self.splits:
                    write_shards(part, tmp, prefix=prefix, label_map=self.label_map, progress=False, warn=False,
                                 source=f"data:{self.root}#{prefix}",
                                 opts=WriteOptions(max_samples=auto_samples_per_shard(len(part))))
                if self.label_map is not None:
                    (tmp / "class_index.json").write_text(json.dumps(self.label_map, indent=1, sort_keys=True) + "\n")
                (tmp / INFO).write_text(json.dumps(self._info(), indent=1) + "\n")
                shutil.rmtree(self.directory, ignore_errors=True)  # an incomplete set (no run can hold it)
                os.replace(tmp, self.directory)
            except BaseException:  # an error, Ctrl-C or SIGTERM: nothing of this conversion is left
                shutil.rmtree(tmp, ignore_errors=True)
                if not self.directory.exists():
                    self._lock_path(self.name).unlink(missing_ok=True)  # we hold it: safe (see _lock)
                raise

    def _owned(self, directory: Path) -> bool:
        """Whether ``directory`` is an older set of this folder with these settings."""
        try:
            info = json.loads((directory / INFO).read_text())
        except (OSError, ValueError):
            return False  # not a set of this version: never touched
        return (isinstance(info, dict) and info.get("version") == CACHE_VERSION and info.get("folder") == str(self.root)
                and info.get("settings") == self.settings and info.get("content") != self.content)

    def _remove_stale(self, log) -> None:
        """Remove older sets of this folder and settings, and temporary folders of killed conversions of
        them, that no run holds."""
        prefix = glob.escape(self.name[:-len(self.content)])
        for path in sorted(self.cache_root.glob(f"{prefix}*")) + sorted(self.cache_root.glob(f".{prefix}*.tmp*")):
            name = path.name[1:].rsplit(".tmp", 1)[0] if path.name.startswith(".") else path.name
            if name == self.name or not path.is_dir() or not (path.name.startswith(".") or self._owned(path)):
                continue
            try:
                lock = _lock(self._lock_path(name), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"kept the older cache {path}: a run is reading or writing it")
                continue
            with lock:
                shutil.rmtree(path, ignore_errors=True)
                if not (self.cache_root / name).exists():
                    self._lock_path(name).unlink(missing_ok=True)

    def _result(self, reused: bool, log) -> FolderShards:
        target = self.directory
        images, skipped, counts = 0, [], {}
        for prefix, part in self.splits:
            counts[prefix], gone = written_counts(target, prefix)
            images += counts[prefix]
            skipped += [s.get("path", s["key"]) for s in gone]
        if skipped and not reused:
            log(f"warning: {len(skipped)} unreadable file(s) of {self.root} left out (listed in "
                f"{target / MANIFEST_NAME}): " + ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
        has_val = "val" in counts
        return FolderShards(str(target / "train-*.tar"), str(target / "val-*.tar") if has_val else "", target,
                            images, self.classes, reused, tuple(skipped), self.held_out, counts.get("val", 0))


def plan_folder(folder: str | Path, *, labelled: bool, val_fraction: float = 0.0, seed: int = 0,
                cache: str | Path = "", label_map: dict[str, int] | None = None) -> FolderPlan:
    """List and check ``folder`` (see the module docstring); writes nothing. ``labelled`` needs one
    sub-folder per class (``label_map``: use these labels, e.g. the training folder's, for a held-out folder)."""
    from beit.data.storage.shard_sources import list_folder, list_imagenet
    from beit.data.storage.shard_writer import check_unique_keys

    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"--data {folder}: not a folder of images")
    if labelled and label_map is not None:
        unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                         and p.name not in label_map)
        if unknown:
            known = sorted(label_map, key=label_map.get)
            raise ValueError(f"{folder}: class folders {unknown[:5]} are not among the training classes "
                             f"({', '.join(known[:10])}{', ...' if len(known) > 10 else ''})")
    if labelled:
        items, label_map, _ = list_imagenet(root, label_map)
        if len(label_map) < 2:
            raise ValueError(f"--data {folder}: fine-tuning needs one sub-folder per class, at least two "
                             f"(found {sorted(label_map)}): {root}/<class>/<image>")
    else:
        items, label_map, _ = list_folder(root)
    check_unique_keys(items)
    splits, held_out = hold_out(items, val_fraction, seed)
    settings = {"labelled": labelled, "val_fraction": val_fraction, "seed": seed, "key_rule": KEY_RULE,
                "split_rule": SPLIT_RULE}
    settings_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:6]
    content = fingerprint([Path(it.image) for it in items], root, {"label_map": label_map})
    where = hashlib.sha256(str(root).encode()).hexdigest()[:6]  # two folders may share a name
    name = f"{root.name or 'data'}-{where}-{'labelled' if labelled else 'images'}-{settings_key}-{content}"
    cache_root = Path(cache or DEFAULT_CACHE).expanduser().resolve()
    return FolderPlan(root, cache_root, name, settings, content, splits, label_map, held_out)


def top_folder(item: Item) -> str:
    """The first folder of an item's key, its relative path ('' for a file at the top): its class folder."""
    return item.key.split("/", 1)[0] if "/" in item.key else ""


def hold_out(items: list[Item], fraction: float, seed: int) -> tuple[list[tuple[str, list[Item]]], str]:
    """The folder's splits and the held-out rule (or why nothing is held out): ``fraction`` of every sub-folder's
    images, at least one of every sub-folder with two or more, each sub-folder shuffled by ``seed`` and its name,
    at most MAX_HELD_OUT in all; a folder of fewer than MIN_SPLIT_IMAGES images holds nothing out."""
    from beit.data.storage.shard_writer import split_items

    if fraction <= 0:
        return [("train", items)], ""
    if len(items) < MIN_SPLIT_IMAGES:
        return [("train", items)], (f"nothing held out: {len(items)} image(s), a held-out split needs "
                                    f"{MIN_SPLIT_IMAGES} (no held-out score; add images or pass held-out data)")
    share = min(fraction, MAX_HELD_OUT / len(items))
    try:
        train, val = split_items(items, share, seed, group=top_folder)
    except ValueError:  # every sub-folder holds a single image
        return [("train", items)], ("nothing held out: every sub-folder holds one image (no held-out score; "
                                    "pass held-out data)")
    cap = f", at most {MAX_HELD_OUT}" if share < fraction else ""
    return [("train", train), ("val", val)], f"{fraction:.0%} of each sub-folder{cap}, split seed {seed}"


def folder_shards(folder: str | Path, *, labelled: bool, val_fraction: float = 0.0, seed: int = 0,
                  cache: str | Path = "", log=print) -> FolderShards:
    """``plan_folder`` then ``shards()``: the folder's shards, written into the cache unless they exist."""
    return plan_folder(folder, labelled=labelled, val_fraction=val_fraction, seed=seed, cache=cache).shards(log)


def release(directory: str | Path | None = None) -> None:
    """Drop this process's shared lock on a set (all sets without ``directory``); a process's locks
    also go when it exits."""
    for name in [n for n in _HELD if directory is None or Path(directory).name == n]:
        _HELD.pop(name).close()


atexit.register(release)
