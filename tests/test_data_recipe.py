"""Own-data runs at a real size, in units: the recipe fitted to a --data folder and the machine (any flag
overrides it), the held-out split every stage shares (and the rule for tiny folders), the time estimate
from measured steps, the "pretraining is not learning" check, and the messages for a folder given as shards."""
from __future__ import annotations

import dataclasses

import pytest
from data_testutil import encode, photo

from beit.config import parse_config
from beit.data.storage.folder_cache import MAX_HELD_OUT, MIN_SPLIT_IMAGES, hold_out, plan_folder
from beit.data.storage.shard_writer import Item
from beit.engines.pretrain import learning_check, learning_of
from beit.options import data_recipe
from beit.options.data_recipe import FolderFacts, finetune_values, pretrain_values
from beit.options.finetune import FinetuneConfig
from beit.options.pretrain import PretrainConfig
from beit.runtime.estimate import TimeEstimate
from beit.tokenizers.fitting import KMeansTrainConfig
from beit.tokenizers.vqkd_train import VQKDTrainConfig


def class_folders(root, classes=("ant", "bee", "cat"), n=12, side=40):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{name}{i:02d}.png").write_bytes(encode(photo(100 * c + i, (side, side + 8)), "PNG"))
    return root


def test_small_images_get_the_compare_recipe_with_epochs_for_the_cpu(tmp_path, capsys):
    from beit.compare.recipe import FINETUNE, MODEL, PRETRAIN

    data = class_folders(tmp_path / "pics")
    tok = parse_config(KMeansTrainConfig, ["--data", str(data), "--out", str(tmp_path / "tok")])
    pre = parse_config(PretrainConfig, ["--data", str(data)])
    ft = parse_config(FinetuneConfig, ["--data", str(data)])
    said = capsys.readouterr().out
    assert (tok.input_size, tok.patch_size, tok.vocab_size) == (32, 8, 64)
    for cfg in (pre, ft):
        assert {k: getattr(cfg, k) for k in MODEL} == MODEL and cfg.mixed_precision == "no"
        assert (cfg.num_workers, cfg.threads) == (0, 1)  # the tiny model on a CPU: one thread, no loader worker
    assert (pre.batch_size, pre.lr, pre.mask_ratio, pre.epochs) == (64, PRETRAIN["lr"], 0.4, PRETRAIN["epochs"])
    assert (ft.batch_size, ft.layer_decay, ft.epochs) == (16, FINETUNE["layer_decay"], FINETUNE["epochs"])  # 29 images
    assert said.count("recipe from the data: 36 images (30 to train on), median shorter side 40 px, no GPU -> the "
                      "small-data recipe") == 3
    # on a CPU a larger folder gets about as many optimizer steps as the compare recipe, not all its epochs
    facts = FolderFacts(images=12_000, train_images=9_600, short_side=28, gpu=False, processes=1)
    assert pretrain_values(facts, pre)["epochs"] == round(data_recipe.CPU_PRETRAIN_STEPS / 150)  # 150 steps/epoch
    assert finetune_values(facts, ft)["epochs"] == 6  # 600 steps/epoch
    assert finetune_values(dataclasses.replace(facts, gpu=True), ft)["epochs"] == FINETUNE["epochs"]


def test_large_photo_sets_on_a_gpu_get_the_beit_b_recipe():
    big = FolderFacts(images=50_000, train_images=45_000, short_side=375, gpu=True, processes=8)
    assert big.large and not dataclasses.replace(big, gpu=False).large
    assert not dataclasses.replace(big, short_side=64).large and not dataclasses.replace(big, train_images=5000).large
    pre = pretrain_values(big, PretrainConfig())
    assert (pre["image_size"], pre["patch_size"], pre["model_size"], pre["epochs"], pre["global_batch_size"]) == \
        (224, 16, "base", 800, 2048)
    assert not {"num_workers", "threads", "tokenizer"} & set(pre)  # the machine's and the tokenizer file's
    ft = finetune_values(big, FinetuneConfig())
    assert (ft["epochs"], ft["layer_decay"], ft["global_batch_size"]) == (100, 0.65, 1024)
    assert data_recipe.tokenizer_values(big, None) == dict(input_size=224, patch_size=16, vocab_size=8192)


