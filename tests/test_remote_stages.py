"""Every command that reads shards takes http(s) shards the same way (--allow_remote_shards, the manifest fetched
beside them or --manifest, --remote_retries), against a real HTTP server on 127.0.0.1: pretraining (with a
dropped connection and a crash, resumed exactly), fine-tuning (label map from the fetched manifest), k-means
tokenizer training and the token cache."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from http_testutil import ShardServer
from test_pretrain import assets, crash_after_step, losses, run, tiny_cfg  # noqa: F401  (assets: shared fixture)

from beit.checkpoints.checkpointing import find_latest_complete
from beit.data.storage.shardspec import expand_shards, shard_sample_counts
from beit.runtime.faults import SetupError


@pytest.fixture(scope="module")
def site(assets):
    """The pretraining tests' photo shards (train-*, val-*, manifest.json) served over HTTP."""
    root = Path(assets["train"]).parent.parent
    with ShardServer(root) as srv:
        yield srv, srv.url + "photos/"


def remote_cfg(assets, site, out, **kw):
    srv, base = site
    return tiny_cfg(assets, out, train_shards=[base + "train-{000000..000013}.tar"],
                    val_shards=[base + "val-{000000..000002}.tar"], allow_remote_shards=True, **kw)


def test_pretraining_over_http_counts_from_the_manifest_and_resumes_exactly(assets, site, tmp_path, monkeypatch):
    srv, base = site
    # the local reference on the per-image stream too (http(s) shards are never memory-cached)
    local = losses(run(tiny_cfg(assets, tmp_path / "local", memory_cache_mb=0))["output_dir"])
    for i in range(14):                                          # every shard's first response is cut
        srv.cut[f"photos/train-{i:06d}.tar"] = (5000, 1, "close")
    crash_after_step(monkeypatch, 5, remote_cfg(assets, site, tmp_path / "remote"))
    assert find_latest_complete(tmp_path / "remote").name == "step_0000003"
    summary = run(remote_cfg(assets, site, tmp_path / "remote"))
    # the same batches as the uninterrupted local run, through a dropped connection and a crash
    assert losses(tmp_path / "remote") == pytest.approx(local, rel=1e-6, abs=1e-7)
    assert summary["data/remote_retries"] >= 1 and summary["data/bad"] == 0
    assert ("photos/manifest.json", None) in srv.requests
    assert any(r and r.startswith("bytes=5000-") for n, r in srv.requests if n.startswith("photos/train-"))
    n_val = sum(shard_sample_counts(expand_shards(assets["val"])))
    assert summary["val/images"] <= n_val and summary["val/tokens"] > 0  # held-out shards read over HTTP too


def test_pretraining_names_the_flags_when_the_count_is_unknown(assets, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for i in range(2):
        shutil.copy(Path(assets["train"]).parent / f"train-{i:06d}.tar", bare)
    with ShardServer(tmp_path) as srv:
        cfg = tiny_cfg(assets, tmp_path / "run", train_shards=[srv.url + "bare/train-{000000..000001}.tar"],
                       allow_remote_shards=True, val_shards=[], total_steps=2)
        with pytest.raises(SetupError) as e:
            run(cfg)
        msg = str(e.value)
        assert "--manifest" in msg and "--batches_per_epoch" in msg and "bare/manifest.json" in msg
        # --manifest given as a URL: the counts come from it (entries matched by shard name)
        (tmp_path / "m.json").write_text((Path(assets["train"]).parent / "manifest.json").read_text())
        summary = run(dict(cfg, manifest=srv.url + "m.json"))
        assert summary["step"] == 2
    from beit.options.pretrain import PretrainConfig
    with pytest.raises(ValueError, match="--manifest http://x/m.json is a URL: pass --allow_remote_shards true"):
        PretrainConfig(train_shards=["a.tar"], manifest="http://x/m.json").validate()
    for other in (dict(data="photos/"), dict(token_cache="cache/")):
        with pytest.raises(ValueError, match="leave --manifest out"):
            PretrainConfig(manifest="m.json", **other).validate()


def test_finetune_over_http_takes_the_label_map_from_the_fetched_manifest(digits, tmp_path):
    from test_finetune_run import FAST, TINY_CFG

    from beit.finetune import FinetuneConfig, run_finetune

    def brace(prefix: str) -> str:
        return "%s-{000000..%06d}.tar" % (prefix, len(list(digits.glob(f"{prefix}-*.tar"))) - 1)

    with ShardServer(digits) as srv:
        c = FinetuneConfig(output_dir=str(tmp_path / "ft"), train_shards=srv.url + "train-*.tar", **TINY_CFG,
                           **dict(FAST, epochs=1), val_shards=srv.url + brace("test"), allow_remote_shards=True)
        with pytest.raises(ValueError, match="glob cannot be listed over http.*brace pattern"):
            run_finetune(c)
        c.train_shards = srv.url + brace("train")
        run_finetune(c)
    final = json.loads((tmp_path / "ft" / "final.json").read_text())
    assert final["num_classes"] == 10 and final["class_names"][:2] == ["0", "1"]      # from the fetched manifest
    assert final["samples"] == 360 and final["bad_samples"] == 0                      # every held-out digit


def test_tokenizer_training_and_token_cache_over_http(assets, site, tmp_path, capsys):
    from beit.tokenizers.cache import main as cache_main
    from beit.tokenizers.train import main as train_main

    srv, base = site
    train, val = base + "train-{000000..000001}.tar", base + "val-{000000..000002}.tar"
    args = ["--allow_remote_shards", "true", "--remote_retries", "2"]
    assert train_main(["kmeans", "--train_shards", train, "--val_shards", val, "--out", str(tmp_path / "km"),
                       "--vocab_size", "16", "--input_size", "32", "--patch_size", "8", "--epochs", "1",
                       "--init_patches", "500", "--num_workers", "0", *args]) == 0
    out = capsys.readouterr().out
    n = sum(shard_sample_counts(expand_shards(str(Path(assets["train"]).parent / "train-{000000..000001}.tar"))))
    assert f"{n} images in 2 shard(s)" in out and "[kmeans] held-out: " in out
    assert cache_main(["--train_shards", train, "--out", str(tmp_path / "cache"), "--tokenizer", "kmeans",
                       "--tokenizer_path", str(tmp_path / "km"), "--views_per_image", "1", *args]) == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["num_samples"] == n and manifest["bad_samples"] == {}
    with pytest.raises(ValueError, match="--allow_remote_shards true"):      # without the opt-in
        train_main(["kmeans", "--train_shards", train, "--out", str(tmp_path / "km2")])
