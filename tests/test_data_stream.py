"""Streaming loader: robustness to every kind of bad data, distribution, resume."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from data_testutil import encode, good_shards, jpeg, odd_images, photo, write_tar

from beit.data.loading.data_stats import DataQualityError
from beit.data.loading.stream import build_stream_loader, plan_quotas, round_robin
from beit.data.pipelines.transforms import TwoViewTransform, pil_to_tensor


def small_map(img, sample):
    return {"x": pil_to_tensor(img.resize((16, 16))), "seed": sample["__seed__"] % 1000}


def keys_of(loader):
    return [k for b in loader for k in b["__key__"]]


def test_bad_samples_are_counted_by_reason(tmp_path):
    good = [(f"g{i:03d}", {"jpg": jpeg(i)}) for i in range(20)]
    full = jpeg(99, size=(200, 160))
    bad = [
        ("trunc", {"jpg": full[: len(full) // 2]}),
        ("notimg", {"jpg": b"this is not an image at all"}),
        ("zero", {"jpg": b""}),
        ("tiny", {"png": encode(photo(3, (4, 4)), "PNG")}),
        ("noimage", {"txt": b"hello"}),
        ("badcls", {"jpg": jpeg(5), "cls": b"seven"}),
    ]
    odd = [(name.split(".")[0], {name.split(".")[1]: data}) for name, data in odd_images().items()]
    small = [("small", {"jpg": jpeg(7, size=(20, 12))})]
    write_tar(tmp_path / "a.tar", bad[:3] + odd[:3] + good[:10])
    write_tar(tmp_path / "b.tar", bad[3:] + odd[3:] + small + good[10:])
    # no shuffling and shards ending in good samples: the 26 usable samples (20 good, 5 odd modes,
    # 1 small) fill the epoch exactly, so every bad sample is read once
    loader = build_stream_loader(str(tmp_path / "{a,b}.tar"), map_fn=small_map, batch_size=2, num_workers=0,
                                 batches_per_epoch=13, shuffle_buffer=1, max_bad_fraction=1.0,
                                 small_image_size=16)
    got = keys_of(loader)
    assert len(got) == 26 and len(set(got)) == 26
    st = loader.stats
    assert st["bad_by_reason"] == {"truncated": 1, "not_image": 1, "empty": 1, "too_small": 1,
                                   "no_image": 1, "bad_label": 1}
    assert st["converted"] == {"CMYK": 1, "P": 1, "RGBA": 1, "I;16": 1, "L": 1}
    assert st["upscaled"] == 1
    assert st["samples"] == 26 and st["bad"] == 6
    assert st["shards"][str(tmp_path / "a.tar")]["reasons"] == {"truncated": 1, "not_image": 1, "empty": 1}
    assert {e["key"] for e in st["examples"]} == {"trunc", "notimg", "zero", "tiny", "noimage", "badcls"}
    metrics = loader.metrics()
    assert metrics["data/bad_truncated"] == 1 and metrics["data/converted_CMYK"] == 1


def test_odd_modes_convert_to_correct_rgb():
    from beit.data.loading.decode import open_image
    imgs = odd_images()
    i16, _ = open_image(imgs["i16.png"])
    assert i16.mode == "RGB" and abs(int(np.asarray(i16)[0, 0, 0]) - 128) <= 1  # 32768/65535 -> 128, not clipped
    rgba, mode = open_image(imgs["rgba.png"])
    assert mode == "RGBA" and rgba.mode == "RGB"
    ref = np.asarray(photo(1), dtype=float)  # half-transparent over white
    assert np.abs(np.asarray(rgba, dtype=float) - (ref * 128 / 255 + 255 * 127 / 255)).max() <= 3
    cmyk, mode = open_image(imgs["cmyk.jpg"])
    assert mode == "CMYK" and np.abs(np.asarray(cmyk, dtype=float) - ref).mean() < 12


def test_truncated_tar_and_missing_shard_mid_run(tmp_path):
    shards = good_shards(tmp_path, n_shards=4, per_shard=8)
    data = open(shards[1], "rb").read()
    open(shards[1], "wb").write(data[: len(data) // 2 + 100])  # cut in the middle of a member
    loader = build_stream_loader(shards, map_fn=small_map, batch_size=4, num_workers=2,
                                 max_bad_fraction=1.0, seed=1)
    os.remove(shards[2])  # vanishes after start-up
    got = keys_of(loader)
    assert len(got) == len(loader) * 4
    st = loader.stats
    assert st["bad_by_reason"]["missing_shard"] == 8  # the manifest says 8 samples were lost
    assert 1 <= st["bad_by_reason"]["tar_error"] <= 8
    assert st["shards"][shards[2]]["reasons"] == {"missing_shard": 8}


def test_threshold_stops_with_worst_shards(tmp_path):
    write_tar(tmp_path / "ok.tar", [(f"g{i}", {"jpg": jpeg(i)}) for i in range(12)])
    write_tar(tmp_path / "rotten.tar", [(f"b{i}", {"jpg": b"garbage"}) for i in range(6)]
              + [(f"h{i}", {"jpg": jpeg(50 + i)}) for i in range(6)])
    loader = build_stream_loader(str(tmp_path), map_fn=small_map, batch_size=4, num_workers=0,
                                 max_bad_fraction=0.1, bad_check_after=1000)
    with pytest.raises(DataQualityError) as e:
        list(loader)
    msg = str(e.value)
    assert re.search(r"rotten\.tar \(\d+ bad, \d+ good: not_image=\d+\)", msg), msg
    assert "max_bad_fraction=0.1" in msg and "shards verify" in msg
    assert "ok.tar" not in msg.split("Worst shards:")[1].split(".")[0]


def test_startup_errors_are_clear(tmp_path):
    shards = good_shards(tmp_path, n_shards=2, per_shard=4)
    kw = dict(map_fn=small_map, batch_size=2)
    with pytest.raises(ValueError, match="matches no files"):
        build_stream_loader(str(tmp_path / "nothing-*.tar"), **kw)
    with pytest.raises(ValueError, match="does not exist"):
        build_stream_loader(str(tmp_path / "train-{000000..000005}.tar"), **kw)
    with pytest.raises(ValueError, match="allow_remote=True"):
        build_stream_loader("pipe:cat " + shards[0], **kw)
    with pytest.raises(ValueError, match="allow_remote=True"):
        build_stream_loader("https://example.com/a.tar", **kw)
    with pytest.raises(ValueError, match="--resampled true"):
        build_stream_loader(shards, num_workers=2, world_size=3, **kw)  # fewer shards than processes
    clamped = build_stream_loader(shards, num_workers=2, world_size=2, **kw)  # 2 shards, 4 readers wanted
    assert clamped.num_workers == 1 and "clamped from 2 to 1" in clamped.notes[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar shards"):
        build_stream_loader(str(tmp_path / "empty"), **kw)
    # comma-separated list and brace pattern resolve to the same shards
    a = build_stream_loader(",".join(shards), num_workers=0, **kw)
    b = build_stream_loader(str(tmp_path / "train-{000000..000001}.tar"), num_workers=0, **kw)
    assert a.dataset.shards == b.dataset.shards == shards


def test_pipe_shards_with_opt_in(tmp_path):
    shards = good_shards(tmp_path, n_shards=2, per_shard=4)
    spec = [f"pipe:cat {s}" for s in shards]
    loader = build_stream_loader(spec, map_fn=small_map, batch_size=2, num_workers=0, allow_remote=True,
                                 manifest=str(tmp_path / "manifest.json"))
    assert sorted(keys_of(loader)) == [f"s{i:05d}" for i in range(8)]


def test_exactly_once_two_workers_and_reshuffle(tmp_path):
    shards = good_shards(tmp_path, n_shards=6, per_shard=8, label=True)
    loader = build_stream_loader(shards, map_fn=small_map, batch_size=4, num_workers=2, seed=5)
    assert len(loader) == 12
    e0 = keys_of(loader)
    assert sorted(e0) == [f"s{i:05d}" for i in range(48)]
    e1 = keys_of(loader)  # the next iteration is epoch 1: same samples, new order
    assert sorted(e1) == sorted(e0) and e1 != e0
    loader.set_epoch(0)
    assert keys_of(loader) == e0
    batch = next(iter(build_stream_loader(shards, map_fn=small_map, batch_size=4, num_workers=0)))
    assert batch["label"].dtype == torch.int64 and batch["x"].shape == (4, 3, 16, 16)
    assert [int(k[1:]) % 3 for k in batch["__key__"]] == batch["label"].tolist()


def test_equal_batches_per_rank_on_uneven_shards(tmp_path):
    items_per = [9, 3, 7, 5, 11]
    paths = []
    for i, n in enumerate(items_per):
        paths.append(str(write_tar(tmp_path / f"u{i}.tar", [(f"u{i}_{j}", {"jpg": jpeg(100 * i + j)})
                                                                for j in range(n)])))
    everything = {f"u{i}_{j}" for i, n in enumerate(items_per) for j in range(n)}
    for epoch in range(3):
        per_rank, lens = [], []
        for rank in range(2):
            ld = build_stream_loader(paths, map_fn=small_map, batch_size=2, num_workers=1, rank=rank,
                                     world_size=2, seed=epoch)
            ld.set_epoch(epoch)
            k = keys_of(ld)
            lens.append((len(ld), len(k) // 2))
            per_rank.append(k)
        assert lens[0] == lens[1] and lens[0][0] == lens[0][1] > 0
        assert set(per_rank[0]) | set(per_rank[1]) == everything  # no image left out of the epoch
        assert not set(per_rank[0]) & set(per_rank[1])  # disjoint shards: repeats stay within a rank
        for k in per_rank:  # a rank repeats a sample only after it has shown all of its own once
            first = len(set(k))
            assert len(set(k[:first])) == first


def test_resume_continues_exactly(tmp_path):
    shards = good_shards(tmp_path, n_shards=4, per_shard=10)
    tf = TwoViewTransform(image_size=24, tokenizer_size=12)

    def two_view(img, sample):
        enc, tok = tf(img)
        return {"enc": enc, "tok": tok}

    kw = dict(map_fn=two_view, batch_size=3, num_workers=2, seed=7, shuffle_buffer=7)
    ref = build_stream_loader(shards, **kw)
    ref.set_epoch(2)
    full = list(ref)
    part = build_stream_loader(shards, **kw)
    part.set_epoch(2)
    it = iter(part)
    first = [next(it) for _ in range(5)]
    state = part.state_dict()
    del it
    resumed = build_stream_loader(shards, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    rest = list(resumed)
    assert len(first) + len(rest) == len(full) == len(ref)
    for a, b in zip(first + rest, full):
        assert a["__key__"] == b["__key__"]
        assert torch.equal(a["enc"], b["enc"]) and torch.equal(a["tok"], b["tok"])
    assert resumed.stats["samples"] == ref.stats["samples"]


def test_resampled_mode_is_seeded_per_rank(tmp_path):
    shards = good_shards(tmp_path, n_shards=2, per_shard=6)
    kw = dict(map_fn=small_map, batch_size=2, num_workers=2, world_size=2, resampled=True, batches_per_epoch=5)
    r0 = keys_of(build_stream_loader(shards, rank=0, **kw))
    r0b = keys_of(build_stream_loader(shards, rank=0, **kw))
    r1 = keys_of(build_stream_loader(shards, rank=1, **kw))
    assert len(r0) == len(r1) == 10 and r0 == r0b and r0 != r1


def test_plan_helpers():
    assert round_robin([2, 1, 3]) == [0, 1, 2, 0, 2, 2]
    q = plan_quotas([[9, 3], [7, 16]], 5, 2, 2)  # an explicit epoch shorter than one pass: trimmed
    assert [sum(r) for r in q] == [5, 5] and q[0] == [3, 2]
    q = plan_quotas([[9, 3], [7, 0]], 8, 2, 2)  # ceil(n/B) each, the rest to the least over-filled worker
    assert q == [[5, 3], [8, 0]]  # a worker without samples gets no quota
    assert plan_quotas(None, 5, 2, 2) == [[3, 2]]


def test_exif_orientation_is_applied():
    from PIL import Image

    from beit.data.loading.decode import open_image
    img = photo(4, (60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(img, "JPEG", exif=exif.tobytes())
    out, _ = open_image(data)
    assert out.size == (30, 60)
    plain, _ = open_image(encode(img, "JPEG"))
    assert plain.size == (60, 30)


def test_layout_change_on_resume_restarts_or_moves_on(tmp_path):
    shards = good_shards(tmp_path, n_shards=4, per_shard=6)
    fn = lambda img, s: {"x": torch.zeros(1)}  # noqa: E731
    a = build_stream_loader(shards, map_fn=fn, batch_size=4, num_workers=0, seed=1)
    a.set_epoch(3)
    it = iter(a)
    next(it)
    mid = a.state_dict()
    list(it)
    done = a.state_dict()
    for state, at_end, msg in ((mid, False, "restarting epoch 3"), (done, True, "epoch 3 was complete; epoch 4")):
        b = build_stream_loader(shards, map_fn=fn, batch_size=2, num_workers=0, seed=1)  # another layout
        with pytest.warns(UserWarning, match=msg):
            b.load_state_dict(state)
        # a complete epoch stays at its end (as with an unchanged layout), so the run moves on to epoch 4
        assert b.epoch == 3 and b.state_dict()["position"] == (len(b) if at_end else 0)
        assert len(list(b)) == len(b)
        assert b.epoch == (4 if at_end else 3)


def random_map(img, sample):
    """A map that draws from all three process-wide RNGs (as timm's augmentations and jitter do)."""
    import random
    return {"x": pil_to_tensor(img.resize((8, 8))), "r": random.random(), "n": float(np.random.rand()),
            "t": torch.rand(())}


def test_main_process_loading_leaves_the_loop_rng_untouched(tmp_path):
    """num_workers=0: the per-sample seeding runs in the training loop's process; between batches the
    loop's random / numpy / torch draws are those it would make with no loading at all (the states are
    kept per batch), and the batches (their random draws included) are a worker process's."""
    import random
    shards = good_shards(tmp_path, n_shards=2, per_shard=10)

    def loop(num_workers):
        random.seed(1), np.random.seed(2), torch.manual_seed(3)
        batches, draws = [], []
        for b in build_stream_loader(shards, map_fn=random_map, batch_size=4, num_workers=num_workers, seed=9):
            batches.append(b)
            draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))  # the loop's own draws
        return batches, draws
    main, main_draws = loop(0)
    worker, _ = loop(1)  # (torch's DataLoader draws its workers' base seed from the loop's torch RNG)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    alone = [(random.random(), float(np.random.rand()), float(torch.rand(()))) for _ in main_draws]
    assert len(main) == 5 and main_draws == alone
    for a, b in zip(main, worker):
        assert a["__key__"] == b["__key__"]
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in ("x", "r", "n", "t"))
    assert len({float(r) for b in main for r in b["r"]}) == 20  # every sample drew its own numbers