def test_flags_and_config_files_override_the_recipe_and_auto_recipe_false_keeps_the_defaults(tmp_path, capsys):
    data = class_folders(tmp_path / "pics")
    yaml = tmp_path / "mine.yaml"
    yaml.write_text("lr: 0.002\n")
    cfg = parse_config(PretrainConfig, ["--data", str(data), "--epochs", "7", "--image_size", "64", "--config",
                                        str(yaml)])
    assert (cfg.epochs, cfg.image_size, cfg.patch_size, cfg.lr, cfg.embed_dim) == (7, 64, 8, 0.002, 64)
    assert "given: --epochs, --image_size, --lr" in capsys.readouterr().out
    plain = parse_config(PretrainConfig, ["--data", str(data), "--auto_recipe", "false"])
    assert (plain.image_size, plain.epochs, plain.model_size, plain.num_workers, plain.threads) == \
        (224, 800, "base", -1, 0)
    assert "recipe" not in capsys.readouterr().out
    shards = parse_config(PretrainConfig, ["--train_shards", "x.tar"])  # shards: the defaults, no recipe
    assert (shards.image_size, shards.epochs) == (224, 800)
    # the default split needs no flag with shards; an explicit one needs --data
    for cls, extra in ((PretrainConfig, []), (VQKDTrainConfig, ["--teacher_path", "t"])):
        parse_config(cls, ["--train_shards", "x.tar", *extra])
        with pytest.raises(SystemExit):
            parse_config(cls, ["--train_shards", "x.tar", "--val_fraction", "0.1", *extra])
        assert "--val_fraction splits a --data folder; with shards pass --val_shards" in capsys.readouterr().err
    # a saved shard run's config.yaml holds the split fields (today's default, or an older run's 0.0): it loads
    for value in (0.2, 0.0):
        saved = tmp_path / f"config_{value}.yaml"
        saved.write_text(f"train_shards: [x.tar]\nval_fraction: {value}\nsplit_seed: 0\n")
        assert parse_config(PretrainConfig, ["--config", str(saved)]).val_fraction == value
    saved.write_text("train_shards: [x.tar]\nsplit_seed: 3\n")
    with pytest.raises(SystemExit):
        parse_config(PretrainConfig, ["--config", str(saved)])
    assert "--split_seed splits a --data folder" in capsys.readouterr().err


def test_finetuning_takes_the_geometry_of_its_pretraining_and_pretraining_the_tokenizers_grid(tmp_path, capsys):
    import json

    from beit.tokenizers.kmeans import KMeansTokenizer

    data = class_folders(tmp_path / "pics")
    init = tmp_path / "pre" / "pretrained.safetensors"
    init.parent.mkdir()
    init.write_bytes(b"")
    init.with_suffix(".json").write_text(json.dumps({"pretrain_config": {"image_size": 48, "patch_size": 12}}))
    ft = parse_config(FinetuneConfig, ["--data", str(data), "--init", str(init)])
    assert (ft.image_size, ft.patch_size, ft.embed_dim, ft.depth) == (48, 12, 0, 0)  # the encoder's size: --init's
    assert "input 48 px / patch 12 px from --init's pretraining" in capsys.readouterr().out
    KMeansTokenizer.random(vocab_size=16, patch_size=4, input_size=32).save(tmp_path / "tok")  # an 8x8 grid
    pre = parse_config(PretrainConfig, ["--data", str(data), "--tokenizer_path", str(tmp_path / "tok")])
    assert (pre.image_size, pre.patch_size) == (32, 4)
    assert "patch 4 px: the tokenizer's 8x8 grid" in capsys.readouterr().out
    student = parse_config(FinetuneConfig, ["--data", str(data), "--model", "mobilevit_xxs"])  # not a BEiT ViT
    assert (student.image_size, student.epochs, student.embed_dim) == (224, 100, 0)
    assert "fitted for classifying with the beit model only" in capsys.readouterr().out


