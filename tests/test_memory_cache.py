"""The memory-cache path: images decoded once into a uint8 store, augmented in batches; Pillow-equal resizing,
timm's crop distribution, every image once per epoch on 1 and 2 processes, exact (and elastic) resume of the
loader, exact resume of real pretraining and fine-tuning runs on it, and the start-up summary's data path."""
from __future__ import annotations

import collections
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_epoch_coverage import N_IMAGES, uneven_shards
from test_pretrain import assets, crash_after_step, losses, run, tiny_cfg  # noqa: F401 (assets: a fixture)

from beit.data.loading.memory_loader import MemoryLoader
from beit.data.loading.memory_store import clear_stores, decoded_store
from beit.data.pipelines.batched import BOX_TRIES, random_resized_boxes, resize_boxes
from beit.data.pipelines.memory_path import ClassifyBatch
from beit.data.pipelines.transforms import INTERPOLATIONS
from beit.data.storage.shardspec import expand_shards

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_stores_between_tests():
    clear_stores()
    yield
    clear_stores()


def _frame(arrays):
    h, w = max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays)
    x = torch.zeros(len(arrays), 3, h, w, dtype=torch.uint8)
    for i, a in enumerate(arrays):
        x[i, :, :a.shape[0], :a.shape[1]] = torch.from_numpy(a).permute(2, 0, 1)
    return x, torch.tensor([a.shape[:2] for a in arrays])


@pytest.mark.parametrize("filt", ["bicubic", "bilinear", "lanczos", "hamming", "box"])
def test_batched_resize_equals_pillow(filt):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 48), (32, 32), (100, 80), (17, 60)]]
    images, sizes = _frame(arrays)
    boxes = random_resized_boxes(sizes, (0.3, 1.0), (3 / 4, 4 / 3),
                                 torch.rand(4, BOX_TRIES, 4, generator=torch.Generator().manual_seed(1)))
    flip = torch.tensor([False, True, False, True])
    for size in (32, 12):  # the compare recipe's size (boxes of 17-100 px) and a strong down-scale
        out = resize_boxes(images, sizes, boxes, size, filt, flip)
        for i, a in enumerate(arrays):
            box = tuple(boxes[i].tolist())
            ref = np.asarray(Image.fromarray(a).resize((size, size), INTERPOLATIONS[filt], box=box))
            ref = ref[:, ::-1] if flip[i] else ref
            diff = np.abs(out[i].permute(1, 2, 0).numpy().astype(int) - ref.astype(int))
            assert diff.max() <= 1, (filt, size, i, diff.max())


