"""``--data DIR``: a folder of images in, shards out, written once into a cache and reused.

Every stage that reads shards also takes a plain folder: ``folder_shards`` lists it (flat and
recursive for pretraining and tokenizers; class folders, one per class, for fine-tuning), writes it
with the shard writer into ``<cache>/<folder name>-<path hash>-<fingerprint>/`` (``train-*.tar``, plus
``val-*.tar`` for a held-out fraction, split seeded and stratified by class) and returns the two
shard patterns. The fingerprint covers every image's relative path, size and mtime and the
options, so the cache is reused while the folder is unchanged and rewritten when a file is added,
removed or modified. Several processes may ask at once (torchrun): a file lock lets the first
write and the others wait and reuse; a set is moved into place only when complete.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from beit.data.storage.shard_format import MANIFEST_NAME, read_manifest

DEFAULT_CACHE = os.environ.get("BEIT_CACHE", str(Path.home() / ".cache" / "beit" / "shards"))
CACHE_VERSION = 1


@dataclass(frozen=True)
class FolderShards:
    """Where a folder's shards are: ``train`` / ``val`` patterns (val "" without a held-out part)."""
    train: str
    val: str
    directory: Path
    images: int
    classes: list[str] | None
    reused: bool

    def describe(self) -> str:
        what = f"{self.images} images" + (f" in {len(self.classes)} classes" if self.classes else "")
        return f"{what}, {'reused' if self.reused else 'written to'} {self.directory}"


def fingerprint(files: list[Path], root: Path, options: dict) -> str:
    """sha256 over (relative path, size, mtime_ns) of every file and the options."""
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "options": options}, sort_keys=True).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def folder_shards(folder: str | Path, *, labelled: bool, val_fraction: float = 0.0, seed: int = 0,
                  cache: str | Path = "", log=print) -> FolderShards:
    """Shards of ``folder`` (see the module docstring); ``labelled`` needs one sub-folder per class."""
    from beit.data.storage.shard_sources import images_under, list_folder, list_imagenet
    from beit.data.storage.shard_writer import WriteOptions, auto_samples_per_shard, split_items, write_shards

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"--data {folder}: not a folder of images")
    if labelled:
        items, label_map, _ = list_imagenet(root)
        if len(label_map) < 2:
            raise ValueError(f"--data {folder}: fine-tuning needs one sub-folder per class, at least two "
                             f"(found {sorted(label_map)}): {root}/<class>/<image>")
    else:
        items, label_map, _ = list_folder(root)
    options = {"labelled": labelled, "val_fraction": val_fraction, "seed": seed,
               "label_map": label_map}
    fp = fingerprint(images_under(root), root, options)
    cache_root = Path(cache or DEFAULT_CACHE).expanduser()
    cache_root.mkdir(parents=True, exist_ok=True)
    where = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:6]  # two folders may share a name
    stem = f"{root.resolve().name or 'data'}-{where}"
    target = cache_root / f"{stem}-{fp}"
    classes = sorted(label_map, key=label_map.get) if label_map else None
    parts = ["train", "val"] if val_fraction > 0 else ["train"]

    def result(reused: bool) -> FolderShards:
        return FolderShards(str(target / "train-*.tar"), str(target / "val-*.tar") if val_fraction > 0 else "",
                            target, len(items), classes, reused)

    with open(cache_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(target) if target.is_dir() else None
        if manifest and all(manifest.get("writes", {}).get(p, {}).get("complete") for p in parts):
            return result(True)
        tmp = cache_root / f".{target.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        splits = [("train", items)]
        if val_fraction > 0:
            train, val = split_items(items, val_fraction, seed)
            splits = [("train", train), ("val", val)]
        log(f"writing shards of {root} ({len(items)} images) once into {target}")
        for prefix, part in splits:
            write_shards(part, tmp, prefix=prefix, label_map=label_map, source=f"data:{root.resolve()}#{prefix}",
                         opts=WriteOptions(max_samples=auto_samples_per_shard(len(part))), progress=False)
        if label_map is not None:
            (tmp / "class_index.json").write_text(json.dumps(label_map, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        for stale in cache_root.glob(f"{stem}-*"):  # older versions of the same folder
            if stale != target and (stale / MANIFEST_NAME).is_file():
                shutil.rmtree(stale, ignore_errors=True)
        return result(False)
