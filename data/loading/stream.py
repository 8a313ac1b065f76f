"""Streaming loader over WebDataset tar shards: robust, distributed, resumable.

Layout of one epoch (every rank computes the same plan from the seed, with no communication):

* non-resampled: the shard list is permuted with (seed, epoch); rank r takes every R-th shard,
  worker w of that rank every W-th of those, so ranks and workers read disjoint shards.
  Fewer shards than ranks x workers: fewer workers (``loader.notes``); fewer than ranks is refused
  at start-up (or use ``resampled=True``).
* resampled: every worker draws shards with replacement, seeded by (seed, epoch, rank, worker).
* ``len(loader)`` = batches per epoch, the same on every rank and every epoch (DDP needs equal
  step counts): ``batches_per_epoch`` or, from the manifest's per-shard counts, the fewest batches
  in which every rank can show every sample of its shards once in any epoch's shard layout,
  rounded up to a multiple of ``batch_multiple`` (gradient accumulation). Batches are always full:
  a worker that has shown all its samples (or lost some to bad data, a truncated or missing shard)
  fills its remaining batch quota from another shuffled pass over its shards. So NO sample is left
  out of an epoch; the few repeats that fill the last batches are counted in ``loader.coverage``
  and stated by ``loader.describe()``. Fewer shards than ranks x workers: the workers per rank are
  clamped to what the shards allow (``loader.notes`` says so); fewer shards than ranks is refused
  unless ``resampled``.
* Each worker streams its shards through a seeded shuffle buffer (drained at the end of each
  pass), decodes robustly (``beit.data.loading.decode``), seeds ``random``/numpy/torch per sample from
  (seed, epoch, rank, worker, index) and calls ``map_fn(image, sample)``; ``sample["__seed__"]``
  is that seed (reseed your own generators, e.g. a MaskingGenerator, with it).
* Bad samples are skipped and counted by reason; the counts ride with each batch to the main
  process (``loader.stats``) and more than ``max_bad_fraction`` bad raises DataQualityError.
* Each batch also tells how far its worker has read, so ``state_dict()`` holds the epoch, the
  batch position and each worker's read position; after ``load_state_dict`` the loader skips the
  already-consumed samples without decoding them and continues with exactly the same batches.

Never pass this loader through ``accelerator.prepare``; move batches with ``to_device``.
"""
from __future__ import annotations

import collections
import contextlib
import math
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from beit.data.loading.data_stats import DataStats
from beit.data.loading.decode import BadSample, is_undecoded, load_pixels, open_image
from beit.data.pipelines.transforms import seed_everything
from beit.data.storage.remote import RETRIES, RemoteReadError, open_shard
from beit.data.storage.shard_format import image_ext, iter_tar_samples
from beit.data.storage.shardspec import expand_shards, resolve_sample_counts
from beit.runtime.stopping import ignore_stop_signals

MapFn = Callable[[Any, dict], dict]
STATE_VERSION = 1


