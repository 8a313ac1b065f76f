"""Write samples into deterministic WebDataset tar shards plus ``manifest.json``.

Order and shard boundaries depend only on the input and the options (never on the number of
worker processes), so the same input gives byte-identical shards. Each shard is written as
``<name>.tmp`` and renamed when complete; the manifest is rewritten after every shard so an
interrupted run can be resumed (``resume=True``) from the last complete shard.
"""
from __future__ import annotations

import io
import os
import random
import re
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image
from tqdm import tqdm

from beit.data.loading.decode import to_rgb
from beit.data.storage.shard_format import (
    KEY_RULE,
    MANIFEST_NAME,
    add_member,
    read_manifest,
    sha256_file,
    write_json_atomic,
)

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Item:
    """One input sample: ``image``/``seg`` are a file path or already-encoded bytes."""
    key: str
    image: str | bytes
    label: int | None = None
    seg: str | bytes | None = None
    ext: str | None = None  # extension of ``image`` when it is bytes ("jpg", "png", ...)


@dataclass(frozen=True)
class WriteOptions:
    max_samples: int = 1000
    max_bytes: int | None = None
    resize: int | None = None       # longer side in px (only shrinks)
    reencode: str = "keep"          # keep | jpg | png
    quality: int = 90               # JPEG quality when re-encoding
    shuffle_seed: int | None = 0    # None keeps the input order
    validate: str = "decode"        # decode | header | none

    def check(self) -> None:
        if self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.max_bytes is not None and self.max_bytes < 10_240:
            raise ValueError(f"max_bytes must be at least 10240 (one tar needs that much), got {self.max_bytes}")
        if self.reencode not in ("keep", "jpg", "png"):
            raise ValueError(f"reencode must be keep, jpg or png, got {self.reencode!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.resize is not None and self.resize < 8:
            raise ValueError(f"resize (longer side) must be >= 8 px, got {self.resize}")
        if self.validate not in ("decode", "header", "none"):
            raise ValueError(f"validate must be decode, header or none, got {self.validate!r}")


def _read(src: str | bytes) -> bytes:
    if isinstance(src, bytes):
        return src
    with open(src, "rb") as f:
        return f.read()


def _ext_of(item: Item) -> str:
    ext = item.ext if item.ext else Path(str(item.image)).suffix.lstrip(".")
    ext = ext.lower()
    return {"jpeg": "jpg", "tiff": "tif"}.get(ext, ext)


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img = to_rgb(img)[0]
        img.save(buf, format="JPEG", quality=quality)
    else:
        if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
            img = to_rgb(img)[0]
        img.save(buf, format="PNG")
    return buf.getvalue()


def encode_item(item: Item, opts: WriteOptions) -> tuple[str, list[tuple[str, bytes]] | None, str]:
    """Turn one item into tar members. Returns (key, members or None, reason if skipped)."""
    try:
        data = _read(item.image)
    except OSError as e:
        return item.key, None, f"unreadable: {e}"
    if not data:
        return item.key, None, "empty file"
    ext = _ext_of(item)
    try:
        img = Image.open(io.BytesIO(data))
        if opts.validate == "decode" or opts.resize or opts.reencode != "keep":
            img.load()
        elif opts.validate == "header":
            Image.open(io.BytesIO(data)).verify()
    except Exception as e:  # noqa: BLE001 - any decoder failure means a bad input file
        detail = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))  # the buffer's address says nothing
        return item.key, None, f"not a readable image: {type(e).__name__}: {detail}"
    too_big = opts.resize is not None and max(img.size) > opts.resize
    if too_big or opts.reencode != "keep":
        fmt = opts.reencode if opts.reencode != "keep" else ("jpg" if img.format == "JPEG" else "png")
        if too_big:
            s = opts.resize / max(img.size)
            size = (max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s)))
            if img.mode in ("P", "1"):
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            img = img.resize(size, Image.Resampling.BICUBIC if img.mode not in ("I", "I;16", "F")
                             else Image.Resampling.NEAREST)
        data, ext = _encode(img, fmt, opts.quality), fmt
    members = [(f"{item.key}.{ext}", data)]
    if item.label is not None:
        members.append((f"{item.key}.cls", str(int(item.label)).encode()))
    if item.seg is not None:
        try:
            seg = _read(item.seg)
            if too_big:
                simg = Image.open(io.BytesIO(seg))
                simg = simg.resize(img.size, Image.Resampling.NEAREST)
                buf = io.BytesIO()
                simg.save(buf, format="PNG")
                seg = buf.getvalue()
        except Exception as e:  # noqa: BLE001
            return item.key, None, f"bad annotation: {type(e).__name__}: {e}"
        members.append((f"{item.key}.seg.png", seg))
    return item.key, members, ""


