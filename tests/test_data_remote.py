"""Remote shards as a first-class source, against a real HTTP server on 127.0.0.1 (tests/http_testutil.py):
the sample count from the manifest.json fetched beside the shards (or --manifest), messages that name
flags, exact mid-epoch resume, dropped connections resumed with Range / re-read and skipped, and a
shard that cannot be finished counted like a truncated tar."""
from __future__ import annotations

import json

import pytest
from data_testutil import good_shards
from http_testutil import ShardServer

from beit.data.loading.stream import build_stream_loader
from beit.data.pipelines.transforms import pil_to_tensor
from beit.data.storage.remote import HttpShardReader, RemoteReadError, open_shard
from beit.data.storage.shardspec import expand_shards, resolve_sample_counts, shard_manifest

N_SHARDS, PER_SHARD = 4, 6


def small_map(img, sample):
    return {"x": pil_to_tensor(img.resize((8, 8))), "seed": sample["__seed__"] % 1000}


def keys_of(batches):
    return [k for b in batches for k in b["__key__"]]


@pytest.fixture
def served(tmp_path):
    """4 real shards of 6 JPEGs + manifest.json, served over HTTP; yields (server, brace spec, local dir)."""
    root = tmp_path / "site" / "in1k"
    good_shards(root, N_SHARDS, PER_SHARD)
    with ShardServer(tmp_path / "site") as srv:
        yield srv, srv.url + "in1k/train-{000000..000003}.tar", root


def test_count_comes_from_the_manifest_fetched_beside_the_shards(served):
    srv, spec, root = served
    loader = build_stream_loader(spec, map_fn=small_map, batch_size=4, num_workers=0, allow_remote=True)
    assert loader.coverage["images"] == N_SHARDS * PER_SHARD and len(loader) == 6
    assert "24 images in 4 shard(s)" in loader.describe()
    assert [n for n, _ in srv.requests] == ["in1k/manifest.json"]     # fetched once, no shard read yet
    assert sorted(keys_of(loader)) == [f"s{i:05d}" for i in range(24)]   # every image once
    # the manifest fetched is the one beside the shards, also as the label map's source
    m, where = shard_manifest(expand_shards(spec, allow_remote=True))
    assert where == srv.url + "in1k/manifest.json" and len(m["shards"]) == N_SHARDS


def test_unknown_count_names_the_flags_and_the_cause(served, tmp_path):
    srv, spec, root = served
    (root / "manifest.json").rename(tmp_path / "elsewhere.json")
    with pytest.raises(ValueError) as e:
        build_stream_loader(spec, map_fn=small_map, batch_size=4, num_workers=0, allow_remote=True)
    msg = str(e.value)
    assert "--manifest" in msg and "--batches_per_epoch" in msg and "manifest=<" not in msg
    assert "manifest.json" in msg and "404" in msg                      # says why: the fetch answered 404
    # --manifest as a local path, and as a URL, both give the count
    for where in (str(tmp_path / "elsewhere.json"), srv.url + "elsewhere.json"):
        if where.startswith("http"):
            (tmp_path / "site" / "elsewhere.json").write_bytes((tmp_path / "elsewhere.json").read_bytes())
        counts, why = resolve_sample_counts(expand_shards(spec, allow_remote=True), where)
        assert counts == [PER_SHARD] * N_SHARDS and why == ""
    # a manifest that does not list the shards says so
    (tmp_path / "other.json").write_text(json.dumps({"shards": [{"name": "x.tar", "samples": 3}]}))
    with pytest.raises(ValueError, match=r"not in --manifest .*other\.json"):
        build_stream_loader(spec, map_fn=small_map, batch_size=4, num_workers=0, allow_remote=True,
                            manifest=str(tmp_path / "other.json"))
    # with --batches_per_epoch no count is needed
    ld = build_stream_loader(spec, map_fn=small_map, batch_size=4, num_workers=0, allow_remote=True,
                             batches_per_epoch=2)
    assert len(keys_of(ld)) == 8


