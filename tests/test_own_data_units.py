"""Folders in (the shard cache), shared option sections, aliases, the warmup cap, the `beit` help, the
loader-worker default and the end-of-run data line."""
from __future__ import annotations

import dataclasses
import os
import time

import pytest
from data_testutil import jpeg

from beit.config import parse_config, resolve_recipe
from beit.data.storage.folder_cache import folder_shards, release
from beit.data.storage.shardspec import expand_shards
from beit.optim.schedules import warmup_for
from beit.options.common import DataOptions, OptimOptions, PrecisionOptions, RunOptions
from beit.options.finetune import FinetuneConfig
from beit.options.predict import PredictConfig
from beit.options.pretrain import PretrainConfig


def image_folder(root, classes=("cat", "dog"), n=5):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / c / f"{c}{i}.jpg").write_bytes(jpeg(hash(c) % 97 + i))
    return root


def test_folder_is_written_once_and_reused_until_it_changes(tmp_path):
    src = image_folder(tmp_path / "pics")
    cache = tmp_path / "cache"
    a = folder_shards(src, labelled=True, val_fraction=0.2, cache=cache, log=lambda m: None)
    assert not a.reused and a.images == 10 and a.classes == ["cat", "dog"]
    assert len(expand_shards(a.val)) >= 1 and len(expand_shards(a.train)) == 8  # 8 train images, 1 per shard
    b = folder_shards(src, labelled=True, val_fraction=0.2, cache=cache, log=lambda m: None)
    assert b.reused and b.directory == a.directory
    time.sleep(0.01)
    (src / "dog" / "dog9.jpg").write_bytes(jpeg(500))  # a new image: written again
    said = []
    c = folder_shards(src, labelled=True, val_fraction=0.2, cache=cache, log=said.append)
    assert not c.reused and c.images == 11 and c.directory != a.directory
    assert a.directory.exists() and any("kept the older cache" in m for m in said)  # this process still reads it
    release(a.directory)  # once no run holds it, the next look-up removes the older set
    assert folder_shards(src, labelled=True, val_fraction=0.2, cache=cache, log=lambda m: None).reused
    assert not a.directory.exists()
    os.utime(src / "cat" / "cat0.jpg", ns=(1, 1))  # a modified file (mtime) also counts as a change
    assert not folder_shards(src, labelled=True, val_fraction=0.2, cache=cache, log=lambda m: None).reused
    flat = folder_shards(src, labelled=False, cache=cache, log=lambda m: None)  # pretraining: labels unused
    assert flat.classes is None and flat.val == "" and flat.images == 11


def test_labelled_folder_needs_two_classes(tmp_path):
    with pytest.raises(ValueError, match="one sub-folder per class, at least two"):
        folder_shards(image_folder(tmp_path / "one", classes=("cat",)), labelled=True, cache=tmp_path / "c")


