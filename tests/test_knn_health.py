"""The kNN classifier against scikit-learn's, and the online kNN health metric of pretraining."""

import numpy as np
import pytest
import torch
from test_pretrain import run

import beit.pretrain as pretrain
from beit.data.sample_sets import build_sample_shards
from beit.engines.knn import knn_predict, load_views
from beit.runtime.run_logging import read_metrics
from beit.tokenizers.images import shard_image_batches
from beit.tokenizers.kmeans import KMeansTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_knn_predict_matches_sklearn_weighted_vote():
    from sklearn.neighbors import KNeighborsClassifier
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 16))
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    labels = rng.integers(0, 5, size=200)
    query = rng.normal(size=(50, 16))
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    t = 0.07
    ref = KNeighborsClassifier(n_neighbors=10, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1 - d) / t)).fit(train, labels).predict(query)
    ours = knn_predict(torch.tensor(train, dtype=torch.float64), torch.tensor(labels), torch.tensor(query),
                       k=10, temperature=t, chunk=7)
    assert (ours.numpy() == ref).all()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn_assets")
    build_sample_shards(root / "digits", "digits")
    train = str(root / "digits" / "train-*.tar")
    tok = KMeansTokenizer.fit(lambda: shard_image_batches(train, size=32, batch_size=64, max_images=256),
                              epochs=1, seed=0, init_patches=2000, progress=False,
                              vocab_size=16, patch_size=8, input_size=32)
    tok.save(root / "kmeans")
    return root


def cfg_for(root, out, **kw) -> dict:
    cfg = dict(train_shards=[str(root / "digits" / "train-*.tar")], tokenizer="kmeans",
               tokenizer_path=str(root / "kmeans"), image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
               batch_size=32, total_steps=8, warmup_steps=2, num_workers=0, checkpoint_every=100, log_every=2,
               report_to="none", output_dir=str(out), shuffle_buffer=64, crop_scale_min=0.6, hflip=0.0,
               knn_train_shards=[str(root / "digits" / "train-*.tar")],
               knn_val_shards=[str(root / "digits" / "test-*.tar")], knn_every=4)
    cfg.update(kw)
    return cfg


def test_knn_health_logged_beside_mim_metrics(assets, tmp_path):
    out = tmp_path / "run"
    summary = run(cfg_for(assets, out))
    recs = read_metrics(out)
    knn = {r["step"]: r for r in recs if "knn/acc" in r}
    assert sorted(knn) == [0, 4, 8]                                   # before training, every 4 steps, the last
    mim_steps = {r["step"] for r in recs if "mim_acc" in r}
    assert {4, 8} <= mim_steps                                        # a masked-token record at the same steps
    majority = knn[0]["knn/majority_acc"]
    assert 0.05 < majority < 0.2                                      # 10 balanced digit classes
    # even a barely trained encoder's features separate digits far better than the majority class
    assert all(majority + 0.2 < r["knn/acc"] <= 1 for r in knn.values())
    assert summary["knn/evaluations"] == 3 and summary["knn/acc"] == knn[8]["knn/acc"]
    assert summary["knn/seconds_total"] > 0 and 0 < summary["knn/cost_fraction"] < 10
    images, labels = load_views([str(assets / "digits" / "test-000000.tar")], 32)
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and len(images) == len(labels) > 0


def test_knn_health_refuses_bad_settings(assets, tmp_path):
    with pytest.raises(ValueError, match="both knn_train_shards and knn_val_shards"):
        run(cfg_for(assets, tmp_path / "a", knn_val_shards=[]))
    build_sample_shards(assets / "photos", "photos")  # unlabelled
    with pytest.raises(pretrain.SetupError, match="needs labelled images"):
        run(cfg_for(assets, tmp_path / "b", knn_val_shards=[str(assets / "photos" / "val-*.tar")]))
    with pytest.raises(pretrain.SetupError, match="--knn_val_shards"):
        run(cfg_for(assets, tmp_path / "c", knn_val_shards=[str(assets / "nowhere-*.tar")]))


def test_knn_majority_class_is_the_scored_sets(assets, tmp_path):
    """The majority-class baseline answers the scored set's most frequent class: with a memory bank of mostly
    0s and a scored set of mostly 1s it is the share of 1s there, not the share of 0s."""
    from types import SimpleNamespace

    from beit.compare.labels import read_labelled, write_labelled
    from beit.engines.knn import KnnMonitor
    digits = read_labelled(str(assets / "digits" / "train-*.tar"), "train_shards")
    zeros, ones, twos = ([s for s in digits if s["label"] == c] for c in (0, 1, 2))
    bank = write_labelled(zeros[:30] + ones[:5] + twos[:5], tmp_path / "bank", "train", {}, "test", 0)
    scored = write_labelled(zeros[30:34] + ones[5:21] + twos[5:10], tmp_path / "scored", "test", {}, "test", 0)
    acc = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    monitor = KnnMonitor([bank.replace("*", "000000")], [scored.replace("*", "000000")], 32, acc)
    assert monitor.n_val == 25 and monitor.majority_acc == pytest.approx(16 / 25)