def test_every_stage_of_a_folder_holds_out_the_same_images_and_tiny_folders_none(tmp_path):
    data = class_folders(tmp_path / "pics", n=10)
    cache = tmp_path / "cache"
    flat = plan_folder(data, labelled=False, val_fraction=0.2, seed=3, cache=cache)
    classes = plan_folder(data, labelled=True, val_fraction=0.2, seed=3, cache=cache)
    held = {name: sorted(it.key for it in part) for name, part in flat.splits}
    assert held == {name: sorted(it.key for it in part) for name, part in classes.splits}
    assert len(held["val"]) == 6 and {k.split("/")[0] for k in held["val"]} == {"ant", "bee", "cat"}  # 2 each
    assert held != {n: sorted(it.key for it in p)
                    for n, p in plan_folder(data, labelled=False, val_fraction=0.2, seed=4, cache=cache).splits}
    # a tokenizer, pretraining and token cache with the same options use one conversion (one set)
    tok = parse_config(KMeansTrainConfig, ["--data", str(data), "--data_cache", str(cache), "--split_seed", "3"])
    pre = parse_config(PretrainConfig, ["--data", str(data), "--data_cache", str(cache), "--split_seed", "3"])
    assert tok.data_plan().name == pre.data_plan().name == flat.name
    # VQ-KD (no recipe of its own) holds out the same images: its --data is split by --split_seed, not its --seed
    vq = parse_config(VQKDTrainConfig, ["--data", str(data), "--data_cache", str(cache), "--split_seed", "3",
                                        "--seed", "9", "--teacher_path", "teacher"])
    assert vq.folder_plan(labelled=False).name == flat.name and not hasattr(vq, "auto_recipe")
    # the rule for small folders and large ones
    items = [Item(key=f"a{i}", image=f"a{i}.png") for i in range(MIN_SPLIT_IMAGES - 1)]
    splits, why = hold_out(items, 0.2, 0)
    assert [n for n, _ in splits] == ["train"] and why.startswith(f"nothing held out: {MIN_SPLIT_IMAGES - 1} image")
    lonely = [Item(key=f"d{i}/a.png", image=f"d{i}/a.png") for i in range(20)]  # one image per sub-folder
    assert hold_out(lonely, 0.2, 0)[1].startswith("nothing held out: every sub-folder holds one image")
    many = [Item(key=f"b{i:06d}", image="x") for i in range(40_000)]
    splits, why = hold_out(many, 0.2, 0)
    assert len(splits[1][1]) == MAX_HELD_OUT and f"at most {MAX_HELD_OUT}" in why


def test_time_estimate_comes_from_steps_after_the_first(monkeypatch):
    clock = iter([10.0, 10.5, 11.0, 11.5, 12.0, 12.5, 13.0, 13.5])  # at the end of steps 1-8: 0.5 s per step
    monkeypatch.setattr("beit.runtime.estimate.time.perf_counter", lambda: next(clock))
    said = []
    est = TimeEstimate(1000, said.append, min_steps=5, min_seconds=2.0)
    for step in range(1, 9):
        est(step)
    assert said == ["estimated time: 8.3 min for the remaining 994 of 1,000 steps (0.500 s/step, measured over "
                    "steps 2-6; other work on the machine changes it)"]


