"""Built-in sample sets: real images, deterministic bytes, held-out splits."""
from __future__ import annotations

import collections
import json

import pytest

from beit.data.sample_sets import VAL_FRACTION, build_sample_shards, photo_items
from beit.data.storage.shard_format import iter_tar_samples, sha256_file


def test_digits_shards_are_deterministic_with_stratified_test_split(tmp_path):
    a = build_sample_shards(tmp_path / "a", "digits")
    b = build_sample_shards(tmp_path / "b", "digits")
    assert [sha256_file(p) for p in a] == [sha256_file(p) for p in b]
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["num_samples"] == 1797 and m["label_map"] == {str(i): i for i in range(10)}
    per_split = collections.Counter(s["split"] for s in m["shards"] for _ in range(s["samples"]))
    assert per_split == {"train": 1437, "test": 360}
    labels, keys = collections.Counter(), {"train": set(), "test": set()}
    for p in a:
        split = "test" if "/test-" in p else "train"
        with open(p, "rb") as f:
            for s in iter_tar_samples(f):
                keys[split].add(s["__key__"])
                if split == "test":
                    labels[int(s["cls"])] += 1
                assert s["png"][:4] == b"\x89PNG"
    assert not keys["train"] & keys["test"]
    assert all(33 <= labels[c] <= 40 for c in range(10))  # stratified: ~36 per class


def test_photo_crops_are_many_real_and_held_out():
    splits = photo_items()
    assert len(splits["train"]) >= 800 and len(splits["val"]) >= 150
    sources = {it.key.split("_s")[0] for it in splits["train"]}
    assert {"astronaut", "coffee", "chelsea", "sklearn_china", "sklearn_flower"} <= sources
    # a validation crop starts right of the cut, a training crop ends left of it: no overlap
    from beit.data.sample_sets import load_photos
    widths = {n: a.shape[1] for n, a in load_photos().items()}

    def parse(key):  # "<name>_s<side>_x<x>_y<y>"
        name, rest = key.rsplit("_s", 1)
        side, x, _ = rest.split("_")
        return name, int(side), int(x[1:])

    for it in splits["val"]:
        name, side, x = parse(it.key)
        assert x >= round(widths[name] * (1 - VAL_FRACTION))
    for it in splits["train"]:
        name, side, x = parse(it.key)
        assert x + side <= round(widths[name] * (1 - VAL_FRACTION))


def test_unknown_kind():
    with pytest.raises(ValueError, match="photos"):
        build_sample_shards("/tmp/never", "imagenet")
