"""A world-size-invariant data order for exact 1-vs-N-process reproducibility (``data_order: global``).

The default stream (``beit.data.loading.stream``) splits shards across ranks and workers: it scales, but
the samples in a global batch depend on the number of processes. This mode makes them not:

* every rank and worker reads the SAME deterministic raw stream of the epoch (all shards, order
  and shuffle buffer seeded by (seed, epoch) only) and numbers its samples 0, 1, 2, ... ("slots");
* slots are cut into micro-batches of ``batch_size``; micro-batch m belongs to rank m % world_size,
  and that rank's k-th micro-batch to worker k % num_workers. So optimizer step s covers slots
  [s*G, (s+1)*G) for any process count with the same global batch G (per-rank batch x accumulation
  x processes); a rank decodes only its own slots;
* slot i is augmented with random/numpy/torch seeded from (seed, epoch, i) (``sample["__seed__"]``),
  so a sample's views and mask do not depend on the rank, the worker or the process count;
* a bad sample in slot i is counted (by the slot's owner) and replaced by raw sample i+1, i+2, ...
  (a deterministic duplicate), so the batch composition stays process-count invariant.

Cost: every reader reads (but does not decode) all shard bytes, i.e. world_size x num_workers
times the I/O of the default mode. Use it to verify scaling, for exact resume on a different
number of processes, or for small data; keep the default for large runs.
"""
from __future__ import annotations

import collections
import random
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from beit.data.loading.data_stats import DataStats
from beit.data.loading.stream import MapFn, ShardStream, StreamLoader, build_stream_loader, derive_seed, plan_quotas

MAX_SUBSTITUTES = 64  # consecutive undecodable raw samples before giving up on a slot
_ORDER_TAG = 0x610BA1


class GlobalOrderStream(ShardStream):
    """Worker side: reads the whole epoch stream, decodes this rank's and worker's slots only."""

    def _global_raw_stream(self, stats: DataStats) -> Iterator[dict]:
        """Infinite raw stream that is identical on every rank and worker (cycles reshuffled)."""
        self._dead, self._damaged = set(), set()  # used by _read_shard: missing / counted shards
        for cycle in range(1 << 62):
            rng = random.Random(derive_seed(self.seed, self.epoch, _ORDER_TAG, cycle))
            order = list(range(len(self.shards)))
            rng.shuffle(order)
            order = [i for i in order if i not in self._dead]
            got = 0
            for s in self._shuffled((x for i in order for x in self._read_shard(i, stats)), rng):
                got += 1
                yield s
            if got == 0:
                raise RuntimeError(f"no readable samples in any of the {len(self.shards)} shards "
                                   f"(e.g. {self.shards[:3]}); bad: {stats.data['bad_by_reason']}")

    def __iter__(self) -> Iterator[dict]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker = info.id if info is not None else 0
        W, R, B, NW = self.world_size, self.rank, self.batch_size, self.num_workers
        emitted = self.progress[worker][1]
        stats = DataStats()
        # shard read errors are seen by every reader: count them once (rank 0, worker 0)
        read_stats = stats if (R == 0 and worker == 0) else DataStats()
        raw = self._global_raw_stream(read_stats)
        ahead: collections.deque = collections.deque()   # raw samples from index ``base`` on
        base = 0

        def raw_at(j: int) -> dict:
            nonlocal base
            while base + len(ahead) <= j:
                ahead.append(next(raw))
            return ahead[j - base]

        while emitted < self.quotas[worker]:
            m = (emitted * NW + worker) * W + R          # global micro-batch index
            first = m * B
            while base < first:                           # skip other readers' slots undecoded
                if ahead:
                    ahead.popleft()
                else:
                    next(raw)
                base += 1
            outs = [self._decode_slot(i, raw_at, stats) for i in range(first, first + B)]
            emitted += 1
            batch = self._batch(outs)
            batch["__meta__"] = {"worker": worker, "raw": first + B, "emitted": emitted,
                                 "stats": stats.pop_delta()}
            yield batch
        yield {"__meta__": {"worker": worker, "raw": 0, "emitted": emitted, "stats": stats.pop_delta(),
                            "stats_only": True}}

    def _decode_slot(self, i: int, raw_at, stats: DataStats) -> dict:
        seed = derive_seed(self.seed, self.epoch, _ORDER_TAG, i)
        scratch = DataStats()  # a substitute's own failure is counted by its own slot's owner
        for k in range(MAX_SUBSTITUTES):
            raw = raw_at(i + k)
            out = self._decode(raw, seed, stats if k == 0 else scratch)
            if out is not None:
                if k:  # a delivered substitute is a good sample of this slot
                    stats.add_good(raw["__shard__"])
                return out
        raise RuntimeError(f"{MAX_SUBSTITUTES} consecutive undecodable samples after slot {i} of epoch "
                           f"{self.epoch}: check the shards with `beit shards verify --dir <shard folder>`")


