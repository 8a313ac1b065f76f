"""Options of the fine-tune stage (``beit finetune --help``)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Literal

from beit.checkpoints.safe_pickle import TRUST_PICKLE_HELP
from beit.config import check_finite_numbers, field
from beit.data.pipelines.labelled import ClassificationAugmentOptions
from beit.options.common import (
    DataOptions,
    DataRecipeOptions,
    ModelOptions,
    OptimOptions,
    PrecisionOptions,
    RunOptions,
    ThreadOptions,
)
from beit.tasks import TASKS, describe_tasks
from beit.tasks.classification import MixupOptions
from beit.tasks.distillation import DistillOptions
from beit.tasks.segmentation import SegmentationOptions

TaskName = Literal[TASKS]  # a new registered task is a choice at once


@dataclasses.dataclass
class FinetuneConfig(SegmentationOptions, DistillOptions, MixupOptions, RunOptions, ThreadOptions, PrecisionOptions,
                     OptimOptions, ModelOptions, ClassificationAugmentOptions, DataOptions, DataRecipeOptions):
    """Shared sections (beit.options.common, the augmentation's in beit.data.pipelines, each task's beside it in
    beit.tasks) first, then fine-tuning's own options."""
    RECIPE_PREFIX = "finetune_"
    RECIPE_STAGE = "finetune"
    DEPRECATED = {"img_size": "image_size"}  # the name pretraining and the other stages use
    RENAMED: ClassVar[dict] = {"save_every": "checkpoint_every, counted in optimizer steps (as in pretraining)"}
    # the shared options with fine-tuning's defaults (BEiT-B on ImageNet-1k)
    lr: float = field(4e-3)
    output_dir: str = field("runs/finetune")
    log_every: int = field(10)

    task: TaskName = field("classification", help=f"what is trained (beit.tasks): {describe_tasks()}")
    # data
    num_classes: int = field(0, help="number of classes; 0 = from the label_map in the shards' manifest.json")
    val_data: str = field("", help="held-out class folders (the same class names as --data), instead of "
                                   "--val_fraction")
    image_size: int = field(224, help="input resolution (rel-pos tables/patch embed are resized to it on load; "
                                      "--img_size is its old name)")
    in_chans: int = field(3, help="input channels (images are decoded as RGB)")
    mean: tuple[float, float, float] = field((0.485, 0.456, 0.406), help="normalisation mean (as in pretraining)")
    std: tuple[float, float, float] = field((0.229, 0.224, 0.225), help="normalisation std (as in pretraining)")
    # model
    model: str = field("beit", help="the encoder (beit.modeling.backbones): 'beit' or any timm model name "
                                     "(swin_tiny_patch4_window7_224, vit_small_patch16_224, mobilevit_s, ...)")
    model_kwargs: dict = field(default_factory=dict, help="--model <timm name>: more timm.create_model arguments, e.g. "
                               "a small Swin {embed_dim: 32, depths: [2, 2, 2, 2], num_heads: [1, 2, 4, 8], "
                               "window_size: 4, patch_size: 2}; with --init of our pretraining of a timm model they "
                               "come from its pretrained.json")
    mlp_ratio: float = field(0.0)  # the model section's, with fine-tuning's default: from --init's weights
    init_values: float = field(0.1, help="layer-scale init (0.1 base, 1e-5 large, 0 = no layer scale; with --init: "
                                         "layer scale iff the weights have it, values loaded)")
    position: Literal["", "relative", "absolute", "both", "none"] = field(
        "", help="position embedding: relative (per-block rel-pos, BEiT) | absolute | both | none; '' = what --init's "
                 "weights have, else relative")
    layer_norm_eps: float = field(0.0, help="LayerNorm epsilon of the BEiT encoder; 0 = --init's (a transformers "
                                            "config.json's layer_norm_eps, transformers' 1e-12 if absent), else 1e-6 "
                                            "(BEiT, unilm and timm)")
    global_pool: Literal["", "avg", "token"] = field(
        "", help="BEiT classifier pooling: avg (mean of the patch tokens + fc_norm, BEiT's recipe) | token (the CLS "
                 "token after the final norm); '' = avg, or token when --init is a transformers classifier with "
                 "use_mean_pooling false")
    init: str = field("", help="weights to start from: our pretrained.safetensors / checkpoint dir, an official "
                               "BEiT .pth, timm weights; for --model <timm name> a timm weights file. Empty = scratch")
    init_key: str = field("", help="entry of a wrapping dict holding the weights (default: model/module/state_dict)")
    strict: bool = field(True, help="every encoder tensor of the model must come from --init and every --init tensor "
                                    "must fit; false: load what fits and report what was skipped or left random")
    trust_pickle: bool = field(False, help=TRUST_PICKLE_HELP)
    head_init_scale: float = field(0.001, help="the new head's weights are scaled by this")
    linear_probe: bool = field(False, help="freeze the encoder; train a linear head on pooled block features")
    probe_block: int = field(0, help="linear probe: features after this block (1-based; 0 = last)")
    # optimisation
    layer_decay: float = field(0.65, help="layer-wise lr decay: scale = layer_decay ** (L + 1 - layer_id)")
    # EMA
    model_ema: bool = field(False, help="keep an EMA of the weights (evaluated too)")
    model_ema_decay: float = field(0.9999, help="EMA decay per optimizer step")
    # run
    eval_every: int = field(1, help="evaluate every N epochs (and always at the end)")
    resume: bool = field(True, help="resume from the newest complete checkpoint in output_dir")

    def validate(self) -> None:
        from beit.modeling.backbones import backbone_for
        from beit.tasks import get_task

        self.check_choices()
        check_finite_numbers(self)
        get_task(self.task).check(self)
        backbone_for(self.model).check_finetune(self)
        self.check_optim()
        self.check_run()
        self.check_threads()
        self.check_data()
        self.check_augment()
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.val_data and not self.data:
            raise ValueError("--val_data goes with --data (class folders); with shards pass --val_shards")
        if self.val_data and self.val_shards:
            raise ValueError("--val_data and --val_shards both name the held-out data: give one")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"--layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.probe_block < 0:
            raise ValueError(f"--probe_block must be >= 0 (0 = last block), got {self.probe_block}")
        if self.init and not Path(self.init).exists():
            raise ValueError(f"--init {self.init} does not exist")
        if self.layer_norm_eps < 0:
            raise ValueError(f"--layer_norm_eps must be > 0 (or 0: from --init), got {self.layer_norm_eps}")
        if (self.global_pool or self.layer_norm_eps) and self.model != "beit":
            raise ValueError("--global_pool and --layer_norm_eps are BEiT encoder settings (--model beit); a timm "
                             "model keeps its own")

    def data_plan(self):
        """--data as fine-tuning trains on it: class folders (per the task), holding out --val_fraction unless
        --val_data / --val_shards name the held-out data."""
        from beit.tasks import get_task
        return self.folder_plan(labelled=get_task(self.task).labelled_folders,
                                hold_out=not (self.val_data or self.val_shards))


RESUME_KEYS = ("model", "model_kwargs", "model_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size",
               "image_size", "num_classes", "linear_probe", "probe_block", "init", "epochs", "teacher",
               "unlabelled_shards",
               "unlabelled_batch_size", "distill_temperature", "distill_alpha")

