"""A recipe fitted to a ``--data`` folder and the machine, for the options the user did not give.

``beit tokenizer train kmeans``, ``beit pretrain`` and ``beit finetune`` with ``--data`` (and ``--auto_recipe``,
the default) fill every option that is not on the command line or in a ``--config`` file from this table, and
print what they chose and why; any flag overrides its part.

* **BEiT-B**, for at least 20,000 training images with a median shorter side of at least 160 px, on a GPU:
  the options of ``launch/pretrain_beit_base_in1k.yaml`` / ``finetune_beit_base_in1k.yaml`` (224 px, 16 px
  patches, ViT-B, 800 / 100 epochs, global batch 2048 / 1024) and a k-means tokenizer of 8192 words on the
  same 14x14 grid;
* **small-data**, for anything else (fewer or smaller images, or no GPU): ``beit compare``'s validated recipe
  (``beit/compare/recipe.py``: 32 px, 8 px patches, a 4-block ViT of width 64, k-means vocabulary 64, batch 64 /
  16, fp32). On a CPU the epochs are cut so that a stage runs about as many optimizer steps as that recipe did
  on the 1,437 digits (pretraining 150 epochs x 23 steps, fine-tuning 400 epochs x 9 steps), never more than
  its epochs; on a GPU it runs them all.

Fine-tuning from ``--init`` of our pretraining takes the input and patch size of that pretraining. The machine's
speed enters the printed time estimate (measured on the first optimizer steps), not the choice, so a folder gets
the same recipe on every CPU and a run can be repeated.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

LARGE_MIN_IMAGES = 20_000
LARGE_MIN_SIDE = 160
CPU_PRETRAIN_STEPS = 3450   # beit compare: 150 epochs of 1,437 digits at batch 64
CPU_FINETUNE_STEPS = 3600   # beit compare: 400 epochs of 142 labelled digits at batch 16
SIZES_READ = 200            # image headers read for the median side
# options of a recipe that belong to the run, not to the recipe: the stage's own defaults stay
RUN_KEYS = {"num_workers", "tensorboard", "checkpoint_every", "keep_last", "log_every", "eval_every", "output_dir",
            "tokenizer", "num_classes", "task", "model"}


@dataclass(frozen=True)
class FolderFacts:
    images: int          # listed in the folder
    train_images: int    # the training part (without the held-out images)
    short_side: int      # median shorter side in px of up to SIZES_READ images
    gpu: bool
    processes: int

    @property
    def large(self) -> bool:
        return self.gpu and self.train_images >= LARGE_MIN_IMAGES and self.short_side >= LARGE_MIN_SIDE

    def describe(self) -> str:
        return (f"{self.images:,} images ({self.train_images:,} to train on), median shorter side {self.short_side} "
                f"px, {'a GPU' if self.gpu else 'no GPU'}")


def folder_facts(plan) -> FolderFacts:
    """What the recipe is chosen from: a listed folder (a FolderPlan) and the machine."""
    import torch
    from PIL import Image

    from beit.runtime.run_lock import world_size

    items = [it for _, part in plan.splits for it in part]
    train = sum(len(part) for name, part in plan.splits if name == "train")
    step = max(1, len(items) // SIZES_READ)
    sides = []
    for it in items[::step][:SIZES_READ]:
        try:
            with Image.open(it.image) as im:
                sides.append(min(im.size))
        except (OSError, ValueError):
            continue  # an unreadable file: the conversion counts and names it
    short = sorted(sides)[len(sides) // 2] if sides else 0
    return FolderFacts(len(items), train, short, torch.cuda.is_available(), world_size())


def small_epochs(train_images: int, batch: int, processes: int, steps: int, most: int, gpu: bool) -> int:
    """The small-data recipe's epochs: all of them on a GPU; on a CPU about ``steps`` optimizer steps."""
    if gpu:
        return most
    per_epoch = max(1, math.ceil(train_images / (batch * processes)))
    return max(1, min(most, round(steps / per_epoch)))


def cpu_use(facts: FolderFacts) -> dict:
    """The small model on a CPU: one intra-op thread, and the images read in the training process. Its matrices are
    too small to gain from a second thread, and on shared cores the threads wait for each other (60 pretraining
    steps of the digits recipe: 10 s with one thread, 80 s with two, on a busy 2-core machine); a loader worker
    competes with the step for the same cores (docs/compare.md: 120 steps in 25 s without one, 31 s with one)."""
    return {} if facts.gpu else {"threads": 1, "num_workers": 0}


def beit_b(stage: str) -> dict:
    import yaml

    from beit.config import resolve_recipe

    data = yaml.safe_load(resolve_recipe("beit_base_in1k", f"{stage}_").read_text()) or {}
    return {k: v for k, v in data.items() if k not in RUN_KEYS}


def tokenizer_values(facts: FolderFacts, cfg) -> dict:
    if facts.large:
        return dict(input_size=224, patch_size=16, vocab_size=8192)
    from beit.compare.recipe import MODEL, TOKENIZER
    return dict(TOKENIZER, input_size=MODEL["image_size"], patch_size=MODEL["patch_size"], **cpu_use(facts))


