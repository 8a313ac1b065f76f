"""Pretraining from a token cache (--token_cache): trains with no tokenizer call, refuses a cache that
does not fit, and treats the cache like the tokenizer on resume."""
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from test_pretrain import assets, run, tiny_cfg  # noqa: F401  (assets: the shared module fixture)

from beit.pretrain import SetupError
from beit.runtime.run_logging import read_metrics
from beit.tokenizers.kmeans import KMeansTokenizer
from beit.tokenizers.token_cache import write_token_cache


@pytest.fixture(scope="module")
def cached(assets, tmp_path_factory):
    """The pretraining tests' photo shards + k-means tokenizer, and a 2-view token cache of 4 shards."""
    root = tmp_path_factory.mktemp("token_cache")
    photos = str(Path(assets["train"]).parent)
    write_token_cache(f"{photos}/train-{{000000..000003}}.tar", root / "cache", KMeansTokenizer.load(assets["tok"]),
                      views_per_image=2, samples_per_shard=100, progress=False)
    return {**assets, "cache": str(root / "cache"), "photos": photos}


@pytest.fixture
def tokenize_calls(monkeypatch):
    calls = []
    real = KMeansTokenizer.tokenize

    def counted(self, images):
        calls.append(images.shape[0])
        return real(self, images)

    monkeypatch.setattr(KMeansTokenizer, "tokenize", counted)
    return calls


def cache_cfg(cached, out, **kw):
    return tiny_cfg(cached, out, **{"train_shards": [], "token_cache": cached["cache"], "val_shards": [],
                                    "total_steps": 4, "checkpoint_every": 2, **kw})


def test_trains_from_the_cache_without_the_tokenizer(cached, tmp_path, tokenize_calls):
    out = tmp_path / "run"
    summary = run(cache_cfg(cached, out, num_workers=2))
    assert tokenize_calls == []
    recs = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["tokens"] == 16 * round(0.4 * 64) for r in recs)
    assert summary["data/samples"] >= 4 * 16 and summary["data/bad"] == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["token_cache"] == cached["cache"]
    meta = json.loads((out / "pretrained.json").read_text())
    assert meta["token_cache"] == cached["cache"] and meta["token_cache_fingerprint"]

    # same config -> same numbers (the stored view is picked with the per-sample seed)
    again = run(cache_cfg(cached, tmp_path / "again", num_workers=2))
    assert [r["loss"] for r in read_metrics(tmp_path / "again") if "loss" in r] == \
        pytest.approx([r["loss"] for r in recs], rel=1e-5)
    assert again["step"] == 4

    # resume treats the cache like the tokenizer: switching to live tokenization is refused
    live = tiny_cfg(cached, out, total_steps=6, val_shards=[])
    with pytest.raises(SetupError, match="trained with a token cache, not --token_cache None"):
        run(live)


def test_held_out_eval_is_the_only_tokenizer_use(cached, tmp_path, tokenize_calls):
    summary = run(cache_cfg(cached, tmp_path / "run", val_shards=[cached["val"]], eval_batches=2))
    assert len(tokenize_calls) == 2                                 # the 2 held-out batches, none in training
    assert summary["val/tokens"] > 0 and 0 <= summary["val/mim_acc"] <= 1


@pytest.mark.parametrize("change, msg", [
    (dict(patch_size=8), r"token cache grid \(8, 8\) != model patch grid \(4, 4\)"),
    (dict(tokenizer="dalle"), "holds kmeans tokens, but tokenizer is dalle: set --tokenizer kmeans"),
    ("vocab", "token cache vocab_size 64 != model vocab_size 32"),
    ("not_a_cache", "describes ordinary shards, not a token cache"),
])
def test_incompatible_cache_is_refused_before_training(cached, tmp_path, change, msg):
    out = tmp_path / "run"
    cfg = cache_cfg(cached, out)
    if change == "vocab":  # a cache whose manifest says 64 codes, with the 32-code tokenizer loaded for eval
        bad = tmp_path / "cache64"
        shutil.copytree(cached["cache"], bad)
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["token_cache"]["vocab_size"] = 64
        (bad / "manifest.json").write_text(json.dumps(manifest))
        cfg.update(token_cache=str(bad), val_shards=[cached["val"]])
    elif change == "not_a_cache":
        cfg.update(token_cache=cached["photos"])
    else:
        cfg.update(change)
    with pytest.raises(SetupError, match=msg):
        run(cfg)
    assert not out.exists()                                         # nothing written, no compute spent
