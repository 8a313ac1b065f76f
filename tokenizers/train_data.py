"""Deterministic, resumable, rank-split stream of augmented tokenizer-view batches from shards.

Epoch ``e`` visits the shards in an order shuffled by ``(seed, e)``; raw sample ``i`` of that
order belongs to rank ``i % world_size`` and gets its own crop/flip RNG seeded by ``(seed, e, i)``,
so a resumed run can skip samples without decoding them and still see the same crops. Each rank
yields exactly ``batches_per_epoch`` batches (computed from the manifest / tar headers), wrapping
around if bad samples left it short, so no rank waits for another at the end of an epoch.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from beit.data.decode import BadSample, load_pixels, open_image, to_rgb
from beit.data.shard_format import image_ext, iter_tar_samples
from beit.data.shardspec import expand_shards, shard_sample_counts
from beit.data.transforms import INTERPOLATIONS, pil_to_tensor
from beit.tokenizers.images import ShardReadStats


@dataclass
class CropSpec:
    size: int
    interpolation: str = "lanczos"
    scale: tuple[float, float] = (0.25, 1.0)  # crop side^2 as a fraction of the short side^2
    hflip: float = 0.5


def random_square_crop(img: Image.Image, spec: CropSpec, rng: np.random.Generator) -> torch.Tensor:
    """A random square crop (area fraction in spec.scale of the short side squared), maybe flipped."""
    w, h = img.size
    frac = rng.uniform(*spec.scale)
    s = max(1, int(round(min(w, h) * frac ** 0.5)))
    x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    out = img.resize((spec.size, spec.size), INTERPOLATIONS[spec.interpolation], box=(x0, y0, x0 + s, y0 + s))
    t = pil_to_tensor(out)
    return t.flip(-1) if rng.random() < spec.hflip else t


class TokenizerTrainStream:
    """``stream.epoch(e, skip)`` yields (batch [B,3,S,S] in [0,1], position) for this rank."""

    def __init__(self, shards: str | Sequence[str], spec: CropSpec, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, max_bad_fraction: float = 0.01):
        self.paths = expand_shards(shards)
        counts = shard_sample_counts(self.paths)
        self.num_samples = int(sum(counts)) if counts else 0
        self.spec, self.batch_size, self.seed = spec, int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.batches_per_epoch = self.num_samples // max(1, self.world_size) // self.batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"{self.num_samples} samples in {len(self.paths)} shard(s) are fewer than one batch of "
                             f"{self.batch_size} per rank x {self.world_size} rank(s); lower batch_size or add data")
        self.max_bad_fraction = max_bad_fraction
        self.stats = ShardReadStats()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _order(self, epoch: int) -> list[str]:
        rng = np.random.default_rng([self.seed, epoch])
        return [self.paths[i] for i in rng.permutation(len(self.paths))]

    def _samples(self, epoch: int, skip: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(raw index, augmented tensor) of this rank's samples with raw index >= skip."""
        i = -1
        for shard in self._order(epoch):
            try:
                with open(shard, "rb") as f:
                    for sample in iter_tar_samples(f):
                        i += 1
                        if i < skip or i % self.world_size != self.rank:
                            continue
                        ext = image_ext(sample)
                        try:
                            if ext is None:
                                raise BadSample("no_image")
                            img, _ = open_image(sample[ext])
                            load_pixels(img)
                            img, _ = to_rgb(img)
                        except BadSample as e:
                            self.stats.add_bad(e.reason, shard)
                            self._check_bad()
                            continue
                        self.stats.samples += 1
                        yield i, random_square_crop(img, self.spec, np.random.default_rng([self.seed, epoch, i]))
            except (OSError, EOFError, tarfile.TarError):
                self.stats.add_bad("truncated_shard", shard)
                self._check_bad()

    def _check_bad(self) -> None:
        total = self.stats.samples + self.stats.num_bad
        if total >= 100 and self.stats.num_bad / total > self.max_bad_fraction:
            worst = sorted(self.stats.bad_by_shard.items(), key=lambda kv: -kv[1])[:3]
            raise RuntimeError(f"{self.stats.num_bad} of {total} samples bad ({self.stats.bad}) > max_bad_fraction="
                               f"{self.max_bad_fraction}; worst shards {worst}. Check them with the data verify command.")

    def epoch(self, epoch: int, skip: int = 0, skip_batches: int = 0) -> Iterator[tuple[torch.Tensor, int]]:
        """This rank's batches of ``epoch`` after raw position ``skip`` (``skip_batches`` already done).

        Yields (batch, position) where position is the raw index to resume after.
        """
        done = skip_batches
        buf: list[torch.Tensor] = []
        wrapped = False
        while done < self.batches_per_epoch:
            got_any = False
            for i, t in self._samples(epoch, skip):
                got_any = True
                buf.append(t)
                if len(buf) == self.batch_size:
                    yield torch.stack(buf), i + 1
                    buf, done = [], done + 1
                    if done >= self.batches_per_epoch:
                        return
            if not got_any and wrapped:
                raise RuntimeError(f"rank {self.rank} found no usable samples in {self.paths[:3]}...")
            skip, wrapped = 0, True  # short of batches (bad samples): wrap around