def test_not_learning_is_said_with_what_to_change():
    flat = learning_check(0.468, 0.468, 12_000, "held-out")  # the run: exactly the majority baseline
    assert not flat["learning"] and "pretraining did not learn: held-out masked-token accuracy 0.468" in \
        flat["warning"] and "--epochs" in flat["warning"] and "--vocab_size" in flat["warning"]
    learnt = learning_check(0.613, 0.439, 12_000, "held-out")  # beit compare's recipe on the same images
    assert learnt["learning"] and "warning" not in learnt
    assert not learning_check(0.52, 0.50, 200, "training")["learning"]  # +2 points on 200 tokens is noise
    assert learning_check(0.52, 0.50, 200_000, "training")["learning"]
    assert not learning_check(0.505, 0.50, 10 ** 7, "training")["learning"]  # significant, but under one point
    # the summary's check: the held-out score when there is one, else the last logged training window
    held = learning_of({"val/mim_acc": 0.6, "val/majority_acc": 0.2, "val/tokens": 5000}, {"mim_acc": 0.1})
    assert held["learning"]["on"] == "held-out" and held["learning"]["learning"] and "warnings" not in held
    train = learning_of({}, {"mim_acc": 0.30, "majority_acc": 0.30, "tokens": 1536})
    assert train["learning"]["on"] == "training" and train["warnings"][0].startswith("pretraining did not learn: "
                                                                                     "training masked-token")
    assert learning_of({}, {}) == {}


def test_a_folder_of_images_given_as_shards_says_to_pass_it_as_data(tmp_path):
    from beit.data.storage.shardspec import expand_shards

    data = class_folders(tmp_path / "pics", n=1)
    with pytest.raises(ValueError, match="holds images, not .tar shards: the training commands take it as --data") \
            as e:
        expand_shards(str(data))
    assert "--out shards/pics" in str(e.value) and f"--out {data}" not in str(e.value)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_folder_run_holds_out_fits_on_the_rest_says_when_it_is_not_learning_and_viz_draws_it(tmp_path):
    """The commands on one folder, no split options: the tokenizer fits on the training part and scores the
    held-out part, pretraining (two epochs: nothing learnt) scores the same held-out images and ends with the
    warning, which `beit viz RUN` shows, drawing from the run's own held-out images."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    class_folders(tmp_path / "pics")
    beit = str(Path(sys.executable).parent / "beit")
    env = dict(os.environ, BEIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")

    def run(*args):
        r = subprocess.run([beit, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout + r.stderr

    out = run("tokenizer", "train", "kmeans", "--data", "pics", "--out", "tok")
    assert "36 images, written to" in out and "6 held out (20% of each sub-folder, split seed 0)" in out
    assert "[kmeans] training data: 30 images" in out and '"num_images": 6' in out
    out = run("pretrain", "--data", "pics", "--tokenizer_path", "tok", "--output_dir", "pre", "--epochs", "2")
    assert "36 images, reused" in out  # the tokenizer's conversion, split and all
    assert "held-out masked-token accuracy" in out and "(36 masked tokens in 6 images)" in out
    final = json.loads((tmp_path / "pre" / "final_metrics.json").read_text())
    assert final["learning"]["on"] == "held-out" and not final["learning"]["learning"]
    assert final["warnings"][0].startswith("pretraining did not learn") and f"warning: {final['warnings'][0]}" in out
    out = run("viz", "pre", "--device", "cpu")
    assert "Warning           pretraining did not learn" in out
    assert "pretraining did not learn" in (tmp_path / "pre" / "index.html").read_text()


def test_confusion_title_names_the_held_out_images_and_fits_the_figure(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from beit.engines.finetune import save_confusion_png, title_lines

    title = "beit: top-1 97.2% on 360 held-out images (my_labelled: 20% of each sub-folder, split seed 0)"
    wrapped = title_lines(title, 2.0 + 0.45 * 3)
    assert wrapped.replace("\n", " ") == title and all(len(line) <= 30 for line in wrapped.splitlines())
    saved = []
    real = plt.Figure.savefig
    plt.Figure.savefig = lambda fig, *a, **k: (saved.append(fig.axes[0].get_title()), real(fig, *a, **k))
    try:
        save_confusion_png([[3, 0, 0], [0, 2, 1], [0, 0, 3]], tmp_path / "c.png", ["a", "b", "c"], title=title)
    finally:
        plt.Figure.savefig = real
    assert saved == [wrapped] and (tmp_path / "c.png").is_file()
