"""Image batches for fitting and measuring tokenizers: from WebDataset shards, or real sample photos.

``shard_image_batches`` reads shards in order (no shuffling: fits and reports are reproducible)
with the data helper's robust decoding; bad samples are counted by reason, never silently
dropped, and too many of them stop the run. ``sample_photo_crops`` cuts the real photographs that
ship inside scikit-image / scikit-learn into crops, for tests and quick checks without shards.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from beit.data.loading.decode import BadSample, load_pixels, open_image, to_rgb
from beit.data.pipelines.transforms import INTERPOLATIONS, pil_to_tensor
from beit.data.storage.remote import RETRIES, RemoteReadError, open_shard
from beit.data.storage.shard_format import image_ext, iter_tar_samples
from beit.data.storage.shardspec import expand_shards


def resize_square(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Centre-crop to a square and resize to ``size`` with the named interpolation."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {sorted(INTERPOLATIONS)}")
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return img.resize((size, size), INTERPOLATIONS[interpolation], box=box)


def sample_photo_crops(n: int, size: int, seed: int = 0, min_frac: float = 0.25,
                       interpolation: str = "bicubic", names: Sequence[str] | None = None) -> torch.Tensor:
    """``n`` random square crops (side min_frac..1 of the short side) of the built-in photos -> [n,3,size,size]."""
    from beit.data.sample_sets import load_photos

    photos = load_photos()
    keys = sorted(photos) if names is None else list(names)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = Image.fromarray(photos[keys[i % len(keys)]])
        w, h = img.size
        s = int(min(w, h) * rng.uniform(min_frac, 1.0))
        x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        out.append(pil_to_tensor(img.resize((size, size), INTERPOLATIONS[interpolation], box=(x0, y0, x0 + s, y0 + s))))
    return torch.stack(out)


@dataclass
class ShardReadStats:
    """Counts of what was read and skipped, by reason (and bad samples by shard)."""
    samples: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    bad_by_shard: dict[str, int] = field(default_factory=dict)

    def add_bad(self, reason: str, shard: str) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + 1
        self.bad_by_shard[shard] = self.bad_by_shard.get(shard, 0) + 1

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())


def iter_shard_samples(shards: Sequence[str], stats: ShardReadStats, remote_retries: int = RETRIES
                       ) -> Iterator[tuple[dict, str, Image.Image]]:
    """(raw sample, image extension, RGB PIL image) for every usable sample of the shards (paths, http(s)
    URLs, ``pipe:`` commands), in order; bad samples and unreadable shards are counted in ``stats``."""
    for shard in shards:
        try:
            with open_shard(shard, retries=remote_retries) as f:
                for sample in iter_tar_samples(f):
                    ext = image_ext(sample)
                    if ext is None:
                        stats.add_bad("no_image", shard)
                        continue
                    try:
                        img, _ = open_image(sample[ext])
                        load_pixels(img)
                        img, _ = to_rgb(img)
                    except BadSample as e:
                        stats.add_bad(e.reason, shard)
                        continue
                    stats.samples += 1
                    yield sample, ext, img
        except (tarfile.TarError, OSError, EOFError) as e:
            stats.add_bad("connection_lost" if isinstance(e, RemoteReadError) else "truncated_shard", shard)


def iter_shard_images(shards: Sequence[str], stats: ShardReadStats, remote_retries: int = RETRIES
                      ) -> Iterator[tuple[str, Image.Image]]:
    """(key, RGB PIL image) for every usable sample of the shards, in order."""
    for sample, _, img in iter_shard_samples(shards, stats, remote_retries):
        yield sample["__key__"], img


def shard_image_batches(shards: str | Sequence[str], size: int, batch_size: int = 64,
                        interpolation: str = "bicubic", max_images: int | None = None,
                        stats: ShardReadStats | None = None, max_bad_fraction: float = 0.01,
                        allow_remote: bool = False, remote_retries: int = RETRIES) -> Iterator[torch.Tensor]:
    """Batches [B,3,size,size] in [0,1] of centre-cropped images read in order from the shards."""
    paths = expand_shards(shards, allow_remote=allow_remote)
    stats = stats if stats is not None else ShardReadStats()
    buf: list[torch.Tensor] = []
    n = 0
    for _, img in iter_shard_images(paths, stats, remote_retries):
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
        worst = sorted(stats.bad_by_shard.items(), key=lambda kv: -kv[1])[:3]
        raise RuntimeError(f"{stats.num_bad} of {total} samples were bad ({stats.bad}), above "
                           f"max_bad_fraction={max_bad_fraction}; worst shards: {worst}. "
                           "Check them with the data helper's verify command.")
