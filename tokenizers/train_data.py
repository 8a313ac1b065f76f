"""Augmented tokenizer-view batches for tokenizer training, via the data helper's stream loader.

``build_view_loader`` wraps ``beit.data.loading.stream.build_stream_loader`` (rank/worker split, robust
decoding with counted bad samples, exact mid-epoch resume through ``state_dict``) with a
``map_fn`` that cuts one random square crop per image, seeded by the sample's ``__seed__``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from beit.data.pipelines.transforms import INTERPOLATIONS, pil_to_tensor


@dataclass
class CropSpec:
    size: int
    interpolation: str = "lanczos"
    scale: tuple[float, float] = (0.25, 1.0)  # crop area as a fraction of the short side squared
    hflip: float = 0.5


def random_square_crop(img: Image.Image, spec: CropSpec, rng: np.random.Generator) -> torch.Tensor:
    """A random square crop (area fraction in spec.scale of the short side squared), maybe flipped."""
    w, h = img.size
    frac = rng.uniform(*spec.scale)
    s = max(1, int(round(min(w, h) * frac ** 0.5)))
    x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    out = img.resize((spec.size, spec.size), INTERPOLATIONS[spec.interpolation], box=(x0, y0, x0 + s, y0 + s))
    t = pil_to_tensor(out.convert("RGB"))
    return t.flip(-1) if rng.random() < spec.hflip else t


class CropMapFn:
    """``map_fn(image, sample) -> {"images": crop}`` for build_stream_loader (picklable for workers)."""

    def __init__(self, spec: CropSpec):
        self.spec = spec

    def __call__(self, img: Image.Image, sample: dict) -> dict[str, torch.Tensor]:
        return {"images": random_square_crop(img, self.spec, np.random.default_rng(int(sample["__seed__"])))}


def build_view_loader(shards, spec: CropSpec, batch_size: int, *, seed: int = 0, rank: int = 0,
                      world_size: int = 1, num_workers: int = 2, max_bad_fraction: float = 0.01, **source):
    """A StreamLoader of {"images": [B,3,S,S] in [0,1]} batches (one epoch per iteration); ``source``:
    ``allow_remote``, ``manifest``, ``remote_retries`` of ``build_stream_loader``."""
    from beit.data.loading.stream import build_stream_loader

    return build_stream_loader(shards, map_fn=CropMapFn(spec), batch_size=batch_size, num_workers=num_workers,
                               rank=rank, world_size=world_size, seed=seed, max_bad_fraction=max_bad_fraction,
                               small_image_size=spec.size, **source)  # small images counted as data/upscaled