def training_values(stage: str, facts: FolderFacts, steps_on_cpu: int) -> dict:
    """A training stage's recipe: BEiT-B's, or the small-data one with its epochs for the machine."""
    if facts.large:
        return beit_b(stage)
    from beit.compare import recipe
    small = getattr(recipe, stage.upper())
    values = {**recipe.MODEL, **{k: v for k, v in small.items() if k not in RUN_KEYS}, **cpu_use(facts)}
    values["epochs"] = small_epochs(facts.train_images, values["batch_size"], facts.processes, steps_on_cpu,
                                    small["epochs"], facts.gpu)
    return values


def pretrain_values(facts: FolderFacts, cfg) -> dict:
    return training_values("pretrain", facts, CPU_PRETRAIN_STEPS)


def finetune_values(facts: FolderFacts, cfg) -> dict:
    return training_values("finetune", facts, CPU_FINETUNE_STEPS)


STAGES = {"tokenizer": tokenizer_values, "pretrain": pretrain_values, "finetune": finetune_values}


def pretrained_geometry(init: str) -> dict:
    """Input and patch size of ``--init`` when it is our pretraining (``pretrained.json`` beside it), else {}."""
    meta_path = Path(init).with_suffix(".json")
    try:
        saved = json.loads(meta_path.read_text()).get("pretrain_config") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: saved[k] for k in ("image_size", "patch_size") if isinstance(saved.get(k), int)}


def tokenizer_grid(path: str) -> int:
    """The token grid side of a saved tokenizer (input_size / its patch or stride), 0 when unknown."""
    from beit.tokenizers.base import read_tokenizer_json
    try:
        _, conf = read_tokenizer_json(path)
    except (OSError, ValueError):
        return 0
    step = conf.get("patch_size") or conf.get("downsample")
    return conf["input_size"] // step if conf.get("input_size") and step else 0


def fit_to_data(cfg, given: set[str], stage: str, plan, log=print):
    """``cfg`` with every recipe option that is not in ``given`` set from the recipe for ``plan``'s folder;
    the choice is printed with ``log``."""
    if stage == "finetune" and (cfg.task != "classification" or cfg.model != "beit"):
        log(f"recipe from the data: fitted for classifying with the beit model only; --task {cfg.task} --model "
            f"{cfg.model} keeps the defaults and the options given")
        return cfg
    facts = folder_facts(plan)
    values = STAGES[stage](facts, cfg)
    notes = []
    if stage == "finetune" and getattr(cfg, "init", ""):
        geometry = pretrained_geometry(cfg.init)
        for k in ("embed_dim", "depth", "num_heads"):  # the encoder's size comes from --init's weights
            values.pop(k, None)
        if geometry:
            values.update(geometry)
            notes.append(f"input {geometry.get('image_size')} px / patch {geometry.get('patch_size')} px from "
                         f"--init's pretraining")
        else:
            values.pop("image_size", None)
            values.pop("patch_size", None)
            notes.append("input and patch size: the defaults (--init has no saved pretraining config beside it)")
    if stage == "pretrain" and getattr(cfg, "tokenizer_path", None) and "patch_size" not in given:
        grid, size = tokenizer_grid(cfg.tokenizer_path), values.get("image_size", cfg.image_size)
        size = cfg.image_size if "image_size" in given else size
        if grid and size % grid == 0 and size // grid != values.get("patch_size"):
            values["patch_size"] = size // grid
            notes.append(f"patch {size // grid} px: the tokenizer's {grid}x{grid} grid")
    fields = {f.name for f in dataclasses.fields(cfg)}
    chosen = {k: v for k, v in values.items() if k in fields and k not in given}
    cfg = dataclasses.replace(cfg, **chosen)
    kept = sorted(k for k in values if k in fields and k in given)
    log(f"recipe from the data: {facts.describe()} -> the {'BEiT-B' if facts.large else 'small-data'} recipe: "
        + describe_choice(stage, cfg) + "".join(f"; {n}" for n in notes)
        + (f"; given: {', '.join('--' + k for k in kept)}" if kept else "")
        + " (any flag overrides its part; --auto_recipe false: the defaults)")
    return cfg


def describe_choice(stage: str, cfg) -> str:
    if stage == "tokenizer":
        return (f"{cfg.input_size} px view, {cfg.patch_size} px patches, vocabulary {cfg.vocab_size}, "
                f"{cfg.epochs} k-means epochs")
    size = ("the encoder of --init" if getattr(cfg, "init", "") else
            f"ViT {cfg.embed_dim} wide x {cfg.depth} blocks ({cfg.num_heads} heads)" if cfg.embed_dim
            else f"ViT {cfg.model_size}")
    batch = f"global batch {cfg.global_batch_size}" if cfg.global_batch_size else f"batch {cfg.batch_size}"
    threads = f", {cfg.threads} CPU thread(s)" if cfg.threads else ""
    return (f"{cfg.image_size} px images, {cfg.patch_size} px patches, {size}, {cfg.epochs} epochs, {batch}, "
            f"lr {cfg.lr:g}, precision {cfg.mixed_precision}{threads}")
