"""The on-disk shard format: deterministic tar members, sample keys and the manifest.

A shard is a WebDataset tar: members ``<key>.<ext>`` grouped by key (image bytes under their
extension, ``cls`` = integer label as ASCII, ``seg.png`` = annotation). ``manifest.json`` beside
the shards records per-shard sample counts, byte sizes and sha256, the label map, source and options.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator

MANIFEST_NAME = "manifest.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm")
# WebDataset splits "<key>.<ext>" at the first dot of the file name, so keys must not contain dots.
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-/]")


KEY_RULE = 2  # 1: extension dropped (rocket.jpg and rocket.png collided); 2: extension kept


def make_key(rel_path: str) -> str:
    """A WebDataset-safe key from a relative path, extension included (``a/rocket.jpg`` -> ``a/rocket_jpg``), so
    files that differ only in their extension stay apart; dots and odd characters become '_'."""
    return _KEY_BAD.sub("_", str(rel_path).replace(os.sep, "/"))


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/abc.seg.png`` -> (``dir/abc``, ``seg.png``) as WebDataset groups members."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, (ext.lower() if dot else "")


def image_ext(sample: dict[str, Any]) -> str | None:
    """The extension of the sample's main image member, or None."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a file member with fixed metadata, so the same bytes always give the same tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def iter_tar_samples(fileobj) -> Iterator[dict[str, Any]]:
    """Stream samples ``{"__key__": key, ext: bytes, ...}`` from a tar file object, in order.

    A damaged or truncated tar raises ``tarfile.ReadError`` (a bad header, a short member, no
    end-of-archive marker: ``beit.data.storage.tar_reader``); the samples completed before the damage have
    been yielded by then, the incomplete one is dropped.
    """
    from beit.data.storage.tar_reader import iter_tar_files
    current: dict[str, Any] | None = None
    for name, read_data in iter_tar_files(fileobj):
        key, ext = split_member_name(name)
        if current is not None and current["__key__"] != key:
            yield current  # complete: a new key starts (before its data is read, which may fail)
            current = None
        data = read_data()
        if current is None:
            current = {"__key__": key}
        current[ext] = data
    if current is not None:
        yield current


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def written_counts(directory: str | Path, prefix: str) -> tuple[int, list[dict[str, Any]]]:
    """(samples written, inputs skipped) of split ``prefix`` in the folder's manifest."""
    m = read_manifest(directory) or {}
    samples = sum(int(s["samples"]) for s in m.get("shards", []) if s.get("split") == prefix)
    return samples, list(m.get("writes", {}).get(prefix, {}).get("skipped", []))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def manifest_counts(manifests: Iterable[tuple[Path, dict[str, Any]]]) -> dict[str, int]:
    """Map absolute shard path -> sample count from (directory, manifest) pairs."""
    out: dict[str, int] = {}
    for directory, m in manifests:
        for s in m.get("shards", []):
            out[str((Path(directory) / s["name"]).resolve())] = int(s["samples"])
    return out
