"""Held-out data for scoring: every sample of this rank's share of the shards, exactly once, in order.

The training stream emits only full batches with equal counts per rank (what DDP needs), which
leaves samples out of a score. ``HeldOutStream`` instead reads its shards (rank r takes every R-th,
worker w of that rank every W-th of those) once, so with a ``DataLoader`` (partial last batch
kept) the ranks together see every held-out sample once. It suits evaluation with the unwrapped
model, where ranks may run different numbers of batches and meet only in the final reduction.

Each item is ``map_fn(image, sample)`` plus ``"bad"``: "" for a good sample, else the reason (see
``beit.data.loading.decode.BAD_REASONS``). A bad sample comes out as zeros shaped like the last good item,
so batches still collate; scorers drop the rows whose ``bad`` is set and count them. Each sample's
``__seed__`` (and the random/numpy/torch state during ``map_fn``) depends only on the seed, the
shard's position in the full list and the sample's position in its shard, not on the rank count.
"""
from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from beit.data.loading.decode import BadSample
from beit.data.loading.stream import derive_seed, image_member, map_image
from beit.data.storage.remote import RETRIES, RemoteReadError, open_shard
from beit.data.storage.shard_format import iter_tar_samples
from beit.runtime.stopping import ignore_stop_signals


class HeldOutStream(IterableDataset):
    """See the module docstring. ``lazy_jpeg`` lets ``map_fn`` receive a still-undecoded JPEG
    (``TwoViewTransform`` uses it for draft decoding); decoder errors then surface in ``map_fn``
    and are counted as bad too."""

    def __init__(self, shards: list[str], map_fn: Callable[[Any, dict], dict], rank: int = 0,
                 world_size: int = 1, seed: int = 0, min_image_size: int = 1, lazy_jpeg: bool = False,
                 remote_retries: int = RETRIES):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.shards = list(shards)
        self.mine = list(range(rank, len(self.shards), world_size))
        self.map_fn, self.seed = map_fn, seed
        self.min_image_size, self.lazy_jpeg, self.remote_retries = min_image_size, lazy_jpeg, remote_retries

    def _item(self, raw: dict, shard_idx: int, pos: int) -> dict:
        seed = derive_seed(self.seed, shard_idx, pos, 11)
        return map_image(raw, image_member(raw), self.map_fn, seed, min_image_size=self.min_image_size,
                         lazy_jpeg=self.lazy_jpeg)[2]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.mine[info.id::info.num_workers] if info is not None else self.mine
        template: dict | None = None
        pending: list[str] = []  # bad reasons seen before the first good sample (no shape to copy yet)
        for shard_idx in mine:
            shard, pos = self.shards[shard_idx], 0
            try:
                with open_shard(shard, retries=self.remote_retries) as f:
                    for raw in iter_tar_samples(f):
                        try:
                            out = self._item(raw, shard_idx, pos)
                        except BadSample as e:
                            out = None
                            pending.append(e.reason)
                        pos += 1
                        if out is not None:
                            template = out
                            yield dict(out, bad="")
                        while template is not None and pending:
                            yield self._bad(template, pending.pop(0))
            except (tarfile.TarError, EOFError, OSError) as e:
                pending.append("connection_lost" if isinstance(e, RemoteReadError) else "tar_error")
        if pending and template is None:
            raise RuntimeError(f"held-out data: no decodable sample in {[self.shards[i] for i in mine][:3]} "
                               f"({len(pending)} bad: {sorted(set(pending))}); check them with: "
                               "python -m beit.data.shards verify --dir <shard folder>")
        while pending:
            yield self._bad(template, pending.pop(0))

    @staticmethod
    def _bad(template: dict, reason: str) -> dict:
        zeros = {k: torch.zeros_like(v) if torch.is_tensor(v) else type(v)() for k, v in template.items()}
        return dict(zeros, bad=reason)


def heldout_loader(shards: list[str], map_fn: Callable[[Any, dict], dict], accelerator, *, batch_size: int,
                   num_workers: int, seed: int = 0, lazy_jpeg: bool = False,
                   remote_retries: int = RETRIES) -> DataLoader:
    """A ``DataLoader`` over this process's share of ``shards`` (a ``HeldOutStream``; partial last
    batch kept), with at most as many workers as the process has shards."""
    world = accelerator.num_processes
    stream = HeldOutStream(shards, map_fn, rank=accelerator.process_index, world_size=world, seed=seed,
                           lazy_jpeg=lazy_jpeg, remote_retries=remote_retries)
    return DataLoader(stream, batch_size=batch_size, num_workers=min(num_workers, max(1, len(shards) // world)),
                      worker_init_fn=ignore_stop_signals)


def good_rows(batch: dict) -> torch.Tensor:
    """Bool mask over a collated held-out batch: True where the sample decoded."""
    return torch.tensor([b == "" for b in batch["bad"]], dtype=torch.bool)
