"""Training tokenizers from shards: k-means CLI, dVAE with Accelerate (checkpoint + exact resume), grid checks."""
import json

import pytest
import torch

from beit.data.sample_sets import build_sample_shards
from beit.tokenizers import load_tokenizer
from beit.tokenizers.fitting import DVAETrainConfig, KMeansTrainConfig, train_dvae
from beit.tokenizers.train import main


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    build_sample_shards(d, "photos")
    return str(d / "train-*.tar"), str(d / "val-*.tar")


def test_kmeans_cli_fits_saves_and_reports(shards, tmp_path, capsys):
    train, val = shards
    rc = main(["kmeans", "--train_shards", train, "--val_shards", val, "--out", str(tmp_path / "km"), "--vocab_size",
               "64",
               "--input_size", "32", "--patch_size", "8", "--epochs", "1", "--init_patches", "2000",
               "--num_workers", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    held_out = json.loads(out.split("[kmeans] held-out: ")[1].splitlines()[0])
    assert held_out["usage"] > 0.5
    tok = load_tokenizer("kmeans", tmp_path / "km")
    assert tok.grid_size == (4, 4) and tok.vocab_size == 64
    # the default --report_to tensorboard: the pass's inertia and the held-out numbers in OUT_run/tensorboard
    from test_tensorboard_layout import events, tags
    accs = events(tmp_path / "km_run")
    assert {"train/inertia", "final/val/usage"} <= tags(accs, "scalars"), tags(accs, "scalars")
    (usage,) = [e.value for ea in accs.values() if "final/val/usage" in ea.Tags()["scalars"]
                for e in ea.Scalars("final/val/usage")]
    assert usage == pytest.approx(held_out["usage"], abs=1e-4)


def test_grid_mismatch_is_refused_before_compute():
    with pytest.raises(ValueError, match="patch grid 14x14.*input_size 112"):
        KMeansTrainConfig(train_shards="x", input_size=64, patch_size=8, model_grid=14).validate()
    with pytest.raises(ValueError, match="token grid 8x8.*patch grid 14x14"):
        DVAETrainConfig(train_shards="x", input_size=64, downsample=8, model_grid=14).validate()
    DVAETrainConfig(train_shards="x", input_size=112, downsample=8, model_grid=14).validate()
    with pytest.raises(SystemExit):
        main(["dvae", "--train_shards", "x", "--downsample", "3"])


def _cfg(train, out, steps):
    return DVAETrainConfig(train_shards=train, output_dir=str(out), vocab_size=32, hidden=16, downsample=4,
                           input_size=16,
                           batch_size=8, steps=steps, anneal_steps=4, kl_warmup_steps=2, checkpoint_every=2,
                           log_every=1, progress=False, keep_last=5, num_workers=0)


def test_dvae_trains_checkpoints_and_resumes_exactly(shards, tmp_path):
    import shutil

    train, val = shards
    straight = train_dvae(_cfg(train, tmp_path / "a", 6))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    # Simulate a crash after the step-4 checkpoint: later checkpoints and outputs never happened.
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_0000006")
    (tmp_path / "b" / "dvae.safetensors").unlink()
    assert (tmp_path / "b" / "checkpoints" / "step_0000004" / "COMPLETE").is_file()
    resumed = train_dvae(_cfg(train, tmp_path / "b", 6))  # the same command again resumes at step 4
    for (k, v), (_, w) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(v, w, atol=1e-6), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the resumed run cut metrics.jsonl back to its checkpoint (step 4)
    tok = load_tokenizer("dvae", tmp_path / "b" / "dvae")
    x = torch.rand(2, 3, 16, 16)
    assert tok.tokenize(x).shape == (2, 4, 4) and tok.decode(tok.tokenize(x)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="vocab_size=32"):
        bad = _cfg(train, tmp_path / "b", 8)
        bad.vocab_size = 64
        train_dvae(bad)


def test_kmeans_fit_uses_every_image_every_pass(tmp_path, monkeypatch, capsys):
    """150 images at batch 64 (not a multiple): each mini-batch pass of the k-means fit sees all 150.
    Every image is one distinct solid colour, so any crop of it names it."""
    import io

    from PIL import Image

    from beit.data.storage.shard_writer import Item, WriteOptions, write_shards
    from beit.tokenizers.kmeans import KMeansTokenizer

    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (i, 255 - i, (7 * i) % 256)).save(buf, "PNG")
        return buf.getvalue()
    write_shards([Item(key=f"img{i:03d}", image=png(i), ext="png") for i in range(150)], tmp_path / "s",
                 prefix="train", opts=WriteOptions(max_samples=70), progress=False)
    passes = []
    fit = KMeansTokenizer.fit.__func__

    def spy(cls, batches, **kw):
        def recorded():
            seen = []
            passes.append(seen)
            for images in batches():
                seen += [round(float(v) * 255) for v in images[:, 0, 0, 0]]
                yield images
        return fit(cls, recorded, **kw)
    monkeypatch.setattr(KMeansTokenizer, "fit", classmethod(spy))
    rc = main(["kmeans", "--train_shards", str(tmp_path / "s" / "train-*.tar"), "--out", str(tmp_path / "km"),
               "--vocab_size", "16", "--input_size", "32", "--patch_size", "8", "--epochs", "2",
               "--init_patches", "400", "--batch_size", "64", "--num_workers", "0"])
    assert rc == 0
    mini_batch_passes = passes[-2:]  # the first pass(es) only collect k-means++ seeding patches
    for seen in mini_batch_passes:
        assert set(seen) == set(range(150)), f"{150 - len(set(seen))} images left out of a pass"
    assert "images_per_epoch" in capsys.readouterr().out
