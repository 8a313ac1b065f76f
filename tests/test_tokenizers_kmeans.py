"""k-means visual-word tokenizer: fit determinism, flat-patch handling, save/load, quality measures."""
import json

import pytest
import torch

from beit.tokenizers import load_tokenizer
from beit.tokenizers.images import sample_photo_crops
from beit.tokenizers.kmeans import KMeansTokenizer
from beit.tokenizers.metrics import measure

CFG = dict(vocab_size=64, patch_size=8, input_size=32)


@pytest.fixture(scope="module")
def photos():
    return sample_photo_crops(96, 32, seed=0), sample_photo_crops(48, 32, seed=1)


@pytest.fixture(scope="module")
def fitted(photos):
    train, _ = photos
    return KMeansTokenizer.fit(list(train.split(32)), epochs=2, seed=0, progress=False, init_patches=1500, **CFG)


def test_fit_is_deterministic_and_seed_dependent(photos, fitted):
    train, _ = photos
    again = KMeansTokenizer.fit(list(train.split(32)), epochs=2, seed=0, progress=False, init_patches=1500, **CFG)
    other = KMeansTokenizer.fit(list(train.split(32)), epochs=2, seed=1, progress=False, init_patches=1500, **CFG)
    assert torch.equal(fitted.centroids, again.centroids)
    assert not torch.equal(fitted.centroids, other.centroids)


def test_interface_frozen_shapes_and_validation(photos, fitted):
    _, test = photos
    tokens = fitted.tokenize(test[:4])
    assert tokens.dtype == torch.long and tokens.shape == (4, 4, 4)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 64
    fitted.train()
    assert not fitted.training and all(not p.requires_grad for p in fitted.parameters())
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        fitted.tokenize(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        fitted.tokenize(torch.rand(2, 3, 32, 32) * 255)
    with pytest.raises(TypeError, match="float"):
        fitted.tokenize(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_flat_patches_of_different_brightness_get_different_codes(photos, fitted):
    levels = torch.linspace(0.05, 0.95, 5)
    flat = levels[:, None, None, None].expand(5, 3, 32, 32).contiguous()
    tokens = fitted.tokenize(flat)
    assert all(len(t.unique()) == 1 for t in tokens)  # each flat image is one code...
    assert len(tokens[:, 0, 0].unique()) >= 4         # ...but brightness is kept


def test_save_load_roundtrip(tmp_path, photos, fitted):
    _, test = photos
    stem = fitted.save(tmp_path / "km")
    assert (tmp_path / "km.safetensors").is_file()
    meta = json.loads((tmp_path / "km.json").read_text())
    assert meta["kind"] == "kmeans" and meta["config"]["vocab_size"] == 64
    loaded = load_tokenizer("kmeans", tmp_path / "km.safetensors")
    assert torch.equal(loaded.tokenize(test), fitted.tokenize(test))
    meta["kind"] = "dvae"
    (tmp_path / "km.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="holds a 'dvae' tokenizer, not 'kmeans'"):
        KMeansTokenizer.load(stem)
    with pytest.raises(ValueError, match="train kmeans"):
        load_tokenizer("kmeans", None)


def test_fitted_tokens_carry_information_and_beat_random(photos, fitted):
    _, test = photos
    good = measure(fitted, test.split(16))
    rand = measure(KMeansTokenizer.random(**CFG), test.split(16))
    assert good["usage"] > 0.5 and good["majority_share"] < 0.3
    assert good["shift_stability"] > rand["shift_stability"] + 0.1
    # A degenerate tokenizer (all centroids equal) must fail the same checks.
    bad = KMeansTokenizer(**CFG)
    bad_m = measure(bad, test.split(16))
    assert bad_m["usage"] < 0.05 and bad_m["majority_share"] == 1.0


def test_too_few_patches_is_a_clear_error():
    with pytest.raises(ValueError, match="smaller vocab_size"):
        KMeansTokenizer.fit([torch.rand(1, 3, 32, 32)], progress=False, **CFG)