def test_batched_boxes_follow_timm():
    """The crop boxes have timm's distribution (area fraction, aspect), and the centre-crop fallback."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    n = 4000
    sizes = torch.tensor([[40, 48]] * n)
    boxes = random_resized_boxes(sizes, (0.08, 1.0), (3 / 4, 4 / 3),
                                 torch.rand(n, BOX_TRIES, 4, generator=torch.Generator().manual_seed(0),
                                            dtype=torch.float64))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 40).all()
    img = Image.new("RGB", (48, 40))
    import random
    random.seed(0)
    ref = torch.tensor([RandomResizedCropAndInterpolation.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))[2:]
                        for _ in range(n)], dtype=torch.float64)
    area, ref_area = (w * h / (40 * 48)).mean(), (ref[:, 0] * ref[:, 1] / (40 * 48)).mean()
    assert abs(area - ref_area) < 0.015
    assert abs((w / h).log().mean() - (ref[:, 1] / ref[:, 0]).log().mean()) < 0.02
    # no try fits a 10x100 strip at scale 1: timm's fallback, the centre crop trimmed to ratio 4/3
    strip = random_resized_boxes(torch.tensor([[10, 100]]), (1.0, 1.0), (3 / 4, 4 / 3),
                                 torch.rand(1, BOX_TRIES, 4, dtype=torch.float64))
    assert strip.tolist() == [[43.0, 0.0, 56.0, 10.0]]


def _loader(spec, rank=0, world=1, batch=3, multiple=1, per_image=False, max_bad=0.01, erase=0.5):
    from timm.data import create_transform
    store, why = decoded_store(expand_shards(spec), num_classes=0, budget_mb=64, device="cpu")
    assert store is not None, why
    t = create_transform(16, is_training=True, scale=(0.5, 1.0), hflip=0.5, color_jitter=0.3,
                         auto_augment="rand-m5-mstd0.5-inc1" if per_image else None, re_prob=erase, re_mode="pixel")
    store.labels = torch.zeros(len(store), dtype=torch.long)
    return MemoryLoader(store, ClassifyBatch(t), batch_size=batch, rank=rank, world_size=world, seed=5,
                        batch_multiple=multiple, max_bad_fraction=max_bad)


@pytest.mark.parametrize("world,batch,multiple", [(1, 5, 2), (2, 3, 2)])
def test_every_image_once_per_epoch(tmp_path, world, batch, multiple):
    spec = uneven_shards(tmp_path / "shards")
    loaders = [_loader(spec, r, world, batch, multiple) for r in range(world)]
    assert len({len(x) for x in loaders}) == 1 and len(loaders[0]) % multiple == 0
    slots = len(loaders[0]) * batch * world
    everything = {f"img{i:03d}" for i in range(N_IMAGES)}
    for epoch in range(2):
        seen = collections.Counter()
        for x in loaders:
            x.set_epoch(epoch)
            for b in x:
                assert b["image"].shape == (batch, 3, 16, 16) and b["image"].dtype == torch.float32
                seen.update(b["__key__"])
        assert set(seen) == everything and sum(seen.values()) == slots
        assert sum(seen.values()) - N_IMAGES == slots - N_IMAGES < world * batch * multiple  # repeats fill only
    desc = loaders[0].describe()
    assert f"{N_IMAGES} images" in desc and "every image once" in desc
    assert loaders[0].stats["samples"] == sum(len(x) * batch for x in [loaders[0]]) * 2


def _epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return [b for b in loader]


@pytest.mark.parametrize("per_image,erase", [(True, 0.5), (False, 0.0)])  # the 2nd: prepared in a thread
def test_resume_gives_the_same_batches(tmp_path, per_image, erase):
    spec = uneven_shards(tmp_path / "shards")
    kw = dict(per_image=per_image, erase=erase, batch=2)
    full = _loader(spec, **kw)
    full.chunk = lambda: 4  # chunks of 4 micro-batches: the resume below starts inside one
    assert full.augment.thread_safe == (not per_image)
    _epoch_batches(full, 0)
    ref = _epoch_batches(full, 1)  # the first chunk of epoch 1 came from the background thread
    part = _loader(spec, **kw)
    part.set_epoch(1)
    it = iter(part)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(part.state_dict()))
    again = _loader(spec, **kw)
    again.load_state_dict(state)
    rest = list(again)
    assert len(rest) == len(ref) - 5
    for a, b in zip(rest, ref[5:]):
        assert a["__key__"] == b["__key__"] and torch.equal(a["image"], b["image"])
    # elastic: 2 processes stopped after 2 micro-batches each (12 samples); 1 process goes on from sample 12
    two = [_loader(spec, r, 2, 3) for r in range(2)]
    states = []
    for x in two:
        x.set_epoch(1)
        it = iter(x)
        next(it), next(it)
        states.append(x.state_dict())
    one = _loader(spec, 0, 1, 3)
    with pytest.warns(UserWarning, match="goes on from sample 12"):
        one.load_state_dict({"saved_ranks": states})
    whole = _loader(spec, 0, 1, 3)
    assert [b["__key__"] for b in one] == [b["__key__"] for b in _epoch_batches(whole, 1)][4:]


def test_store_is_reused_and_rebuilt_when_a_shard_changes(tmp_path):
    spec = uneven_shards(tmp_path / "shards")
    a, _ = decoded_store(expand_shards(spec), num_classes=0, budget_mb=64, device="cpu")
    b, _ = decoded_store(expand_shards(spec), num_classes=0, budget_mb=64, device="cpu")
    assert b is a and b.reused and len(a) == N_IMAGES and a.images.dtype == torch.uint8
    first = expand_shards(spec)[0]
    st = os.stat(first)
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c, _ = decoded_store(expand_shards(spec), num_classes=0, budget_mb=64, device="cpu")
    assert c is not a
    none, why = decoded_store(expand_shards(spec), num_classes=0, budget_mb=0.01, device="cpu")
    assert none is None and "--memory_cache_mb 0.01" in why


def test_pretraining_on_the_cache_resumes_exactly(assets, tmp_path, monkeypatch, capsys):  # noqa: F811
    a = losses(run(tiny_cfg(assets, tmp_path / "a", batches_per_epoch=3))["output_dir"])
    said = capsys.readouterr().out
    assert "data path: memory cache" in said and "random resized crop (32 px bicubic" in said
    crash_after_step(monkeypatch, 5, tiny_cfg(assets, tmp_path / "d", batches_per_epoch=3))
    run(tiny_cfg(assets, tmp_path / "d", batches_per_epoch=3))
    d = losses(tmp_path / "d")
    assert list(d) == [1, 2, 3, 4, 5, 6] and d == pytest.approx(a, rel=1e-6, abs=1e-7)
    s = losses(run(tiny_cfg(assets, tmp_path / "s", batches_per_epoch=3, memory_cache_mb=0))["output_dir"])
    assert "data path: per-image stream (--memory_cache_mb 0)" in capsys.readouterr().out
    assert all(math.isfinite(v) for v in s.values()) and s != a


def test_finetuning_on_the_cache_resumes_exactly(digits, tmp_path, capsys):
    from test_finetune_run import cfg

    from beit.finetune import run_finetune
    out = tmp_path / "run"
    c = cfg(digits, out, checkpoint_every=3)
    res = run_finetune(c)
    said = capsys.readouterr().out
    assert "data path: memory cache, 1437 images" in said
    assert "per image: RandAugment, random erasing" in said
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["data/bad"] == 0 and r["data/samples"] > 0 for r in recs if "data/samples" in r)
    shutil.rmtree(sorted((out / "checkpoints").glob("step_*"))[-1])
    res2 = run_finetune(c)
    assert "reused from an earlier run in this process" in capsys.readouterr().out  # decoded once per process
    assert res2["top1"] == res["top1"] and res2["loss"] == pytest.approx(res["loss"], abs=1e-5)
    recs2 = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in recs2 if "loss" in r][3:] == pytest.approx([r["loss"] for r in recs if "loss" in r][3:],
                                                                           abs=1e-5)


def test_bad_samples_are_counted_per_epoch_and_too_many_refused_before_compute(tmp_path):
    from data_testutil import good_shards, jpeg, write_tar

    from beit.data.loading.data_stats import DataQualityError
    good_shards(tmp_path, 2, 10)
    write_tar(tmp_path / "train-000002.tar", [("bad0", {"jpg": b"not an image"}), ("ok", {"jpg": jpeg(99)})])
    spec = str(tmp_path / "train-*.tar")
    loader = _loader(spec, batch=4, max_bad=0.1)
    for epoch in range(2):
        _epoch_batches(loader, epoch)
    st = loader.stats
    assert st["bad_by_reason"] == {"not_image": 2} and st["samples"] == 2 * len(loader) * 4  # once per epoch
    store, _ = decoded_store(expand_shards(spec), num_classes=0, budget_mb=64, device="cpu")
    with pytest.raises(DataQualityError, match="1 of 22 samples"):
        MemoryLoader(store, loader.augment, batch_size=4, max_bad_fraction=0.01)


def test_batched_jitter_matches_the_per_image_jitter(monkeypatch):
    """Same factors and order as TwoViewTransform.jitter_views (PIL lookup tables and blends): within 2 levels."""
    from torchvision.transforms import ColorJitter

    from beit.data.pipelines.batched import BatchedJitter
    from beit.data.pipelines.transforms import TwoViewTransform
    rng = np.random.default_rng(3)
    big = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    small = [np.asarray(Image.fromarray(a).resize((16, 16), Image.Resampling.BICUBIC)) for a in big]
    orders = [[2, 0, 1, 3], [1, 2, 0, 3], [0, 1, 2, 3]]
    factors = [(1.3, 0.7, 1.2), (0.8, 1.25, 0.65), (1.0, 1.0, 1.0)]
    t = TwoViewTransform(image_size=32, tokenizer_size=16, color_jitter=0.4)
    u = torch.zeros(3, 6, dtype=torch.float64)
    for i, ((b, c, s), order) in enumerate(zip(factors, orders)):
        u[i, :3] = (torch.tensor([b, c, s], dtype=torch.float64) - 0.6) / 0.8   # factor = 0.6 + 0.8 u
        u[i, 3 + torch.tensor(order[:3])] = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)  # argsort -> order
    out_big, out_small = BatchedJitter(0.4)([torch.from_numpy(np.stack(big)).permute(0, 3, 1, 2),
                                             torch.from_numpy(np.stack(small)).permute(0, 3, 1, 2)], u)
    for i in range(3):
        b, c, s = factors[i]
        monkeypatch.setattr(ColorJitter, "get_params", staticmethod(lambda *a, i=i, b=b, c=c, s=s: (
            torch.tensor(orders[i]), b, c, s, None)))
        ref_big, ref_small = t.jitter_views([Image.fromarray(big[i]), Image.fromarray(small[i])])
        for got, ref in ((out_big[i], ref_big), (out_small[i], ref_small)):
            diff = np.abs(got.permute(1, 2, 0).numpy().astype(int) - np.asarray(ref).astype(int))
            assert diff.max() <= 2, (i, diff.max())
    assert torch.equal(out_big[2], torch.from_numpy(big[2]).permute(2, 0, 1))  # factors of 1: unchanged


def test_pretraining_views_with_jitter_flip_and_two_sizes(tmp_path):
    from data_testutil import good_shards

    from beit.data.pipelines.memory_path import MimBatch
    from beit.data.pipelines.transforms import TwoViewTransform
    from beit.masking import MaskingGenerator
    good_shards(tmp_path, 2, 6)
    store, _ = decoded_store(expand_shards(str(tmp_path / "train-*.tar")), num_classes=0, budget_mb=64, device="cpu")
    t = TwoViewTransform(image_size=32, tokenizer_size=16, tokenizer_interpolation="lanczos", color_jitter=0.4,
                         hflip=0.5, scale=(0.3, 1.0))
    loader = MemoryLoader(store, MimBatch(t, MaskingGenerator((4, 4), 6, min_num_patches=2)), batch_size=4)
    batches = _epoch_batches(loader, 0)
    assert len(batches) == 3 and "colour jitter" in loader.augment.describe()
    for b in batches:
        assert b["image"].shape == (4, 3, 32, 32) and b["tokenizer_image"].shape == (4, 3, 16, 16)
        assert b["image"].dtype == b["tokenizer_image"].dtype == torch.uint8
        assert b["mask"].shape == (4, 4, 4) and (b["mask"].flatten(1).sum(1) == 6).all()
    # the two views come from the same box, flip and jitter: the small one is close to the big one shrunk
    big = torch.nn.functional.interpolate(batches[0]["image"].float(), size=16, mode="area")
    assert (big - batches[0]["tokenizer_image"].float()).abs().mean() < 12