def derive_seed(*ints: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative integers."""
    a, b = np.random.SeedSequence([int(i) & 0xFFFFFFFF for i in ints]).generate_state(2)
    return ((int(a) << 32) | int(b)) & 0x7FFFFFFFFFFFFFFF


def plan_quotas(n: list[list[int]] | None, num_batches: int, batch_size: int,
                num_workers: int) -> list[list[int]]:
    """Batch quota per rank and worker summing to ``num_batches`` on every rank.

    ``n[r][w]`` = samples assigned to worker w of rank r (None: unknown -> even split). Each
    worker first gets ceil(n/B), enough to show each of its samples once; a rank with more than
    ``num_batches`` (only with an explicit, shorter epoch) is trimmed from its fullest worker; the
    batches a rank still lacks go to its least over-filled workers (repeats from their next pass).
    """
    if n is None:
        return [[num_batches // num_workers + (w < num_batches % num_workers) for w in range(num_workers)]]
    out = []
    for rank_n in n:
        k = [-(-c // batch_size) for c in rank_n]
        while sum(k) > num_batches:
            k[max(range(len(k)), key=lambda i: (k[i], -i))] -= 1
        fillable = [i for i in range(len(k)) if rank_n[i] > 0] or list(range(len(k)))
        while sum(k) < num_batches:
            k[min(fillable, key=lambda i: (k[i] * batch_size - rank_n[i], k[i], i))] += 1
        out.append(k)
    return out


def rng_states() -> tuple:
    """The process-wide random/numpy/torch (CPU) RNG states (numpy's alone costs ~0.2 ms)."""
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def set_rng_states(saved: tuple) -> None:
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


@contextlib.contextmanager
def _seeded(seed: int, keep_outer: bool):
    """Seed random/numpy/torch for one sample; with ``keep_outer`` restore the caller's RNG states
    afterwards so the training loop's randomness is untouched."""
    saved = rng_states() if keep_outer else None
    seed_everything(seed)
    try:
        yield
    finally:
        if saved is not None:
            set_rng_states(saved)


def image_member(raw: dict) -> str:
    """The extension of the sample's image member; BadSample("no_image") when it has none."""
    ext = image_ext(raw)
    if ext is None:
        raise BadSample("no_image", f"members: {sorted(k for k in raw if not k.startswith('__'))}")
    return ext


def map_image(raw: dict, ext: str, map_fn: MapFn, seed: int, *, min_image_size: int = 1,
              lazy_jpeg: bool = True, keep_outer: bool | None = None) -> tuple[Any, str | None, dict]:
    """Open the sample's image robustly and run ``map_fn(image, sample + __seed__)`` with
    random/numpy/torch seeded from ``seed``. Returns (image, original mode if converted, output).
    Raises BadSample, also for a decoder error that surfaces inside ``map_fn`` on a lazily
    decoded JPEG; any other error in ``map_fn`` is a bug and propagates. ``keep_outer``: restore
    the caller's RNG states afterwards (default: in the main process, where the loop runs)."""
    img, converted = open_image(raw[ext], min_size=min_image_size, lazy_jpeg=lazy_jpeg)
    lazy = is_undecoded(img)
    if keep_outer is None:
        keep_outer = get_worker_info() is None
    try:
        with _seeded(seed, keep_outer=keep_outer):
            out = map_fn(img, dict(raw, __seed__=seed))
    except BadSample:
        raise
    except Exception:
        if lazy:
            load_pixels(open_image(raw[ext], min_size=1)[0])
        raise
    if not isinstance(out, dict):
        raise TypeError(f"map_fn must return a dict of tensors/numbers, got {type(out).__name__}")
    return img, converted, out


def round_robin(quotas: list[int]) -> list[int]:
    """Worker id of every batch of an epoch: round robin over workers with quota left."""
    left, order = list(quotas), []
    while any(left):
        for w, q in enumerate(left):
            if q:
                order.append(w)
                left[w] -= 1
    return order


def covering_batches(counts: list[int], world_size: int, num_workers: int, batch_size: int) -> int:
    """Batches per rank that let every rank show every sample of its shards once, in every epoch.

    The epoch's shard permutation gives a rank at most ceil(S/R) shards, so at most the M samples
    of the ceil(S/R) largest ones; split over its W' active workers, sum_w ceil(n_w/B) <=
    ceil(M/B) + W' - 1 (exactly M/B when every shard holds a multiple of B samples).
    """
    per_rank = -(-len(counts) // world_size)
    most = sum(sorted(counts, reverse=True)[:per_rank])
    if all(c % batch_size == 0 for c in counts):
        return most // batch_size
    return -(-most // batch_size) + min(max(1, num_workers), per_rank) - 1


class ShardStream(IterableDataset):
    """Worker-side part of the loader: yields collated batches with a ``__meta__`` entry."""

    def __init__(self, shards: list[str], counts: list[int] | None, map_fn: MapFn, batch_size: int,
                 rank: int, world_size: int, num_workers: int, seed: int, shuffle_buffer: int,
                 resampled: bool, min_image_size: int, small_image_size: int | None):
        super().__init__()
        self.shards, self.counts, self.map_fn = shards, counts, map_fn
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers = max(1, num_workers)
        self.seed, self.shuffle_buffer, self.resampled = seed, shuffle_buffer, resampled
        self.min_image_size, self.small_image_size = min_image_size, small_image_size
        self.remote_retries = RETRIES
        # set by the loader before each epoch
        self.epoch, self.quotas, self.assign, self.progress = 0, [0], [[]], [(0, 0)]

    # ---- epoch plan (computed identically on every rank) ----
    def assignment(self, epoch: int) -> list[list[list[int]]]:
        """Shard indices per rank and worker for ``epoch`` (non-resampled mode)."""
        order = np.random.default_rng(derive_seed(self.seed, epoch, 1)).permutation(len(self.shards))
        W = self.num_workers
        return [[list(order[r::self.world_size][w::W]) for w in range(W)] for r in range(self.world_size)]

    # ---- worker side ----
    labels = True  # read ``cls`` into ``label``; False: ignore labels (pretraining, mixed labelled/unlabelled shards)

    def _expected(self, idx: int) -> int | None:
        return self.counts[idx] if self.counts is not None else None

    def _read_shard(self, idx: int, stats: DataStats) -> Iterator[dict]:
        url = self.shards[idx]
        n = 0
        try:
            stream = open_shard(url, retries=self.remote_retries, on_retry=lambda *_: stats.add_retry())
        except OSError as e:
            self._dead.add(idx)
            exp = self._expected(idx)
            stats.add_bad(url, "missing_shard", n=max(exp or 1, 1), detail=str(e))
            return
        try:
            with stream:
                for sample in iter_tar_samples(stream):
                    sample["__shard__"] = url
                    n += 1
                    yield sample
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            if idx in self._damaged:  # counted on the first pass of this epoch already
                return
            self._damaged.add(idx)
            exp = self._expected(idx)
            lost = max((exp - n) if exp is not None else 1, 1)
            reason = "connection_lost" if isinstance(e, RemoteReadError) else "tar_error"
            stats.add_bad(url, reason, n=lost,
                          detail=f"{lost} sample(s) lost: read {n} of {exp if exp is not None else '?'} expected "
                                 f"(manifest, else the tar index: then a lower bound), {type(e).__name__}: {e}")

    def _shuffled(self, it: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        buf: list[dict] = []
        for s in it:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _raw_stream(self, worker: int, stats: DataStats) -> Iterator[dict]:
        """Infinite deterministic stream of raw samples for this worker and epoch."""
        mine = self.assign[worker]
        self._dead, self._damaged = set(), set()  # per epoch: missing shards, counted tar errors
        for cycle in range(1 << 62):
            rng = random.Random(derive_seed(self.seed, self.epoch, self.rank, worker, cycle))
            if self.resampled:
                draws = max(1, math.ceil(len(self.shards) / (self.world_size * self.num_workers)))
                order = [rng.randrange(len(self.shards)) for _ in range(draws)]
            else:
                order = [i for i in mine if i not in self._dead]
                rng.shuffle(order)
            if not order:
                raise RuntimeError(f"rank {self.rank} worker {worker}: all its shards are missing "
                                   f"(e.g. {[self.shards[i] for i in mine][:3]}); bad: {stats.data['bad_by_reason']}")
            got = 0
            for s in self._shuffled((x for i in order for x in self._read_shard(i, stats)), rng):
                got += 1
                yield s
            if got == 0:
                names = [self.shards[i] for i in order][:3]
                raise RuntimeError(f"no readable samples in the shards of rank {self.rank} worker {worker} "
                                   f"(e.g. {names}); bad: {stats.data['bad_by_reason']}")

    def _decode(self, raw: dict, sample_seed: int, stats: DataStats) -> dict | None:
        key, shard = raw["__key__"], raw["__shard__"]
        try:
            ext = image_member(raw)
            label = None
            if self.labels and "cls" in raw:
                try:
                    label = int(raw["cls"].decode("ascii").strip())
                except (UnicodeDecodeError, ValueError):
                    raise BadSample("bad_label", f"cls={raw['cls'][:20]!r}") from None
            img, converted, out = map_image(raw, ext, self.map_fn, sample_seed, min_image_size=self.min_image_size,
                                            keep_outer=False)  # the caller's RNG states: kept per batch in __iter__
        except BadSample as e:
            stats.add_bad(shard, e.reason, key=key, detail=e.detail)
            return None
        if converted:
            stats.add_converted(converted)
        if self.small_image_size and min(img.size) < self.small_image_size:
            stats.add_upscaled()
        if label is not None:
            out.setdefault("label", label)
        out["__key__"] = key
        stats.add_good(shard)
        return out

    def _batch(self, outs: list[dict]) -> dict:
        keys = [o.pop("__key__") for o in outs]
        batch = default_collate(outs)
        batch["__key__"] = keys
        return batch

    def __iter__(self) -> Iterator[dict]:
        if get_worker_info() is not None:
            yield from self._batches()
            return
        # In the main process (num_workers=0) the per-sample seeding must leave the training loop's RNG
        # states as they were: saved when a batch starts and restored before it is handed over (once
        # per batch, not per sample), so the loop sees the states a worker process would leave.
        saved = rng_states()
        batches = self._batches()
        try:
            while True:
                try:
                    batch = next(batches)
                finally:
                    set_rng_states(saved)
                yield batch
                saved = rng_states()
        except StopIteration:
            return
        finally:
            batches.close()

    def _batches(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        quota = self.quotas[worker]
        raw_pos, emitted = self.progress[worker]
        stats = DataStats()
        stream = self._raw_stream(worker, stats)
        for _ in range(raw_pos):  # resume: skip consumed samples without decoding them
            next(stream)
        outs: list[dict] = []
        mine = sum(self.counts[i] for i in self.assign[worker]) if self.counts and not self.resampled else 0
        bad_run, bad_limit = 0, max(2 * mine, 256)  # two whole passes without one good sample: give up
        while emitted < quota:
            raw = next(stream)
            raw_pos += 1
            out = self._decode(raw, derive_seed(self.seed, self.epoch, self.rank, worker, raw_pos, 7), stats)
            if out is None:
                bad_run += 1
                if bad_run >= bad_limit:  # would never fill a batch: stop with the counts, not hang
                    seen = DataStats(stats.data)
                    seen.check(0.0)
                continue
            bad_run = 0
            outs.append(out)
            if len(outs) == self.batch_size:
                emitted += 1
                batch = self._batch(outs)
                outs = []
                batch["__meta__"] = {"worker": worker, "raw": raw_pos, "emitted": emitted,
                                     "stats": stats.pop_delta()}
                yield batch
        yield {"__meta__": {"worker": worker, "raw": raw_pos, "emitted": emitted,
                            "stats": stats.pop_delta(), "stats_only": True}}


def _warn_damaged_shards(delta: dict) -> None:
    """Name a truncated / unreadable / missing shard on the main process (once per shard and detail)."""
    for ex in delta.get("examples", []):
        if ex["reason"] in ("tar_error", "missing_shard", "connection_lost"):
            warnings.warn(f"shard {ex['shard']}: {ex['reason']}: {ex['detail']}", stacklevel=2)


class EpochLoader:
    """What the training loops see of a loader besides its batches: length, counts, start-up lines."""

    num_batches: int
    _stats: DataStats
    notes: list[str]
    coverage: dict[str, Any]

    def describe(self) -> str:
        """One line for the start-up summary: what an epoch covers."""
        return describe_epoch(**self.coverage) if self.coverage else f"{self.num_batches} batches per epoch"

    def __len__(self) -> int:
        return self.num_batches

    @property
    def stats(self) -> dict[str, Any]:
        """Counts so far on this rank (see DataStats for the layout)."""
        return self._stats.data

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Flat counts for logging; sum them across ranks (e.g. accelerator.reduce) first."""
        return self._stats.metrics(prefix)


class StreamLoader(EpochLoader):
    """One epoch of dict batches per iteration; see the module docstring."""

    def __init__(self, dataset: ShardStream, *, num_workers: int, num_batches: int,
                 max_bad_fraction: float, bad_check_after: int, pin_memory: bool = False,
                 prefetch_factor: int = 2, timeout: float = 0):
        self.dataset = dataset
        self.num_workers = num_workers
        self.num_batches = num_batches
        self.max_bad_fraction, self.bad_check_after = max_bad_fraction, bad_check_after
        self.pin_memory, self.prefetch_factor, self.timeout = pin_memory, prefetch_factor, timeout
        self._stats = DataStats()
        self.epoch, self.position = 0, 0
        self._progress = [(0, 0)] * dataset.num_workers
        self.notes: list[str] = []      # start-up remarks for the run's log (e.g. clamped workers)
        self.coverage: dict[str, Any] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order and shuffling); a saved mid-epoch position is kept only
        when ``epoch`` is the saved one."""
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0
            self._progress = [(0, 0)] * self.dataset.num_workers

    def _layout(self) -> dict[str, Any]:
        d = self.dataset
        return {"world_size": d.world_size, "num_workers": d.num_workers, "batch_size": d.batch_size,
                "seed": d.seed, "num_shards": len(d.shards), "resampled": d.resampled,
                "num_batches": self.num_batches}

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe position: epoch, batches consumed, each worker's read position, stats."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position,
                "workers": [list(p) for p in self._progress], "layout": self._layout(),
                "stats": self._stats.data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``, or from ``{"saved_ranks": [state of rank 0, ...]}`` written by another
        number of processes (``resized_state``)."""
        if "saved_ranks" in state:
            self._load_resized(state["saved_ranks"])
            return
        self.epoch = int(state["epoch"])
        self._stats = DataStats(state.get("stats"))
        if state.get("layout") != self._layout():
            saved_batches = (state.get("layout") or {}).get("num_batches")
            complete = saved_batches is not None and int(state["position"]) >= int(saved_batches)
            # a complete epoch keeps its number at its end, as a same-layout resume has it: the caller's
            # "saved right at the end of an epoch" check then moves on instead of replaying it
            self.position = self.num_batches if complete else 0
            self._progress = [(0, 0)] * self.dataset.num_workers
            what = (f"epoch {self.epoch} was complete; epoch {self.epoch + 1} starts from its first batch" if complete
                    else f"restarting epoch {self.epoch} from its first batch")
            warnings.warn(f"data loader layout changed since the checkpoint ({state.get('layout')} -> "
                          f"{self._layout()}); {what}")
            return
        self.position = int(state["position"])
        self._progress = [tuple(p) for p in state["workers"]]

    def _take_resized(self, saved: list[dict[str, Any]]) -> bool:
        """Epoch and counts from the states of a run with another process count (this rank takes the counts
        of saved ranks rank, rank + world, ... so the totals over ranks carry on); True when the saved
        epoch was complete (then the position is the epoch's end, as a same-size resume would have it)."""
        d = self.dataset
        self.epoch = int(saved[0]["epoch"])
        self._stats = DataStats()
        for s in saved[d.rank::d.world_size]:
            self._stats.merge(s.get("stats") or {})
        complete = all(int(s["position"]) >= int(s["layout"]["num_batches"]) for s in saved)
        self.position = self.num_batches if complete else 0
        self._progress = [(0, 0)] * d.num_workers
        return complete

    def _load_resized(self, saved: list[dict[str, Any]], why: str = "") -> None:
        """Another process count: per-process shard positions do not map, so the saved epoch restarts
        (unless it was complete); ``data_order global`` re-partitions instead (``GlobalOrderLoader``)."""
        if not self._take_resized(saved):
            why = why or ("with data_order shards the processes' places in their own shards do not carry over "
                          "(--data_order global resumes an epoch exactly once on any process count)")
            warnings.warn(f"the checkpoint was written by {len(saved)} process(es), this run has "
                          f"{self.dataset.world_size}: {why}; epoch {self.epoch} restarts from its first batch "
                          "(samples already seen in it come again)")

    def _configure(self) -> None:
        d = self.dataset
        d.epoch = self.epoch
        if d.resampled:
            d.assign = [[] for _ in range(d.num_workers)]
            n = None
        else:
            assign = d.assignment(self.epoch)
            d.assign = assign[d.rank]
            n = ([[sum(d.counts[i] for i in ws) for ws in rank] for rank in assign]
                 if d.counts is not None else None)
        quotas = plan_quotas(n, self.num_batches, d.batch_size, d.num_workers)
        d.quotas = quotas[d.rank] if n is not None else quotas[0]
        d.progress = list(self._progress)

    def __iter__(self) -> Iterator[dict]:
        if self.position >= self.num_batches:  # finished epoch without set_epoch: go on to the next
            self.set_epoch(self.epoch + 1)
        self._configure()
        if self.num_workers > 0:
            source = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor,
                                timeout=self.timeout, persistent_workers=False, worker_init_fn=ignore_stop_signals,
                                # the workers' base seed from its own generator, not from the training process's
                                # RNG: a run resumed mid-epoch draws drop path as the uninterrupted one did
                                generator=torch.Generator().manual_seed(derive_seed(self.dataset.seed, self.epoch, 11)))
        else:
            source = self.dataset
        # Yield in a fixed round-robin order over the workers (whatever order they finish in),
        # so a resumed epoch continues with exactly the batches the interrupted one would have had.
        pending: dict[int, collections.deque] = {w: collections.deque() for w in range(self.dataset.num_workers)}
        items = iter(source)
        for worker in round_robin(self.dataset.quotas)[self.position:]:
            while not pending[worker]:
                item = next(items, None)
                if item is None:
                    raise RuntimeError(f"rank {self.dataset.rank}: worker {worker} ended before its batch "
                                       f"quota in epoch {self.epoch}; please report this")
                meta = item.pop("__meta__")
                if meta.get("stats_only"):
                    _warn_damaged_shards(meta["stats"])
                    self._stats.merge(meta["stats"])
                else:
                    pending[meta["worker"]].append((item, meta))
            item, meta = pending[worker].popleft()
            _warn_damaged_shards(meta["stats"])
            self._stats.merge(meta["stats"])
            self._progress[worker] = (meta["raw"], meta["emitted"])
            self.position += 1
            if self._stats.total >= self.bad_check_after:
                self._stats.check(self.max_bad_fraction)
            yield item
        for item in items:  # the workers' final counts
            meta = item.pop("__meta__")
            _warn_damaged_shards(meta["stats"])
            self._stats.merge(meta["stats"])
        self._stats.check(self.max_bad_fraction)


def state_part(state: dict[str, Any], key: str) -> dict[str, Any]:
    """``state[key]`` of a composite loader state, also for ``{"saved_ranks": [...]}`` (another process count)."""
    if "saved_ranks" in state:
        return {"saved_ranks": [s[key] for s in state["saved_ranks"]]}
    return state[key]


def describe_epoch(images: int | None, shards: int, batches: int, batch_size: int, world_size: int,
                   resampled: bool, explicit: bool, order: str = "shards") -> str:
    """'37 images in 5 shards; an epoch = 5 batches x 8 x 1 process = 40 samples: every image once,
    3 repeats fill the last batches'."""
    slots = batches * batch_size * world_size
    head = (f"{images} images" if images is not None else "? images") + f" in {shards} shard(s); an epoch = " \
        f"{batches} batch(es) x {batch_size} x {world_size} process(es) = {slots} samples"
    if images is None:
        return head + " (image count unknown: remote shards)"
    if resampled:
        return head + ": resampled (shards drawn with replacement; some images may come twice, some not at all)"
    if explicit and slots < images:
        return head + f": batches_per_epoch is set, so {images - slots} images wait for a later epoch"
    extra = slots - images
    tail = "every image once" + (f", {extra} repeat(s) fill the last batches" if extra else "")
    if order == "shards" and world_size > 1 and extra:
        tail += " (and keep every process at the same step count)"
    return f"{head}: {tail}"


def to_device(batch: dict[str, Any], device, non_blocking: bool = True) -> dict[str, Any]:
    """Move the tensors of a batch to ``device`` (other entries, e.g. ``__key__``, stay)."""
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


def build_stream_loader(shards: str | Sequence[str], *, map_fn: MapFn, batch_size: int,
                        num_workers: int = 2, rank: int = 0, world_size: int = 1, seed: int = 0,
                        shuffle_buffer: int = 1000, resampled: bool = False,
                        batches_per_epoch: int | None = None, allow_remote: bool = False,
                        max_bad_fraction: float = 0.01, bad_check_after: int = 200,
                        min_image_size: int = 8, small_image_size: int | None = None,
                        manifest: str | None = None, pin_memory: bool = False,
                        prefetch_factor: int = 2, timeout: float = 0, batch_multiple: int = 1,
                        labels: bool = True, remote_retries: int = RETRIES) -> StreamLoader:
    """Build the streaming loader for ``shards`` (path, brace pattern, glob, folder, list or
    comma-separated string; URLs and ``pipe:`` only with ``allow_remote``).

    ``map_fn(image, sample) -> dict`` turns one RGB PIL image (a plain RGB JPEG may arrive still
    undecoded, which ``TwoViewTransform`` uses for draft decoding; any PIL operation decodes it)
    and its sample dict (raw member bytes, ``__key__``, ``__shard__``, ``__seed__``) into a dict
    of tensors/numbers; ``label`` is added from ``cls`` when present (``labels=False``: never, so
    labelled and unlabelled shards mix, as pretraining needs). Images with a side below
    ``min_image_size`` are skipped as "too_small"; below ``small_image_size`` they are used and
    counted as "upscaled". The bad fraction is checked once ``bad_check_after`` samples were seen
    and at the end of each epoch. Sample counts come from ``manifest`` (a path or URL) or the
    manifest.json beside the shards (fetched for http(s) shards); a dropped connection is retried
    ``remote_retries`` times in a row (``beit.data.storage.remote``). Every start-up problem raises ValueError
    before any work.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction is a fraction in [0, 1], got {max_bad_fraction}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1 (1 = no shuffling), got {shuffle_buffer}")
    if not callable(map_fn):
        raise ValueError("map_fn must be a function (image, sample) -> dict")
    urls = expand_shards(shards, allow_remote=allow_remote)
    notes: list[str] = []
    if not resampled and len(urls) < world_size:
        raise ValueError(
            f"{len(urls)} shard(s) for {world_size} processes: every process needs at least one shard of its own "
            f"(an idle process would hang DDP). Write more, smaller shards (beit shards write --samples_per_shard "
            f"N with N <= images / {world_size}), run fewer processes, or pass --resampled true (every process "
            f"draws shards with replacement).")
    if not resampled and num_workers > 0 and len(urls) < world_size * num_workers:
        fit = len(urls) // world_size
        notes.append(f"data loader workers clamped from {num_workers} to {fit} per process: {len(urls)} shard(s) "
                     f"over {world_size} process(es) give each worker at least one shard of its own only so")
        num_workers = fit
    counts, unknown_why = resolve_sample_counts(urls, manifest, retries=remote_retries)
    multiple = max(1, int(batch_multiple))
    explicit = batches_per_epoch is not None
    if batches_per_epoch is None:
        if counts is None:
            raise ValueError(f"the number of samples in the remote shards is unknown ({unknown_why}): pass "
                             f"--manifest <path or URL of the shards' manifest.json> (Python: manifest=...), or "
                             f"--batches_per_epoch N (micro-batches per process per epoch)")
        if sum(counts) == 0:
            empty = [u for u, c in zip(urls, counts) if c == 0]
            raise ValueError(f"the {len(counts)} shard(s) hold no samples (empty or unreadable tars, e.g. "
                             f"{empty[:3]}): "
                             f"write them again with `beit shards write --source <folder of images> --out <folder>`, "
                             f"or check them with `beit shards verify --dir <folder>`")
        batches_per_epoch = (-(-sum(counts) // (world_size * batch_size)) if resampled
                             else covering_batches(counts, world_size, num_workers, batch_size))
        batches_per_epoch = -(-batches_per_epoch // multiple) * multiple
    elif batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
    ds = ShardStream(urls, counts, map_fn, batch_size, rank, world_size, num_workers, seed, shuffle_buffer,
                     resampled, min_image_size, small_image_size)
    ds.labels, ds.remote_retries = labels, int(remote_retries)
    loader = StreamLoader(ds, num_workers=num_workers, num_batches=batches_per_epoch,
                          max_bad_fraction=max_bad_fraction, bad_check_after=bad_check_after,
                          pin_memory=pin_memory, prefetch_factor=prefetch_factor, timeout=timeout)
    loader.notes = notes
    loader.coverage = {"images": sum(counts) if counts is not None else None, "shards": len(urls),
                       "batches": batches_per_epoch, "batch_size": batch_size, "world_size": world_size,
                       "resampled": resampled, "explicit": explicit}
    return loader
