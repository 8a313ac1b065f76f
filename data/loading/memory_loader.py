"""The training loader over a decoded-image store (``memory_store``): batches augmented on the device.

Order (every process computes it from the seed alone, with no communication): epoch e shows the store's N
images in one seeded permutation (``derive_seed(seed, e, pass)``), cut into micro-batches of
``batch_size`` slots; micro-batch m belongs to process m % world_size. An epoch has
ceil(N / (world_size x batch_size)) micro-batches per process (rounded up to ``batch_multiple``) unless
``batches_per_epoch`` is given; the slots after the N-th are filled from the next seeded permutation (the
repeats are counted in ``describe``). So every image comes once per epoch, every process makes the same
number of steps, the batches do not depend on the process count, and the position (epoch, micro-batches
consumed) is the whole resume state: a resumed run continues with exactly the batches it would have had,
on the same or (when the consumed samples split evenly) another number of processes.

The augmentation (``augment.draw(generator, n)`` then ``augment(store, indices, draws)``) draws the random
numbers of every ``BLOCK`` slots from a CPU generator seeded with (seed, epoch, block), so a slot's views do not
depend on the batch size or the process count (a resume with another micro-batch split of the same global
batch continues the same run), and it runs on several
micro-batches at once (``chunk``: fixed stretches of the epoch), so the batches do not depend on the
chunking, and a resumed run, which starts from the chunk of its position, computes the same ones. When the
augmentation's randomness is all in its draws (``augment.thread_safe``) and torch runs one intra-op thread (the
compare recipes), the next chunk (at an epoch's end: the next epoch's first) is augmented in a background thread
while the caller trains on this one; beside a multi-threaded step the thread would change how its kernels split
their sums (two identical runs then differ in the last bits), so there the chunks are augmented in turn.
"""
from __future__ import annotations

import collections
import warnings
from typing import Any

import torch

from beit.data.loading.data_stats import DataStats
from beit.data.loading.memory_store import DecodedStore
from beit.data.loading.stream import EpochLoader, derive_seed

STATE_VERSION = 1
_PERM, _AUG = 0x3E30, 0x3E31
BLOCK = 8  # slots whose random numbers come from one generator


