"""Folders in (the shard cache), shared option sections, aliases, the warmup cap, the `beit` help."""
from __future__ import annotations

import dataclasses
import os
import time

import pytest
from data_testutil import jpeg

from beit.config import parse_config, resolve_recipe
from beit.data.storage.folder_cache import folder_shards
from beit.data.storage.shardspec import expand_shards
from beit.optim.schedules import warmup_for
from beit.options.common import DataOptions, OptimOptions, PrecisionOptions, RunOptions
from beit.options.finetune import FinetuneConfig
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
    (src / "dog" / "dog9.jpg").write_bytes(jpeg(500))  # a new image: written again, the old set removed
    c = folder_shards(src, labelled=True, val_fraction=0.2, cache=cache, log=lambda m: None)
    assert not c.reused and c.images == 11 and c.directory != a.directory and not a.directory.exists()
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
    cfg = parse_config(PretrainConfig, ["--config", "demo_pretrain", "--data", "photos"])
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
