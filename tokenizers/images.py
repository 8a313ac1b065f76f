"""Image batches for fitting and measuring tokenizers: from WebDataset shards, or real sample photos.

``shard_image_batches`` reads tar shards with our own decoding (counting bad samples, never silently
dropping them) when the data helper's stream loader is not wanted; ``sample_photo_crops`` cuts real
photographs that ship inside scikit-image into crops (no network), for tests and quick checks.
"""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "ppm", "bmp", "webp", "tif", "tiff")
RESAMPLE = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR,
            "nearest": Image.NEAREST, "box": Image.BOX}

# Colour photographs and textures of skimage.data (grey ones are converted to RGB).
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "camera", "brick", "grass", "gravel", "moon", "page", "text", "coins",
                  "clock", "cell")


def resize_square(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Centre-crop to a square and resize to ``size`` with the named interpolation."""
    if interpolation not in RESAMPLE:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {sorted(RESAMPLE)}")
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return img.convert("RGB").resize((size, size), RESAMPLE[interpolation], box=box)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 [3, H, W] in [0, 1]."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def _load_skimage(name: str) -> np.ndarray:
    import skimage.data

    a = getattr(skimage.data, name)()
    if a.dtype != np.uint8:
        a = (255 * (a.astype(np.float64) - a.min()) / max(1e-9, float(a.max() - a.min()))).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return a[..., :3]


def sample_photo_crops(n: int, size: int, seed: int = 0, names: Iterable[str] = SKIMAGE_PHOTOS,
                       min_frac: float = 0.25, interpolation: str = "bicubic") -> torch.Tensor:
    """``n`` random square crops (side min_frac..1 of the short side) of scikit-image photos -> [n,3,size,size]."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(_load_skimage(nm)) for nm in names]
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        s = int(min(w, h) * rng.uniform(min_frac, 1.0))
        x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        crop = img.crop((x0, y0, x0 + s, y0 + s)).resize((size, size), RESAMPLE[interpolation])
        out.append(pil_to_tensor(crop))
    return torch.stack(out)


@dataclass
class ShardReadStats:
    """Counts of what ``shard_image_batches`` read and skipped, by reason."""
    samples: int = 0
    bad: dict[str, int] = field(default_factory=dict)

    def add_bad(self, reason: str) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + 1

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())


def expand_shards(spec: str | Path | list) -> list[str]:
    """Brace patterns (``train-{000..009}.tar``), globs, lists or a directory -> existing shard paths."""
    import glob

    from webdataset.shardlists import expand_urls

    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    paths: list[str] = []
    for s in specs:
        s = str(s)
        if Path(s).is_dir():
            paths += sorted(str(p) for p in Path(s).glob("*.tar"))
            continue
        for e in expand_urls(s):
            hits = sorted(glob.glob(e)) if any(c in e for c in "*?[") else [e]
            paths += hits
    if not paths:
        raise FileNotFoundError(f"shard spec {spec!r} matches no files")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) do not exist, e.g. {missing[:3]}")
    return paths


def iter_shard_images(shards: list[str], stats: ShardReadStats | None = None) -> Iterator[tuple[str, Image.Image]]:
    """(key, PIL RGB) for every decodable image member of the shards, in order; bad ones counted."""
    stats = stats if stats is not None else ShardReadStats()
    for shard in shards:
        try:
            tf = tarfile.open(shard, "r")
        except (tarfile.TarError, OSError):
            stats.add_bad("unreadable_shard")
            continue
        with tf:
            try:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.partition(".")
                    if ext.lower() not in IMAGE_EXTS:
                        continue
                    try:
                        data = tf.extractfile(m).read()
                        img = Image.open(io.BytesIO(data))
                        img.load()
                        stats.samples += 1
                        yield key, img.convert("RGB")
                    except Exception:  # noqa: BLE001 - any undecodable member is counted, not fatal
                        stats.add_bad("undecodable_image")
            except (tarfile.TarError, OSError):
                stats.add_bad("truncated_shard")


def shard_image_batches(shards: str | list, size: int, batch_size: int = 64, interpolation: str = "bicubic",
                        max_images: int | None = None, stats: ShardReadStats | None = None,
                        max_bad_fraction: float = 0.01) -> Iterator[torch.Tensor]:
    """Batches [B,3,size,size] in [0,1] of centre-cropped images read in order from the shards."""
    paths = expand_shards(shards)
    stats = stats if stats is not None else ShardReadStats()
    buf: list[torch.Tensor] = []
    n = 0
    for _, img in iter_shard_images(paths, stats):
        buf.append(pil_to_tensor(resize_square(img, size, interpolation)))
        n += 1
        if len(buf) == batch_size:
            yield torch.stack(buf)
            buf = []
        if max_images is not None and n >= max_images:
            break
    if buf:
        yield torch.stack(buf)
    total = stats.samples + stats.num_bad
    if total and stats.num_bad / total > max_bad_fraction:
        raise RuntimeError(f"{stats.num_bad} of {total} samples in {shards!r} were bad ({stats.bad}); "
                           f"above max_bad_fraction={max_bad_fraction}. Run the data helper's verify command.")
