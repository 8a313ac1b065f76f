"""The world-size-invariant data order (data_order: global), checked in one process by building
the loader of every rank of a 1-, 2- and 3-process job: same samples per global batch, same
per-sample randomness, exact resume, bad samples counted once and replaced deterministically."""
import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from beit.data.loading.global_order import build_global_order_loader, build_loader_for_order


def draw(img, sample):
    """map_fn whose output depends on the image and on the per-sample seeded RNGs."""
    return {"pix": torch.from_numpy(np.asarray(img.convert("RGB").resize((4, 4)), dtype=np.float32)).mean(),
            "r": torch.tensor([random.random(), torch.rand(()).item()])}


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), ((37 * i) % 256, (11 * i) % 256, (5 * i) % 256)).save(buf, "JPEG")
    return buf.getvalue()


def write_shards(root, n_shards=3, per_shard=10, bad=()):
    """``n_shards`` tars of ``per_shard`` JPEGs plus a manifest; keys in ``bad`` get garbage bytes."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(n_shards):
        path = root / f"train-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for j in range(per_shard):
                key = f"s{s}_{j:03d}"
                data = b"not a jpeg" if key in bad else _jpeg(s * per_shard + j)
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        shards.append({"name": path.name, "samples": per_shard, "bytes": path.stat().st_size, "sha256": ""})
    (root / "manifest.json").write_text(json.dumps({"shards": shards, "num_samples": n_shards * per_shard,
                                                    "label_map": None, "source": "test", "options": {}}))
    return str(root / ("train-{000000..%06d}.tar" % (n_shards - 1)))


def epoch_steps(spec, world, batch, workers=0, epoch=0, **kw):
    """Global micro-batch groups of one epoch: for each step, {key: (pix, r)} over all ranks."""
    loaders = [build_global_order_loader(spec, map_fn=draw, batch_size=batch, rank=r, world_size=world,
                                         num_workers=workers, seed=3, shuffle_buffer=7, **kw)
               for r in range(world)]
    for ld in loaders:
        ld.set_epoch(epoch)
    per_rank = [list(ld) for ld in loaders]
    assert len({len(b) for b in per_rank}) == 1, "ranks must yield the same number of batches"
    steps = []
    for k in range(len(per_rank[0])):
        group = {}
        for r in range(world):
            b = per_rank[r][k]
            for i, key in enumerate(b["__key__"]):
                group.setdefault(key, []).append((float(b["pix"][i]), tuple(b["r"][i].tolist())))
        steps.append(group)
    return steps, loaders


def test_global_batches_and_randomness_do_not_depend_on_world_size(tmp_path):
    spec = write_shards(tmp_path / "d")
    one, _ = epoch_steps(spec, world=1, batch=6)
    two, _ = epoch_steps(spec, world=2, batch=3)
    three, _ = epoch_steps(spec, world=3, batch=2, workers=2)
    assert len(one) == len(two) == len(three) == 5            # 30 samples // global micro-batch of 6
    assert one == two == three                                 # same keys, pixels and random draws per step
    keys = [k for step in one for k in step]
    assert len(keys) == len(set(keys)) == 30                   # every sample exactly once
    other_epoch, _ = epoch_steps(spec, world=1, batch=6, epoch=1)
    assert other_epoch != one                                  # epochs reshuffle


def test_world_size_changes_order_in_default_mode_but_not_in_global(tmp_path):
    """Guards the reason this mode exists: the scalable default gives different global batches."""
    spec = write_shards(tmp_path / "d")
    def keys(order, world):
        lds = [build_loader_for_order(order, spec, map_fn=draw, batch_size=6 // world, rank=r, world_size=world,
                                      num_workers=0, seed=3, shuffle_buffer=7) for r in range(world)]
        # the keys of each global micro-batch (every rank's batch of that step)
        return [sorted(k for b in ld_b for k in b["__key__"]) for ld_b in zip(*[list(ld) for ld in lds])]
    assert keys("global", 1) == keys("global", 2)
    assert keys("shards", 1) != keys("shards", 3)
    with pytest.raises(ValueError, match="data_order"):
        build_loader_for_order("random", spec, map_fn=draw, batch_size=2)


def test_resume_mid_epoch_continues_with_the_same_batches(tmp_path):
    spec = write_shards(tmp_path / "d")
    def make():
        return build_global_order_loader(spec, map_fn=draw, batch_size=3, rank=1, world_size=2,
                                         num_workers=2, seed=3, shuffle_buffer=7)
    full = list(make())
    ld = make()
    it = iter(ld)
    head = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(ld.state_dict()))            # JSON-safe, as checkpoints store it
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b["__key__"] for b in head + rest] == [b["__key__"] for b in full]
    assert all(torch.equal(a["r"], b["r"]) for a, b in zip(head + rest, full))


def test_bad_samples_counted_once_and_replaced_identically(tmp_path):
    spec = write_shards(tmp_path / "d", bad={"s0_003", "s1_007"})
    one, l1 = epoch_steps(spec, world=1, batch=6, max_bad_fraction=0.5)
    two, l2 = epoch_steps(spec, world=2, batch=3, max_bad_fraction=0.5)
    assert one == two
    def bad(lds):
        return sum(ld.stats["bad"] for ld in lds)

    def good(lds):
        return sum(ld.stats["samples"] for ld in lds)
    assert bad(l1) == bad(l2) == 2 and good(l1) == good(l2) == 30
    assert all(not k.startswith(("s0_003", "s1_007")) for step in one for k in step)
    with pytest.raises(ValueError, match="resampled"):
        build_global_order_loader(spec, map_fn=draw, batch_size=2, resampled=True)


def _run_ranks(spec, world, batch, steps=None, state=None, workers=0):
    """Every rank's loader of a ``world``-process job (global order), resumed from ``state`` (a
    ``{"saved_ranks": [...]}`` of another job) if given; ``steps`` micro-batches each (None: the rest of the
    epoch). Returns (global groups of keys per micro-step, JSON-safe per-rank states)."""
    lds = [build_global_order_loader(spec, map_fn=draw, batch_size=batch, rank=r, world_size=world,
                                     num_workers=workers, seed=3, shuffle_buffer=7) for r in range(world)]
    per_rank = []
    for ld in lds:
        if state is not None:
            with pytest.warns(UserWarning, match="re-partitioned"):
                ld.load_state_dict(json.loads(json.dumps(state)))
        it = iter(ld)
        per_rank.append([next(it) for _ in range(steps)] if steps is not None else list(it))
    groups = [sorted(k for b in step for k in b["__key__"]) for step in zip(*per_rank)]
    return groups, [json.loads(json.dumps(ld.state_dict())) for ld in lds]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3)])
def test_elastic_resume_sees_every_sample_of_the_epoch_once(tmp_path, before, after):
    """Checkpointed on ``before`` processes after 2 steps, resumed on ``after``: the rest of the epoch is
    re-partitioned, and the global batches are those of the uninterrupted run (global batch 6 kept)."""
    spec = write_shards(tmp_path / "d", n_shards=3, per_shard=12)           # 36 samples = 6 steps of 6
    full, _ = _run_ranks(spec, 1, 6)
    head, saved = _run_ranks(spec, before, 6 // before, steps=2)
    tail, _ = _run_ranks(spec, after, 6 // after, state={"saved_ranks": [s for s in saved]}, workers=2)
    assert head + tail == full
    keys = [k for g in head + tail for k in g]
    assert len(keys) == len(set(keys)) == 36


def test_elastic_resume_counts_and_fallbacks(tmp_path):
    spec = write_shards(tmp_path / "d", n_shards=3, per_shard=12, bad={"s1_004"})
    lds = [build_global_order_loader(spec, map_fn=draw, batch_size=3, rank=r, world_size=2, num_workers=0,
                                     seed=3, shuffle_buffer=7, max_bad_fraction=0.5) for r in range(2)]
    for ld in lds:
        list(ld)                                                             # a whole epoch
    saved = [json.loads(json.dumps(ld.state_dict())) for ld in lds]

    def total(lds, k):
        return sum(ld.stats[k] for ld in lds)

    # 2 -> 3 processes: the counts carry on (summed over ranks), the complete epoch is not redone
    new = [build_global_order_loader(spec, map_fn=draw, batch_size=2, rank=r, world_size=3, num_workers=0,
                                     seed=3, shuffle_buffer=7, max_bad_fraction=0.5) for r in range(3)]
    for ld in new:
        ld.load_state_dict({"saved_ranks": saved})
        assert ld.epoch == 0 and ld.position == len(ld)                        # next iteration: epoch 1
    assert total(new, "samples") == total(lds, "samples") and total(new, "bad") == total(lds, "bad") == 1
    # another global batch (6 -> 4 per micro-step over 2 ranks of 2): cannot re-partition, restarts the epoch
    half = [dict(s, position=1) for s in saved]                                # 6 samples consumed
    odd = build_global_order_loader(spec, map_fn=draw, batch_size=4, rank=0, world_size=1, num_workers=0,
                                    seed=3, shuffle_buffer=7)
    with pytest.warns(UserWarning, match="not a multiple of 1 process.* x batch 4.*restarts from its first batch"):
        odd.load_state_dict({"saved_ranks": half})
    assert odd.position == 0 and odd.epoch == 0
    # the default order restarts the epoch, and says why
    from beit.data.loading.stream import build_stream_loader
    plain = build_stream_loader(spec, map_fn=draw, batch_size=6, num_workers=0, seed=3)
    with pytest.warns(UserWarning, match="data_order shards .*restarts from its first batch"):
        plain.load_state_dict({"saved_ranks": [dict(s, layout=dict(s["layout"], order="shards")) for s in half]})
    assert plain.position == 0
