"""HeldOutStream: every held-out sample exactly once over ranks and workers, bad ones counted."""
import tarfile

import pytest
import torch
from data_testutil import good_shards, jpeg, write_tar
from torch.utils.data import DataLoader

from beit.data.loading.heldout import HeldOutStream, good_rows


def _keys_and_seeds(shards, world, workers, batch_size=4):
    seen = {}
    for rank in range(world):
        ds = HeldOutStream(shards, lambda img, s: {"x": torch.tensor(img.size), "key": s["__key__"],
                                                   "seed": s["__seed__"] % 1000}, rank=rank, world_size=world, seed=3)
        for b in DataLoader(ds, batch_size=batch_size, num_workers=workers):
            assert all(r == "" for r in b["bad"])
            for k, sd in zip(b["key"], b["seed"].tolist()):
                assert k not in seen, f"{k} seen twice"
                seen[k] = sd
    return seen


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 2)])
def test_every_sample_exactly_once_over_ranks_and_workers(tmp_path, world, workers):
    shards = good_shards(tmp_path, n_shards=6, per_shard=5)  # 30 samples, batch 4: partial batches
    seen = _keys_and_seeds(shards, world, workers)
    assert sorted(seen) == [f"s{i:05d}" for i in range(30)]
    # a sample's seed does not depend on how many ranks read the set
    assert seen == _keys_and_seeds(shards, 1, 0)


def test_bad_samples_come_out_counted_as_zero_rows(tmp_path):
    good = jpeg(1)
    shard = write_tar(tmp_path / "val-000000.tar", [
        ("a0", {"jpg": b""}),                      # bad before any good sample: still counted
        ("a1", {"jpg": good}),
        ("a2", {"jpg": b"not an image at all"}),
        ("a3", {"txt": b"no image member"}),
        ("a4", {"jpg": good[: len(good) // 2]}),   # truncated JPEG
        ("a5", {"jpg": jpeg(2)}),
    ])
    cut = tmp_path / "val-000001.tar"               # a tar cut short inside its second sample's data
    full = write_tar(tmp_path / "full.tar", [("b0", {"jpg": jpeg(3)}), ("b1", {"jpg": jpeg(4)})])
    with tarfile.open(full) as t:
        b1 = t.getmembers()[1]
    cut.write_bytes(full.read_bytes()[:b1.offset_data + b1.size // 2])
    ds = HeldOutStream([str(shard), str(cut)], lambda img, s: {"x": torch.ones(2)})
    rows = list(DataLoader(ds, batch_size=3))
    reasons = [r for b in rows for r in b["bad"]]
    assert sorted(r for r in reasons if r) in (["corrupt", "empty", "no_image", "not_image", "tar_error"],
                                               ["empty", "no_image", "not_image", "tar_error", "truncated"])
    ok = torch.cat([good_rows(b) for b in rows])
    x = torch.cat([b["x"] for b in rows])
    assert int(ok.sum()) == 3 and bool((x[ok] == 1).all()) and bool((x[~ok] == 0).all())


def test_no_decodable_sample_is_a_clear_error(tmp_path):
    shard = write_tar(tmp_path / "val-000000.tar", [("a0", {"jpg": b""}), ("a1", {"jpg": b"junk"})])
    with pytest.raises(RuntimeError, match="no decodable sample.*verify"):
        list(HeldOutStream([str(shard)], lambda img, s: {"x": torch.ones(1)}))