def test_every_stage_shares_the_sections():
    for cls in (PretrainConfig, FinetuneConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        for section in (DataOptions, OptimOptions, PrecisionOptions, RunOptions):
            assert {f.name for f in dataclasses.fields(section)} <= names, (cls, section)
        assert "image_size" in names and "img_size" not in names


def test_booleans_aliases_and_suggestions(tmp_path, capsys):
    base = ["--train_shards", "x", "--val_shards", "y"]
    assert parse_config(FinetuneConfig, base + ["--model_ema"]).model_ema is True
    assert parse_config(FinetuneConfig, base + ["--model_ema", "--no-tensorboard"]).report_to == []  # deprecated
    assert parse_config(FinetuneConfig, base + ["--model_ema", "false"]).model_ema is False
    cfg = parse_config(FinetuneConfig, base + ["--img_size", "96"])  # the old name still works, with a warning
    assert cfg.image_size == 96
    assert "img_size is deprecated, use image_size" in capsys.readouterr().err
    (tmp_path / "old.yaml").write_text("img_size: 48\n")
    assert parse_config(FinetuneConfig, base + ["--config", str(tmp_path / "old.yaml")]).image_size == 48
    with pytest.raises(SystemExit):
        parse_config(FinetuneConfig, base + ["--batchsize", "4"])
    assert "did you mean --batch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(PretrainConfig, ["--data", "d", "--config", "beit_base_in1kk"])
    assert "did you mean 'beit_base_in1k'" in capsys.readouterr().err


def test_recipes_by_name():
    assert resolve_recipe("beit_base_in1k", "pretrain_").name == "pretrain_beit_base_in1k.yaml"
    assert resolve_recipe("beit_base_in1k", "finetune_").name == "finetune_beit_base_in1k.yaml"
    cfg = parse_config(PretrainConfig, ["--config", "demo_pretrain", "--data", "photos", "--auto_recipe", "false"])
    assert cfg.image_size == 64 and cfg.tokenizer == "kmeans"


def test_warmup_longer_than_the_run_is_capped_with_one_warning():
    said = []
    assert warmup_for(5, 10, warmup_epochs=10.0, warmup_steps=-1, log=said.append) == 1
    assert warmup_for(5, 100, warmup_epochs=2.0, warmup_steps=-1, log=said.append) == 10
    assert warmup_for(5, 100, warmup_epochs=2.0, warmup_steps=3, log=said.append) == 3
    assert len(said) == 1 and "warmup (50 optimizer steps) is not shorter than the run (10 steps)" in said[0]


def test_every_command_has_an_example_and_shows_defaults(capsys):
    from beit.cli import COMMANDS, EXAMPLES, main

    assert set(EXAMPLES) == set(COMMANDS)
    for name in ("export", "samples", "pretrain", "shards write"):
        with pytest.raises(SystemExit):
            main([*name.split(), "--help"])
        out = capsys.readouterr().out
        assert out.startswith(f"example: beit {name}") and "(default" in out


def test_loader_workers_default_to_the_cores_this_process_may_use(monkeypatch):
    for cores, want in ((1, 1), (2, 2), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        for cfg in (PretrainConfig(), FinetuneConfig()):
            assert cfg.num_workers == -1 and cfg.loader_workers == want
            assert f"{want} worker process(es) per process (--num_workers -1: min(4, {cores} CPU" in \
                cfg.describe_workers()
    explicit = DataOptions(num_workers=3)
    assert explicit.loader_workers == 3 and explicit.describe_workers().endswith("(--num_workers)")
    with pytest.raises(ValueError, match="--num_workers must be >= 0, or -1"):
        DataOptions(num_workers=-2, data="x").check_data()
    # every command with the option takes its default (beit predict refused -1, the default it inherits)
    PredictConfig(model="m", data="d").validate()
    with pytest.raises(ValueError, match="--num_workers must be >= 0, or -1"):
        PredictConfig(model="m", data="d", num_workers=-2).validate()


def test_reads_summary_names_upscaled_and_converted_images():
    from beit.data.loading.data_stats import describe_reads

    assert describe_reads({"data/samples": 10, "data/upscaled": 0}, 64) is None
    line = describe_reads({"data/samples": 40, "data/upscaled": 10, "data/converted_L": 4, "data/converted_P": 2}, 64)
    assert line == ("data: of 40 samples read, 10 (25%) smaller than 64 px on a side, upscaled; 6 converted to RGB "
                    "(4 from L, 2 from P)")


def test_resizing_relative_position_tables_prints_no_timm_warnings():
    """Fine-tuning at another grid than pretraining resizes the relative position tables with timm's
    interpolator, which triggers two torch UserWarnings about timm's own code (non-contiguous searchsorted,
    non-tuple indexing); a fresh process (they are shown once per process) with every warning shown prints none."""
    import subprocess
    import sys

    code = ("import torch; from beit.checkpoints.loading import _resize_rel_table; "
            "print(tuple(_resize_rel_table(torch.randn(52, 2), (8, 8), torch.Size((228, 2)), 'k', (4, 4)).shape))")
    r = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "(228, 2)", r.stderr
    assert "Warning" not in r.stderr, r.stderr
