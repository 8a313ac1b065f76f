"""Token cache: K views per image with boxes, flips and tokens; the reader reproduces them exactly."""
import io
import json

import numpy as np
import pytest
import torch

from beit.data.loading.decode import load_pixels, open_image, to_rgb
from beit.data.sample_sets import build_sample_shards
from beit.data.storage.shard_format import image_ext, iter_tar_samples
from beit.tokenizers.cache import main
from beit.tokenizers.images import sample_photo_crops
from beit.tokenizers.kmeans import KMeansTokenizer
from beit.tokenizers.token_cache import (
    CachedViews,
    check_cache_compatible,
    crop_view,
    read_cache_info,
    write_token_cache,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    build_sample_shards(d / "photos", "photos")
    tok = KMeansTokenizer.fit([sample_photo_crops(48, 32, seed=0)], vocab_size=32, patch_size=8, input_size=32,
                              epochs=1, progress=False, init_patches=800)
    tok.save(d / "km")
    return d, tok


def _samples(path):
    with open(path, "rb") as f:
        return list(iter_tar_samples(f))


def test_cache_roundtrip_and_reader(setup):
    d, tok = setup
    m = write_token_cache(str(d / "photos" / "val-000000.tar"), d / "c", tok, views_per_image=3, progress=False,
                          samples_per_shard=40)
    info = read_cache_info(d / "c")
    assert info["vocab_size"] == 32 and info["grid_size"] == [4, 4] and info["views_per_image"] == 3
    assert m["num_samples"] == sum(s["samples"] for s in m["shards"]) == 100 and len(m["shards"]) >= 2
    sample = _samples(d / "c" / m["shards"][0]["name"])[5]
    meta = json.loads(sample["views.json"])
    tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
    assert tokens.shape == (3, 4, 4) and tokens.dtype == np.uint16 and len(meta["boxes"]) == 3
    img, _ = open_image(sample[image_ext(sample)])
    load_pixels(img)
    img = to_rgb(img)[0]
    for k in range(3):  # stored tokens are exactly the tokenizer's on the stored view
        view = crop_view(img, meta["boxes"][k], 32, tok.interpolation, bool(meta["flips"][k]))
        assert np.array_equal(tok.tokenize(view[None])[0].numpy(), tokens[k])
    out = CachedViews(image_size=64, color_jitter=0.0)(img, sample)
    assert out["images"].shape == (3, 64, 64) and out["images"].dtype == torch.uint8
    assert out["tokens"].dtype == torch.long
    k = next(i for i, t in enumerate(tokens) if np.array_equal(out["tokens"].numpy(), t))
    # the encoder view is the stored box and flip (bicubic, as the live path): matches PIL to rounding
    ref = crop_view(img, meta["boxes"][k], 64, "bicubic", bool(meta["flips"][k]))
    assert (out["images"].float() / 255 - ref).abs().mean() < 0.01
    # Same seed -> identical cache bytes.
    m2 = write_token_cache(str(d / "photos" / "val-000000.tar"), d / "c2", tok, views_per_image=3, progress=False,
                           samples_per_shard=40)
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in m["shards"]]


def test_incompatible_cache_is_refused(setup):
    info = {"vocab_size": 32, "grid_size": [4, 4]}
    check_cache_compatible(info, 32, (4, 4))
    with pytest.raises(ValueError, match="vocab_size 32 != model vocab_size 8192"):
        check_cache_compatible(info, 8192, (4, 4))
    with pytest.raises(ValueError, match="grid"):
        check_cache_compatible(info, 32, (14, 14))
    with pytest.raises(FileNotFoundError, match="beit.tokenizers.cache"):
        read_cache_info(setup[0])


def test_cache_cli(setup, capsys):
    d, _ = setup
    rc = main(["--train_shards", str(d / "photos" / "val-000000.tar"), "--out", str(d / "cli"), "--tokenizer", "kmeans",
               "--tokenizer_path", str(d / "km"), "--views_per_image", "2"])
    assert rc == 0 and "views" in capsys.readouterr().out
    assert read_cache_info(d / "cli")["tokenizer"] == "kmeans"
