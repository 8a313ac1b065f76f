"""Options of the fine-tune stage (``beit finetune --help``)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Literal

from beit.checkpoints.safe_pickle import TRUST_PICKLE_HELP
from beit.config import check_finite_numbers, field
from beit.data.pipelines.labelled import ClassificationAugmentOptions
from beit.options.common import DataOptions, OptimOptions, PrecisionOptions, RunOptions, TrackerOptions
from beit.tasks import TASKS, describe_tasks

TaskName = Literal[TASKS]  # a new registered task is a choice at once


@dataclasses.dataclass
class FinetuneConfig(RunOptions, TrackerOptions, PrecisionOptions, OptimOptions, ClassificationAugmentOptions,
                     DataOptions):
    """Shared sections (beit.options.common) first, then fine-tuning's own options."""
    RECIPE_PREFIX = "finetune_"
    DEPRECATED = {"img_size": "image_size"}  # the name pretraining and the other stages use
    RENAMED: ClassVar[dict] = {"save_every": "checkpoint_every, counted in optimizer steps (as in pretraining)"}
    # the shared options with fine-tuning's defaults (BEiT-B on ImageNet-1k)
    val_fraction: float = field(0.2, help="with --data: hold out this fraction of the images per class (seeded) "
                                          "for top-1 and the confusion matrix, unless --val_data or --val_shards "
                                          "names held-out data; 0: none")
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
                               "window_size: 4, "
                               "patch_size: 2}; with --init of our Swin pretraining they come from its pretrained.json")
    model_size: Literal["tiny", "small", "base", "large"] = field("base", help="BEiT size "
                                                                               "(beit.modeling.mim.BEIT_SIZES)")
    embed_dim: int = field(0, help="override the size's embedding dim (0 = from --init's weights, else model_size)")
    depth: int = field(0, help="override the size's depth (0 = from --init's weights, else model_size)")
    num_heads: int = field(0, help="override the size's heads (0 = from --init's rel-pos tables or the config / "
                                   "args saved beside them, else model_size)")
    mlp_ratio: float = field(0.0, help="MLP width / embed_dim (0 = from --init's weights, else 4)")
    patch_size: int = field(16, help="patch size in px (--init's patch embedding is resampled to it)")
    init_values: float = field(0.1, help="layer-scale init (0.1 base, 1e-5 large, 0 = no layer scale; with --init: "
                                         "layer scale iff the weights have it, values loaded)")
    position: Literal["", "relative", "absolute", "both", "none"] = field(
        "", help="position embedding: relative (per-block rel-pos, BEiT) | absolute | both | none; '' = what --init's "
                 "weights have, else relative")
    init: str = field("", help="weights to start from: our pretrained.safetensors / checkpoint dir, an official "
                               "BEiT .pth, timm weights; for --model <timm name> a timm weights file. Empty = scratch")
    init_key: str = field("", help="entry of a wrapping dict holding the weights (default: model/module/state_dict)")
    strict: bool = field(True, help="every encoder tensor of the model must come from --init and every --init tensor "
                                    "must fit; false: load what fits and report what was skipped or left random")
    trust_pickle: bool = field(False, help=TRUST_PICKLE_HELP)
    drop_path: float = field(0.1, help="stochastic depth rate")
    head_init_scale: float = field(0.001, help="the new head's weights are scaled by this")
    linear_probe: bool = field(False, help="freeze the encoder; train a linear head on pooled block features")
    probe_block: int = field(0, help="linear probe: features after this block (1-based; 0 = last)")
    # optimisation
    layer_decay: float = field(0.65, help="layer-wise lr decay: scale = layer_decay ** (L + 1 - layer_id)")
    label_smoothing: float = field(0.1, help="label smoothing")
    mixup: float = field(0.8, help="mixup alpha (0 = off)")
    cutmix: float = field(1.0, help="cutmix alpha (0 = off)")
    mixup_prob: float = field(1.0, help="probability of applying mixup or cutmix to a batch")
    mixup_switch_prob: float = field(0.5, help="probability of cutmix instead of mixup when both are on")
    # EMA
    model_ema: bool = field(False, help="keep an EMA of the weights (evaluated too)")
    model_ema_decay: float = field(0.9999, help="EMA decay per optimizer step")
    # run
    eval_every: int = field(1, help="evaluate every N epochs (and always at the end)")
    resume: bool = field(True, help="resume from the newest complete checkpoint in output_dir")
    # scaling out (see launch/accelerate/ and the README's "Scaling out")
    grad_checkpointing: bool = field(False, help="recompute block activations in backward (less memory, ~1/3 slower)")
    # distillation (--task distill, or `beit distill`)
    teacher: str = field("", help="distill: the teacher, a fine-tuned classifier export (<run>/model.safetensors)")
    unlabelled_shards: list[str] = field(default_factory=list, help="distill: unlabelled shards (e.g. the "
                                         "pretraining shards; labels ignored) that the teacher labels softly, a batch "
                                         "of them beside each labelled batch")
    unlabelled_batch_size: int = field(0, help="distill: unlabelled images per batch (0 = batch_size)")
    distill_temperature: float = field(4.0, help="distill: softmax temperature of the soft (teacher) loss")
    distill_alpha: float = field(0.5, help="distill: weight of the hard-label loss (labelled rows); 1 - alpha for "
                                           "the soft loss on every row")
    # semantic segmentation (--task segmentation; mixup/cutmix/RandAugment/label smoothing are classification only)
    reduce_zero_label: bool = field(True, help="segmentation: label 0 is 'other' (ignored), v -> v-1 (ADE20K)")
    seg_channels: int = field(512, help="segmentation: UperNet head channels")
    seg_aux_weight: float = field(0.4, help="segmentation: weight of the auxiliary FCN head's loss")
    seg_scale_min: float = field(0.5, help="segmentation: random rescale, short side = img_size x U(min, max)")
    seg_scale_max: float = field(2.0, help="segmentation: random rescale upper bound")
    seg_cat_max_ratio: float = field(0.75, help="segmentation: re-draw a crop where one class covers more than this")
    seg_stride: int = field(0, help="segmentation: sliding-window stride for evaluation (0 = 2/3 of img_size)")

    def validate(self) -> None:
        from beit.modeling.backbones import backbone_for
        from beit.tasks import get_task

        self.check_choices()
        check_finite_numbers(self)
        get_task(self.task).check(self)
        backbone_for(self.model).check_finetune(self)
        self.check_optim()
        self.check_run()
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


RESUME_KEYS = ("model", "model_kwargs", "model_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size",
               "image_size", "num_classes", "linear_probe", "probe_block", "init", "epochs", "teacher",
               "unlabelled_shards",
               "unlabelled_batch_size", "distill_temperature", "distill_alpha")