class MemoryLoader(EpochLoader):
    """Same interface as ``StreamLoader`` (len, set_epoch, state_dict / load_state_dict, stats, metrics,
    describe, notes, coverage); batches are dicts of tensors on the store's device plus ``__key__``."""

    num_workers = 0

    def __init__(self, store: DecodedStore, augment, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, batches_per_epoch: int | None = None, batch_multiple: int = 1,
                 max_bad_fraction: float = 0.01):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.store, self.augment = store, augment
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        n = len(store)
        explicit = bool(batches_per_epoch)
        if not explicit:
            batches_per_epoch = -(-n // (world_size * batch_size))
            batches_per_epoch = -(-batches_per_epoch // max(1, batch_multiple)) * max(1, batch_multiple)
        self.num_batches = int(batches_per_epoch)
        self.epoch, self.position = 0, 0
        upfront = DataStats(store.bad.data)  # every bad sample is known now: refuse before any compute
        upfront.data["samples"] = n
        upfront.check(max_bad_fraction)
        self._stats = DataStats()
        self.max_bad_fraction = max_bad_fraction
        self._perms: dict[tuple[int, int], torch.Tensor] = {}
        self._pool, self._ahead = None, None  # the background thread and the chunk it prepares
        self.notes: list[str] = []
        self.coverage = {"images": n, "shards": len(store.shards), "batches": self.num_batches,
                         "batch_size": batch_size, "world_size": world_size, "resampled": False,
                         "explicit": explicit, "order": "memory"}

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    # ---- the order ----
    def _perm(self, epoch: int, cycle: int) -> torch.Tensor:
        key = (epoch, cycle)
        if key not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, _PERM, cycle))
            self._perms[key] = torch.randperm(len(self.store), generator=gen)
        return self._perms[key]

    def slots(self, epoch: int, m: int) -> torch.Tensor:
        """Store indices of global micro-batch ``m`` of ``epoch``."""
        n, b = len(self.store), self.batch_size
        first, last = m * b, (m + 1) * b
        parts = [self._perm(epoch, c)[max(first, c * n) - c * n:min(last, (c + 1) * n) - c * n]
                 for c in range(first // n, (last - 1) // n + 1)]
        return torch.cat(parts)

    def chunk(self) -> int:
        """Micro-batches augmented together: up to 1024 images and ~64 MiB of outputs and intermediates.
        Chunks start at fixed positions of the epoch, so a resumed run augments the same chunks."""
        _, c, h, w = self.store.images.shape
        per_image = max(getattr(self.augment, "out_pixels", 3 * h * w), 4 * c * h * 64)
        images = max(1, min(1024, (64 << 20) // per_image))
        return max(1, images // self.batch_size)

    def _draws(self, epoch: int, first: int, last: int, blocks: dict) -> dict:
        """The random numbers of slots [first, last) of ``epoch``: those of each block of ``BLOCK`` slots come
        from one generator seeded with (seed, epoch, block), so they do not depend on the batch size, the
        process count or the chunking."""
        parts = []
        for g in range(first // BLOCK, (last - 1) // BLOCK + 1):
            if g not in blocks:
                gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, _AUG, g))
                blocks[g] = self.augment.draw(gen, BLOCK)
            lo, hi = max(first, g * BLOCK) - g * BLOCK, min(last, (g + 1) * BLOCK) - g * BLOCK
            parts.append({k: v[lo:hi] for k, v in blocks[g].items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _augmented(self, epoch: int, start: int) -> dict:
        """The augmented micro-batches from position ``start`` of ``epoch`` (one chunk) of this process."""
        idx, draws, blocks = [], [], {}
        for p in range(start, min(start + self.chunk(), self.num_batches)):
            m = p * self.world_size + self.rank
            idx.append(self.slots(epoch, m))
            draws.append(self._draws(epoch, m * self.batch_size, (m + 1) * self.batch_size, blocks))
        idx = torch.cat(idx)
        u = {k: torch.cat([d[k] for d in draws]) for k in draws[0]}
        out = self.augment(self.store, idx.to(self.store.images.device), u)
        out["__index__"] = idx
        return out

    def _chunk_at(self, epoch: int, start: int) -> dict:
        """A chunk, from the background thread when it prepared this one, else computed now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            done = ahead[1].result()  # also when it is not this chunk: one thread augments at a time
            if ahead[0] == (epoch, start):
                return done
        return self._augmented(epoch, start)

    def _prepare(self, epoch: int, start: int) -> None:
        """Augment the chunk at ``start`` of ``epoch`` in a background thread while the caller trains (only for
        an augmentation whose randomness is all in its draws: ``augment.thread_safe``)."""
        if not getattr(self.augment, "thread_safe", False) or torch.get_num_threads() > 1:
            return  # beside a multi-threaded step, MKL splits the step's work differently: runs stop being bit-equal
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="memory-cache")
        self._ahead = ((epoch, start), self._pool.submit(self._augmented, epoch, start))

    def __iter__(self):
        if self.position >= self.num_batches:
            self.set_epoch(self.epoch + 1)
        store, b, k, epoch = self.store, self.batch_size, self.chunk(), self.epoch
        if self.position == 0 and self.rank == 0:  # once per epoch (as a pass of the stream), on one process
            self._stats.merge(store.bad.data)
        while self.position < self.num_batches:
            start = self.position // k * k
            part = self._chunk_at(epoch, start)
            stop = min(start + k, self.num_batches)
            self._prepare(*((epoch, stop) if stop < self.num_batches else (epoch + 1, 0)))  # the next epoch's first
            for p in range(self.position, stop):
                lo, hi = (p - start) * b, (p - start + 1) * b
                batch = {key: v[lo:hi] for key, v in part.items() if key != "__index__"}
                idx = part["__index__"][lo:hi].tolist()
                batch["__key__"] = [store.keys[i] for i in idx]
                self._count(idx)
                self.position += 1
                yield batch
        self._stats.check(self.max_bad_fraction)

    def _count(self, idx: list[int]) -> None:
        store = self.store
        for shard, n in collections.Counter(store.shard_of[i] for i in idx).items():
            self._stats.add_good(store.shards[shard], n)
        for i in idx:
            if store.converted[i]:
                self._stats.add_converted(store.converted[i])
            if store.upscaled[i]:
                self._stats.add_upscaled()

    # ---- resume ----
    def _layout(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "batch_size": self.batch_size, "seed": self.seed,
                "num_images": len(self.store), "num_batches": self.num_batches, "order": "memory"}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "workers": [],
                "layout": self._layout(), "stats": self._stats.data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``, or from ``{"saved_ranks": [...]}`` of another process count: the
        epoch goes on from the first sample not consumed when the consumed samples split evenly over this
        run's processes, else it restarts (warned). A checkpoint of the streaming loader restarts its epoch."""
        saved = state["saved_ranks"] if "saved_ranks" in state else [state]
        first, me = saved[0], self._layout()
        layout = first.get("layout") or {}
        self.epoch = int(first["epoch"])
        self._stats = DataStats()
        for s in (saved[self.rank::self.world_size] if "saved_ranks" in state else saved):
            self._stats.merge(s.get("stats") or {})
        self.position = 0
        if layout == me:
            self.position = int(first["position"])
            return
        complete = all(int(s["position"]) >= int((s.get("layout") or {}).get("num_batches", 1 << 62))
                       for s in saved)
        if complete:
            self.position = self.num_batches
            warnings.warn(f"data loader layout changed since the checkpoint ({layout} -> {me}); epoch {self.epoch} "
                          "was complete")
            return
        same = {k: layout.get(k) for k in ("seed", "num_images", "order")} == \
            {k: me[k] for k in ("seed", "num_images", "order")}
        consumed = int(first["position"]) * int(layout.get("world_size", 1)) * int(layout.get("batch_size", 0))
        per_batch = self.world_size * self.batch_size
        if same and len({(s["epoch"], s["position"]) for s in saved}) == 1 and consumed % per_batch == 0:
            self.position = min(consumed // per_batch, self.num_batches)
            head = (f"the checkpoint was written by {len(saved)} process(es), this run has {self.world_size}"
                    if len(saved) != self.world_size else f"data loader layout changed since the checkpoint "
                    f"({layout} -> {me})")
            warnings.warn(f"{head}: epoch {self.epoch} goes on from sample {consumed} of its order, re-partitioned "
                          f"over {self.world_size} process(es) (every sample of the epoch once)")
            return
        warnings.warn(f"data loader layout changed since the checkpoint ({layout} -> {me}); epoch {self.epoch} "
                      "restarts from its first batch (samples already seen in it come again)")
