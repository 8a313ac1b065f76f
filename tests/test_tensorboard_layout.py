"""TensorBoard: both stages log every scalar to output_dir/tensorboard under one naming scheme, and
pretraining logs mask / prediction / reconstruction pictures every --log_images_every steps."""
import io

import numpy as np
from PIL import Image
from test_pretrain import assets, run, tiny_cfg  # noqa: F401  (assets is a fixture)

from beit.runtime.run_logging import read_metrics, tensorboard_tag

SHARED = {"train/loss", "train/lr", "train/weight_decay", "train/grad_norm", "train/epoch", "data/samples", "data/bad"}


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folders = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents*")}
    assert folders, f"no TensorBoard events under {run_dir / 'tensorboard'}"
    acc = {}
    for f in folders:
        ea = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0})
        ea.Reload()
        acc[f] = ea
    return acc


def tags(accs, kind):
    return {t for ea in accs.values() for t in ea.Tags()[kind]}


def test_tag_names():
    assert tensorboard_tag("loss") == "train/loss" and tensorboard_tag("wd") == "train/weight_decay"
    assert tensorboard_tag("val_top1") == "val/top1" and tensorboard_tag("val/mim_acc") == "val/mim_acc"
    assert tensorboard_tag("data/bad") == "data/bad" and tensorboard_tag("train_loss") == "train/epoch_loss"


def test_pretraining_scalars_and_pictures(assets, tmp_path):  # noqa: F811
    out = tmp_path / "pre"
    run(tiny_cfg(assets, out, total_steps=4, checkpoint_every=4, report_to="tensorboard", log_images_every=2,
                 eval_batches=1))
    accs = events(out)
    scalars = tags(accs, "scalars")
    logged = {tensorboard_tag(k) for r in read_metrics(out) for k, v in r.items()
              if isinstance(v, (int, float)) and k not in ("step", "time")}
    assert logged <= scalars and SHARED <= scalars and {"val/mim_acc", "val/majority_acc"} <= scalars
    assert all(t.split("/")[0] in ("train", "val", "data", "final") for t in scalars)
    assert {"final/val/mim_acc", "final/train_seconds", "final/step"} <= scalars  # the run's final summary
    pics = tags(accs, "images")
    assert pics == {"pictures/masks", "pictures/tokens", "pictures/reconstruction"}
    for ea in accs.values():
        for tag in ea.Tags()["images"]:
            evs = ea.Images(tag)
            assert [e.step for e in evs] == [2, 4]
            img = np.asarray(Image.open(io.BytesIO(evs[-1].encoded_image_string)).convert("RGB"))
            assert img.shape[1] == 4 * (32 + 2) and img.std() > 5   # 4 images of 32 px side by side


def test_finetune_uses_the_same_layout(tmp_path):
    from test_finetune_run import cfg

    from beit.data.sample_sets import build_sample_shards
    from beit.finetune import run_finetune
    digits = tmp_path / "digits"
    build_sample_shards(digits, "digits")
    out = tmp_path / "ft"
    run_finetune(cfg(digits, out, epochs=1, batches_per_epoch=2, report_to="tensorboard", mixup=0.0, cutmix=0.0))
    scalars = tags(events(out), "scalars")
    assert SHARED <= scalars and {"val/top1", "val/top5", "val/loss", "train/epoch_loss"} <= scalars
    assert all(t.split("/")[0] in ("train", "val", "data", "final") for t in scalars)
    assert {"final/top1", "final/top5", "final/train_loss"} <= scalars
    assert not (out / "finetune").exists()