def _encode_star(args):
    return encode_item(*args)


def check_unique_keys(items: Sequence[Item]) -> None:
    """Refuse items that share a key (two files would become one sample), naming the files of each key."""
    by_key: dict[str, list[Item]] = {}
    for it in items:
        by_key.setdefault(it.key, []).append(it)
    dup = {k: v for k, v in by_key.items() if len(v) > 1}
    if dup:
        shown = "; ".join(f"{k!r} from " + ", ".join(it.image if isinstance(it.image, str) else
                                                     f"<{len(it.image)} bytes>" for it in v)
                          for k, v in list(dup.items())[:5])
        raise ValueError(f"{len(dup)} sample key(s) shared by several files (a key is the file's relative path with "
                         f"dots and odd characters as '_'): {shown}; rename one file of each")


def _ordered(items: Sequence[Item], seed: int | None) -> list[Item]:
    check_unique_keys(items)
    out = sorted(items, key=lambda it: it.key)
    if seed is not None:
        random.Random(seed).shuffle(out)
    return out


class _ShardSink:
    """Writes consecutive shards ``<prefix>-NNNNNN.tar`` with temp-name-then-rename."""

    def __init__(self, out_dir: Path, prefix: str, opts: WriteOptions, start_index: int):
        self.out_dir, self.prefix, self.opts = out_dir, prefix, opts
        self.index = start_index
        self.tar: tarfile.TarFile | None = None
        self.count = 0

    def _open(self) -> None:
        self.name = f"{self.prefix}-{self.index:06d}.tar"
        self.tmp = self.out_dir / (self.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.GNU_FORMAT)
        self.count = 0

    def would_overflow(self, members: list[tuple[str, bytes]]) -> bool:
        if self.tar is None or self.count == 0:
            return False
        if self.count >= self.opts.max_samples:
            return True
        if self.opts.max_bytes is None:
            return False
        extra = sum(512 + -(-len(d) // 512) * 512 for _, d in members)
        end = self.tar.offset + extra + 1024  # + end-of-archive blocks, then padded to a tar record
        return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE > self.opts.max_bytes

    def add(self, members: list[tuple[str, bytes]]) -> None:
        if self.tar is None:
            self._open()
        for name, data in members:
            add_member(self.tar, name, data)
        self.count += 1

    def close(self) -> dict[str, Any] | None:
        if self.tar is None:
            return None
        self.tar.close()
        final = self.out_dir / self.name
        os.replace(self.tmp, final)
        entry = {"name": self.name, "samples": self.count, "bytes": final.stat().st_size,
                 "sha256": sha256_file(final)}
        self.tar, self.index = None, self.index + 1
        return entry


def _merge_manifest(out_dir: Path, prefix: str, part: dict[str, Any], shards: list[dict[str, Any]],
                    label_map: dict[str, int] | None) -> dict[str, Any]:
    old = read_manifest(out_dir) or {}
    others = [s for s in old.get("shards", []) if s.get("split") != prefix]
    writes = dict(old.get("writes", {}))
    writes[prefix] = part
    for other, w in writes.items():
        if other != prefix and w.get("label_map") and label_map and w["label_map"] != label_map:
            raise ValueError(f"{out_dir}: split {other!r} was written with a different label map; "
                             f"pass the same --label_map file to every split of one folder")
    all_shards = sorted(others + shards, key=lambda s: s["name"])
    return {"version": MANIFEST_VERSION, "shards": all_shards,
            "num_samples": sum(s["samples"] for s in all_shards),
            "label_map": label_map if label_map is not None else old.get("label_map"),
            "source": part["source"], "options": part["options"], "writes": writes}


def write_shards(items: Iterable[Item], out_dir: str | Path, *, prefix: str = "shard",
                 opts: WriteOptions = WriteOptions(), label_map: dict[str, int] | None = None,
                 source: str = "", workers: int = 1, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, pre_skipped: Sequence[dict[str, str]] = (), warn: bool = True) -> list[str]:
    """Write ``items`` as ``out_dir/<prefix>-NNNNNN.tar`` shards and update ``manifest.json``.

    ``resume`` keeps complete shards of an interrupted run with the same options; ``overwrite``
    replaces an existing set. Returns the shard paths. Unreadable inputs are skipped and listed
    in the manifest (``writes[prefix]["skipped"]``) and reported (``warn``). Bad input (options, keys
    shared by two files) is refused before ``out_dir`` is created.
    """
    opts.check()
    items = _ordered(list(items), opts.shuffle_seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{prefix}-*.tar.tmp"):
        stale.unlink()
    old = read_manifest(out_dir) or {}
    prev = old.get("writes", {}).get(prefix)
    options = asdict(opts)
    done: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = list(pre_skipped)
    start_item = 0
    if prev is not None and resume:
        if (prev["options"] != options or prev["source"] != source or prev["num_items"] != len(items)
                or prev.get("key_rule", 1) != KEY_RULE):
            raise ValueError(f"{out_dir}: cannot resume, the existing '{prefix}' shards were written from "
                             f"another source or with other options; use --overwrite true to start again")
        for s in (s for s in old["shards"] if s.get("split") == prefix):
            p = out_dir / s["name"]
            if not p.is_file() or sha256_file(p) != s["sha256"]:
                break
            done.append(s)
            start_item = s["items_end"]
        skipped += [x for x in prev.get("skipped", []) if x.get("index", len(items)) < start_item]
    elif prev is not None or (not old and any(out_dir.glob(f"{prefix}-*.tar"))):
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds '{prefix}' shards; pass --resume true to continue an "
                                  f"interrupted run or --overwrite true to replace them")
    if not resume or prev is None:
        for p in out_dir.glob(f"{prefix}-*.tar"):
            p.unlink()
    for p in out_dir.glob(f"{prefix}-*.tar"):  # shards after the last valid one of a resumed run
        if p.name not in {s["name"] for s in done}:
            p.unlink()

    part = {"source": source, "options": options, "num_items": len(items), "label_map": label_map,
            "key_rule": KEY_RULE, "complete": False, "skipped": skipped}

    def save(shards, complete=False):
        part["complete"] = complete
        part["skipped"] = skipped
        write_json_atomic(out_dir / MANIFEST_NAME, _merge_manifest(out_dir, prefix, part, shards, label_map))

    sink = _ShardSink(out_dir, prefix, opts, start_index=len(done))
    todo = items[start_item:]
    bar = tqdm(total=len(items), initial=start_item, desc=f"writing {prefix} shards", unit="img",
               disable=not progress)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        results = (pool.map(_encode_star, [(it, opts) for it in todo], chunksize=16) if pool
                   else (encode_item(it, opts) for it in todo))
        for i, (key, members, reason) in enumerate(results, start=start_item):
            bar.update(1)
            if members is None:
                src = items[i].image
                skipped.append({"key": key, "reason": reason, "index": i,
                                **({"path": src} if isinstance(src, str) else {})})
                continue
            if sink.would_overflow(members):
                entry = sink.close()
                entry.update(split=prefix, items_end=i)
                done.append(entry)
                save(done)
            sink.add(members)
        entry = sink.close()
        if entry is not None:
            entry.update(split=prefix, items_end=len(items))
            done.append(entry)
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    save(done, complete=True)
    if skipped and warn:
        first = skipped[0].get("path", skipped[0]["key"])
        print(f"warning: skipped {len(skipped)} unreadable input(s) (listed in {out_dir / MANIFEST_NAME}); "
              f"first: {first}: {skipped[0]['reason']}", flush=True)
    return [str(out_dir / s["name"]) for s in done]


def auto_samples_per_shard(num_items: int, readers: int = 16, most: int = 1000) -> int:
    """Shard size for ``num_items``: ``most`` for large sets, smaller so at least ``readers`` shards exist."""
    return max(1, min(most, -(-num_items // readers)))


def split_items(items: list[Item], fraction: float, seed: int, group=None) -> tuple[list[Item], list[Item]]:
    """(train, val): a seeded split; per class (label) round(fraction x n) held out, at least one of
    every class with two or more images, so every class is in both splits. ``group`` (item -> name) splits
    per named group instead, each shuffled by its own seed (``seed`` and the name), so a group's split does
    not depend on the other groups: a folder's class folders split the same, listed with labels or without."""
    import random
    by_group: dict = {}
    for it in sorted(items, key=lambda it: it.key):
        by_group.setdefault(group(it) if group else it.label, []).append(it)
    train, val = [], []
    rng = random.Random(seed)
    for name in sorted(by_group, key=lambda v: (v is None, v)):
        members = by_group[name]
        (random.Random(f"{seed}:{name}") if group else rng).shuffle(members)
        k = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) >= 2 else 0
        val += members[:k]
        train += members[k:]
    if not val:
        raise ValueError(f"--val_fraction {fraction}: {len(items)} image(s) leave none to hold out; add images or "
                         "set --val_fraction 0")
    return train, val