class GlobalOrderLoader(StreamLoader):
    """``StreamLoader`` whose batches follow the world-size-invariant global order."""

    def _layout(self) -> dict[str, Any]:
        return dict(super()._layout(), order="global")

    def _configure(self) -> None:
        d = self.dataset
        d.epoch = self.epoch
        d.quotas = plan_quotas(None, self.num_batches, d.batch_size, d.num_workers)[0]
        d.progress = list(self._progress)

    def _load_resized(self, saved: list[dict[str, Any]]) -> None:
        """Elastic resume: the saved ranks had trained on slots [0, consumed) of the epoch's global stream
        (micro-batches 0 .. position x world - 1); this run goes on from slot ``consumed``, cut into its own
        micro-batches, so every sample of the epoch comes exactly once over the two runs. Needs the same
        shards and seed, and ``consumed`` a multiple of this run's world x batch (true when the global batch
        is kept, e.g. by --global_batch_size); otherwise the epoch restarts as in the default order."""
        layout, me = saved[0]["layout"], self._layout()
        consumed = int(saved[0]["position"]) * int(layout["world_size"]) * int(layout["batch_size"])
        per_batch = me["world_size"] * me["batch_size"]
        if layout.get("order") != "global":
            problem = "the checkpoint was not written in data_order global"
        elif (layout["seed"], layout["num_shards"]) != (me["seed"], me["num_shards"]):
            problem = "the shards or the seed changed"
        elif len({(s["epoch"], s["position"]) for s in saved}) > 1:
            problem = "its processes were at different positions"
        elif consumed % per_batch:
            problem = (f"{consumed} samples were consumed, not a multiple of {me['world_size']} process(es) x batch "
                       f"{me['batch_size']} (keep the global batch, e.g. with --global_batch_size)")
        else:
            problem = ""
        if problem:
            super()._load_resized(saved, why=f"data_order global cannot re-partition the epoch: {problem}")
            return
        if self._take_resized(saved):
            return
        self.position = min(consumed // per_batch, self.num_batches)
        nw = self.dataset.num_workers
        # the loader hands out micro-batch k from worker k % num_workers (round robin over even quotas)
        self._progress = [(0, len(range(w, self.position, nw))) for w in range(nw)]
        warnings.warn(f"the checkpoint was written by {len(saved)} process(es), this run has {me['world_size']}: "
                      f"epoch {self.epoch} goes on from sample {consumed} of its global order, re-partitioned over "
                      f"{me['world_size']} process(es) (every sample of the epoch once)")


def build_global_order_loader(shards: str | Sequence[str], *, map_fn: MapFn, batch_size: int,
                              **kw: Any) -> GlobalOrderLoader:
    """Like ``build_stream_loader`` (same arguments and checks, same loader API) but with the
    world-size-invariant order described in the module docstring. Batches per epoch per rank
    default to ceil(samples / (world_size x batch_size)) rounded up to ``batch_multiple``: every image
    once, the last slots filled from the next pass; ``resampled`` is not available."""
    if kw.pop("resampled", False):
        raise ValueError("data_order 'global' reads every shard in a fixed order; it cannot be resampled")
    # resampled=True here only skips the shard-count check of the split mode (every reader
    # reads all shards) and sizes the epoch as ceil(samples / (world x batch)), which is what we want.
    base = build_stream_loader(shards, map_fn=map_fn, batch_size=batch_size, resampled=True, **kw)
    d = base.dataset
    ds = GlobalOrderStream(d.shards, d.counts, d.map_fn, d.batch_size, d.rank, d.world_size,
                           base.num_workers, d.seed, d.shuffle_buffer, False, d.min_image_size,
                           d.small_image_size)
    ds.labels, ds.remote_retries = d.labels, d.remote_retries
    loader = GlobalOrderLoader(ds, num_workers=base.num_workers, num_batches=base.num_batches,
                               max_bad_fraction=base.max_bad_fraction, bad_check_after=base.bad_check_after,
                               pin_memory=base.pin_memory, prefetch_factor=base.prefetch_factor,
                               timeout=base.timeout)
    loader.notes = base.notes
    loader.coverage = dict(base.coverage, resampled=False, order="global")
    return loader


def build_loader_for_order(order: str, shards, **kw: Any):
    """``order`` "shards" (default, scalable: disjoint shards per rank) or "global" (this module)."""
    if order == "shards":
        return build_stream_loader(shards, **kw)
    if order == "global":
        return build_global_order_loader(shards, **kw)
    raise ValueError(f"data_order must be 'shards' or 'global', got {order!r}")
