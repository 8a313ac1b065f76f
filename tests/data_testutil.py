"""Helpers for the data tests: real encoded images of every awkward kind, and tar shards."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from beit.data.storage.shard_format import add_member
from beit.data.storage.shard_writer import Item, WriteOptions, write_shards


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(seed: int, size=(48, 40)) -> Image.Image:
    """A smooth random RGB picture (compresses like a photo, distinct per seed)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize(size, Image.Resampling.BICUBIC)


def jpeg(seed: int, size=(48, 40)) -> bytes:
    return encode(photo(seed, size), "JPEG", quality=90)


def odd_images() -> dict[str, bytes]:
    """Encoded images in modes that need conversion (name -> bytes)."""
    base = photo(1)
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.new("L", base.size, 128))
    i16 = Image.fromarray(np.full((40, 48), 32768, dtype=np.uint16))
    return {
        "cmyk.jpg": encode(base.convert("CMYK"), "JPEG"),
        "pal.png": encode(pal, "PNG", transparency=0),
        "rgba.png": encode(rgba, "PNG"),
        "i16.png": encode(i16, "PNG"),
        "grey.png": encode(base.convert("L"), "PNG"),
    }


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A raw tar shard from (key, {ext: bytes}) pairs, bypassing the writer's checks."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                add_member(tar, f"{key}.{ext}", data)
    return path


def good_shards(out: Path, n_shards: int, per_shard: int, size=(48, 40), label: bool = False,
                prefix: str = "train") -> list[str]:
    """``n_shards`` x ``per_shard`` distinct real JPEG samples written by the shard writer."""
    items = [Item(key=f"s{i:05d}", image=jpeg(i, size), ext="jpg", label=(i % 3) if label else None)
             for i in range(n_shards * per_shard)]
    return write_shards(items, out, prefix=prefix, opts=WriteOptions(max_samples=per_shard, validate="none"),
                        source="test", overwrite=True, progress=False)
