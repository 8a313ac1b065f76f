"""`beit tokenizer train vqkd`: outputs in both layouts and where they load (load_tokenizer, the token cache),
codebook health in the logs, dead-code restarts on and off, exact resume after a real kill, a non-finite
loss stopping the run, and bad input refused before compute."""
import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from vqkd_testutil import REPO, command, env, run_vqkd, timm_teacher, tiny_vqkd

from beit.runtime.run_logging import read_metrics
from beit.tokenizers import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from beit.data.sample_sets import build_sample_shards
    root = tmp_path_factory.mktemp("vqkd_photos")
    build_sample_shards(root, "photos")
    return {"train": str(root / "train-{000000..000013}.tar"), "val": str(root / "val-{000000..000002}.tar"),
            "teacher": timm_teacher(root / "teacher")}


def test_trains_writes_both_layouts_and_they_load(photos, tmp_path):
    out = tmp_path / "run"
    summary = run_vqkd(tiny_vqkd(photos, photos["teacher"], out))
    assert summary["tokenizer"] == str(out / "vqkd")
    names = {p.name for p in out.iterdir()}
    assert {"vqkd.safetensors", "vqkd.json", "vqkd_unilm.pth", "vqkd_unilm.json", "config.yaml", "metrics.jsonl",
            "final_metrics.json", "checkpoints"} <= names
    recs = read_metrics(out)
    train = [r for r in recs if "rec_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and all(math.isfinite(r["loss"]) for r in train)
    for r in train:  # codebook health beside the losses
        assert 0 < r["codebook_usage"] <= 1 and 1 <= r["codebook_perplexity"] <= 64 and r["dead_codes"] >= 0
    val = [r for r in recs if "val/codebook_usage" in r]
    assert [r["step"] for r in val] == [3, 6] and all(r["val/images"] == 222 for r in val)
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["val/tokens"] == 222 * 16 and final["codes_restarted"] == train[-1]["codes_restarted_total"] > 0
    # our pair (by folder or stem) and the unilm-layout file give the same tokens
    by_dir, by_pth = load_tokenizer("vqkd", out), load_tokenizer("vqkd", out / "vqkd_unilm.pth")
    assert (by_dir.vocab_size, by_dir.grid_size, by_dir.input_size) == (64, (4, 4), 32)
    assert by_pth.get_config() == by_dir.get_config()
    x = torch.rand(8, 3, 32, 32)
    assert torch.equal(by_dir.tokenize(x), by_pth.tokenize(x))
    sd = torch.load(out / "vqkd_unilm.pth", weights_only=True)["model"]  # plain tensors: weights-only loads it
    assert "quantize.embedding.weight" in sd and "decoder.blocks.0.attn.q_bias" in sd
    assert not any("last_used" in k for k in sd)
    unilm = json.loads((out / "vqkd_unilm.json").read_text())["unilm"]
    assert unilm["n_embed"] == 64 and unilm["decoder_out_dim"] == 32 and unilm["decoder_config"]["in_chans"] == 8
    # the token cache takes it like any tokenizer
    from beit.tokenizers.cache import main as cache_main
    assert cache_main(["--shards", photos["val"], "--out", str(tmp_path / "cache"), "--tokenizer", "vqkd",
                       "--tokenizer_path", str(out), "--views_per_image", "2", "--model_grid", "4"]) == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["token_cache"]["tokenizer"] == "vqkd" and manifest["num_samples"] == 222


def test_a_data_folder_holds_out_the_images_every_other_stage_holds_out(photos, tmp_path):
    """--data: VQ-KD reads the conversion the k-means tokenizer and pretraining of the folder read (split by
    --split_seed, not by the run's --seed) and measures its codebook on that conversion's held-out part."""
    from data_testutil import encode
    from data_testutil import photo as picture

    from beit.data.storage.folder_cache import written_counts
    from beit.options.pretrain import PretrainConfig
    from beit.tokenizers.vqkd_train import VQKDTrainConfig, check_inputs
    folder, cache = tmp_path / "pics", tmp_path / "cache"
    for c, name in enumerate(("ant", "bee")):
        (folder / name).mkdir(parents=True)
        for i in range(10):
            (folder / name / f"{name}{i}.png").write_bytes(encode(picture(10 * c + i), "PNG"))
    cfg = tiny_vqkd(photos, photos["teacher"], tmp_path / "run", train_shards=[], val_shards=[], data=str(folder),
                    data_cache=str(cache), seed=7)
    inputs = check_inputs(VQKDTrainConfig(**cfg), 1)
    shared = PretrainConfig(data=str(folder), data_cache=str(cache)).data_plan().directory
    assert inputs.val_shards and {str(Path(s).parent) for s in inputs.shards + inputs.val_shards} == {str(shared)}
    assert written_counts(shared, "val")[0] == 4 and written_counts(shared, "train")[0] == 16  # 20% of each: 2 + 2


def test_restarts_switch(photos, tmp_path):
    """Off: dead rows are counted but stay dead (the reference); on: they are restarted."""
    run_vqkd(tiny_vqkd(photos, photos["teacher"], tmp_path / "off", restart_dead_codes=False, total_steps=4,
                       eval_every=4, checkpoint_every=4))
    off = [r for r in read_metrics(tmp_path / "off") if "rec_loss" in r]
    assert off[-1]["dead_codes"] > 0 and all(r["codes_restarted"] == 0 for r in off)
    run_vqkd(tiny_vqkd(photos, photos["teacher"], tmp_path / "on", total_steps=4, eval_every=4, checkpoint_every=4))
    on = [r for r in read_metrics(tmp_path / "on") if "rec_loss" in r]
    assert sum(r["codes_restarted"] for r in on) > 0
    assert [r["rec_loss"] for r in on[:2]] == [r["rec_loss"] for r in off[:2]]  # same run until the first restart


def test_bf16_autocast_and_gradient_checkpointing_on_cpu(photos, tmp_path):
    """Mixed precision: the encoder, decoder and teacher under bf16 autocast, task layer, lookup and loss in fp32;
    with the blocks' activations recomputed in backward."""
    run_vqkd(tiny_vqkd(photos, photos["teacher"], tmp_path / "run", mixed_precision="bf16", total_steps=3,
                       eval_every=3, grad_checkpointing=True))
    recs = [r for r in read_metrics(tmp_path / "run") if "rec_loss" in r]
    assert len(recs) == 3 and all(math.isfinite(r["loss"]) for r in recs)
    assert json.loads((tmp_path / "run" / "final_metrics.json").read_text())["val/codebook_usage"] > 0


def _losses(out):
    return {r["step"]: (r["loss"], r["codebook_usage"], r["codes_restarted_total"])
            for r in read_metrics(out) if "rec_loss" in r}


@pytest.mark.slow
def test_exact_resume_after_a_real_kill(photos, tmp_path):
    """SIGKILL a run after its first checkpoint, rerun the same command: the losses, codebook usage and
    restarts from the resumed step on equal an uninterrupted run's exactly (mid-epoch and across epochs)."""
    cfg = dict(total_steps=16, checkpoint_every=4, batches_per_epoch=5, eval_every=100, keep_last=10)
    straight = tiny_vqkd(photos, photos["teacher"], tmp_path / "straight", **cfg)
    subprocess.run(command(straight), cwd=REPO, env=env(), check=True, capture_output=True, timeout=300)
    killed = tiny_vqkd(photos, photos["teacher"], tmp_path / "killed", **cfg)
    p = subprocess.Popen(command(killed), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    first = tmp_path / "killed" / "checkpoints" / "step_0000004" / "COMPLETE"
    deadline = time.time() + 240
    while not first.is_file() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert first.is_file() and not (tmp_path / "killed" / "final_metrics.json").exists(), "killed too late"
    resumed = subprocess.run(command(killed), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert sorted(b) == list(range(1, 17)) and b == a
    assert a[16][2] > 0  # restarts happened, and the same ones
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(load_tokenizer("vqkd", tmp_path / "straight").tokenize(x),
                       load_tokenizer("vqkd", tmp_path / "killed").tokenize(x))


def test_resume_refuses_another_tokenizer_or_teacher(photos, tmp_path):
    out = tmp_path / "run"
    run_vqkd(tiny_vqkd(photos, photos["teacher"], out, total_steps=3, eval_every=3))
    with pytest.raises(ValueError, match="vocab_size: saved 64, now 32"):
        run_vqkd(tiny_vqkd(photos, photos["teacher"], out, total_steps=6, vocab_size=32))
    other = timm_teacher(tmp_path / "other")  # same architecture, other random weights
    with pytest.raises(ValueError, match="the teacher at .* has other weights"):
        run_vqkd(tiny_vqkd(photos, other, out, total_steps=6))


def test_nonfinite_teacher_stops_the_run_with_a_message(photos, tmp_path):
    """A teacher checkpoint with a NaN weight (a real file): exit 1 and a message, no tokenizer written."""
    from safetensors.torch import load_file, save_file

    from beit.cli import main as cli
    sd = load_file(str(photos["teacher"]))
    sd["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(sd, str(bad))
    cfg = tiny_vqkd(photos, bad, tmp_path / "run")
    from vqkd_testutil import argv
    rc = cli(["tokenizer", "train", "vqkd", *argv(cfg)])
    assert rc == 1 and not (tmp_path / "run" / "vqkd.safetensors").exists()


@pytest.mark.parametrize("over, msg", [
    (dict(teacher_path=""), "pass --teacher_path"),
    (dict(model_grid=8), "token grid 4x4.*patch grid 8x8"),
    (dict(decoder_num_heads=3), "decoder_embed_dim 32 is not divisible by decoder_num_heads 3"),
    (dict(teacher_resample=False, input_size=64), "4x4 feature map.*grid is 8x8"),
    (dict(teacher="hf"), "no config.json"),
    (dict(train_shards=[], data=""), "no training data"),
    (dict(process_type="clip"), "process_type"),
])
def test_bad_input_is_refused_before_compute(photos, tmp_path, over, msg):
    out = tmp_path / "run"
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        run_vqkd(tiny_vqkd(photos, photos["teacher"], out, **over))
    assert not out.exists()