def test_other_schemes_are_refused_with_what_works():
    for url in ("gs://bucket/train-000000.tar", "s3://bucket/train-000000.tar"):
        with pytest.raises(ValueError, match=r"pipe:gsutil cat .*pipe:aws s3 cp .*https://"):
            expand_shards(url, allow_remote=True)
    with pytest.raises(ValueError, match="--allow_remote_shards true"):
        expand_shards("http://127.0.0.1:1/train-000000.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_remote_loader_continues_with_the_same_batches(served, workers):
    srv, spec, _ = served
    def make():
        return build_stream_loader(spec, map_fn=small_map, batch_size=4, num_workers=workers, seed=2,
                                   allow_remote=True, shuffle_buffer=5)

    full = list(make())
    ld = make()
    it = iter(ld)
    head = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(ld.state_dict()))
    del it
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert keys_of(head + rest) == keys_of(full)
    assert [b["seed"].tolist() for b in head + rest] == [b["seed"].tolist() for b in full]


@pytest.mark.parametrize("how", ["close", "reset"])
def test_dropped_connection_resumes_with_range(served, how):
    srv, spec, root = served
    name = "in1k/train-000001.tar"
    size = (root / "train-000001.tar").stat().st_size
    srv.cut[name] = (3000, 3, how)                        # three responses in a row cut after 3000 bytes
    reader = HttpShardReader(srv.url + name, backoff_s=0.01)
    assert reader.read() == (root / "train-000001.tar").read_bytes()
    assert reader.reconnects == 3
    assert srv.ranged(name) == [None, "bytes=3000-", "bytes=6000-", "bytes=9000-"]
    assert size > 9000
    # through the loader: every sample arrives, the reconnects are counted and logged
    srv.cut[name] = (2500, 2, how)
    ld = build_stream_loader(spec, map_fn=small_map, batch_size=4, num_workers=0, allow_remote=True)
    assert sorted(keys_of(ld)) == [f"s{i:05d}" for i in range(24)]
    assert ld.stats["bad"] == 0 and ld.metrics()["data/remote_retries"] == 2


def test_server_without_range_is_reread_and_skipped(tmp_path):
    root = tmp_path / "site"
    good_shards(root, 2, PER_SHARD)
    with ShardServer(root, ranges=False) as srv:
        srv.cut["train-000000.tar"] = (4000, 1, "close")
        data = open_shard(srv.url + "train-000000.tar").read()
        assert data == (root / "train-000000.tar").read_bytes()
        assert srv.ranged("train-000000.tar") == [None, "bytes=4000-"]   # asked, got 200, skipped 4000 bytes


def test_connection_that_never_recovers_is_counted_like_a_truncated_tar(tmp_path):
    """No Range support and every response cut at the same byte: no progress, so after the bounded
    reconnects the shard's remaining samples are counted (connection_lost), the run goes on."""
    root = tmp_path / "site"
    good_shards(root, 4, PER_SHARD)
    with ShardServer(root, ranges=False) as srv:
        name = "train-000002.tar"
        srv.cut[name] = (2600, 100, "reset")
        with pytest.raises(RemoteReadError, match=r"connection lost at byte 2600 of \d+ and 2 reconnect"):
            HttpShardReader(srv.url + name, retries=2, backoff_s=0.01).read()
        srv.requests.clear()
        ld = build_stream_loader(srv.url + "train-{000000..000003}.tar", map_fn=small_map, batch_size=4,
                                 num_workers=0, allow_remote=True, remote_retries=2, max_bad_fraction=0.5)
        with pytest.warns(UserWarning, match=r"train-000002\.tar: connection_lost: \d sample\(s\) lost"):
            got = keys_of(ld)
        st = ld.stats
        lost = st["bad_by_reason"]["connection_lost"]
        read = st["shards"][srv.url + name]["samples"]
        assert lost + read == PER_SHARD and lost >= 1   # the manifest says what the shard still owed
        reads = st["remote_retries"] // 2                # each read of it: 1 request + 2 reconnects, then given up
        assert reads >= 1 and st["remote_retries"] == 2 * reads and len(srv.ranged(name)) == 3 * reads
        assert len(got) == len(ld) * 4                   # batches stay full (filled from the next pass)
        assert ld.metrics()["data/bad_connection_lost"] == lost
