"""Options of the fine-tune stage (``beit finetune --help``)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from beit.config import check_finite_numbers, check_lr, field
from beit.checkpoints.safe_pickle import TRUST_PICKLE_HELP
from beit.options.common import DataOptions, OptimOptions, PrecisionOptions, RunOptions

POSITIONS = ("relative", "absolute", "both", "none")


@dataclasses.dataclass
class FinetuneConfig(RunOptions, PrecisionOptions, OptimOptions, DataOptions):
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

    task: str = field("classification", help="classification | segmentation (image + seg.png shards, UperNet head, "
                                             "mIoU; --image_size is the crop; --model beit or a timm Swin) | distill (--model = a timm student, "
                                             "e.g. mobilevit_xxs, taught by --teacher)")
    # data
    train_shards: str = field("", help="training shards: path, brace pattern or comma list of WebDataset tars")
    val_shards: str = field("", help="held-out shards (never trained on) for top-1/top-5 and the confusion matrix "
                                     "(empty: no held-out evaluation; the final summary has the training loss)")
    num_classes: int = field(0, help="number of classes; 0 = from the label_map in the shards' manifest.json")
    val_data: str = field("", help="held-out class folders (the same class names as --data), instead of "
                                   "--val_fraction")
    image_size: int = field(224, help="input resolution (rel-pos tables/patch embed are resized to it on load; "
                                      "--img_size is its old name)")
    in_chans: int = field(3, help="input channels (images are decoded as RGB)")
    mean: tuple[float, float, float] = field((0.485, 0.456, 0.406), help="normalisation mean (as in pretraining)")
    std: tuple[float, float, float] = field((0.229, 0.224, 0.225), help="normalisation std (as in pretraining)")
    # model
    model: str = field("beit", help="'beit' or any timm model name (swin_tiny_patch4_window7_224, mobilevit_s, "
                                     "deit_small_patch16_224, ...) for a baseline")
    model_kwargs: dict = field(default_factory=dict, help="--model <timm name>: more timm.create_model arguments, e.g. "
                               "a small Swin {embed_dim: 32, depths: [2, 2, 2, 2], num_heads: [1, 2, 4, 8], window_size: 4, "
                               "patch_size: 2}; with --init of our Swin pretraining they come from its pretrained.json")
    model_size: str = field("base", help="BEiT size: tiny | small | base | large (see beit.modeling.mim.BEIT_SIZES)")
    embed_dim: int = field(0, help="override the size's embedding dim (0 = from --init's weights, else model_size)")
    depth: int = field(0, help="override the size's depth (0 = from --init's weights, else model_size)")
    num_heads: int = field(0, help="override the size's heads (0 = from --init's rel-pos tables or the config / "
                                   "args saved beside them, else model_size)")
    mlp_ratio: float = field(0.0, help="MLP width / embed_dim (0 = from --init's weights, else 4)")
    patch_size: int = field(16, help="patch size in px (--init's patch embedding is resampled to it)")
    init_values: float = field(0.1, help="layer-scale init (0.1 base, 1e-5 large, 0 = no layer scale; with --init: "
                                         "layer scale iff the weights have it, values loaded)")
    position: str = field("", help="position embedding: relative (per-block rel-pos, BEiT) | absolute | both | none; "
                                   "'' = what --init's weights have, else relative")
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
    # augmentation
    auto_augment: str = field("rand-m9-mstd0.5-inc1", help="timm RandAugment spec ('' = off)")
    reprob: float = field(0.25, help="random erasing probability")
    color_jitter: float = field(0.4, help="colour jitter (timm ignores it when RandAugment is on)")
    crop_scale_min: float = field(0.08, help="RandomResizedCrop minimum area fraction")
    hflip: float = field(0.5, help="horizontal flip probability (use 0 for digits/text)")
    crop_pct: float = field(0.875, help="eval: resize to img_size/crop_pct then centre crop")
    interpolation: str = field("bicubic", help="resize interpolation")
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
    unlabelled_shards: str = field("", help="distill: unlabelled shards (e.g. the pretraining shards; labels ignored) "
                                            "that the teacher labels softly, a batch of them beside each labelled batch")
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
        check_finite_numbers(self)
        check_lr(self.lr)
        if self.task not in ("classification", "segmentation", "distill"):
            raise ValueError(f"--task must be classification, segmentation or distill, got {self.task!r}")
        if self.task == "distill":
            if self.model == "beit" or self.linear_probe:
                raise ValueError("--task distill trains a timm student: pass --model mobilevit_xxs (or _xs, _s, any timm name)")
            if not self.teacher:
                raise ValueError("--task distill needs --teacher <fine-tuned run>/model.safetensors")
            if not Path(self.teacher).exists():
                raise ValueError(f"--teacher {self.teacher} does not exist")
            if (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0:
                raise ValueError("--task distill uses the teacher's soft labels, not mixup/cutmix: pass --mixup 0 --cutmix 0")
            if self.distill_temperature <= 0 or not 0 <= self.distill_alpha <= 1:
                raise ValueError("need --distill_temperature > 0 and 0 <= --distill_alpha <= 1")
        if self.task == "segmentation":
            if self.linear_probe:
                raise ValueError("--task segmentation fine-tunes the whole encoder: leave --linear_probe out")
            if self.model != "beit":
                from beit.modeling.swin_mim import is_swin
                if not is_swin(self.model):
                    raise ValueError(f"--task segmentation fine-tunes a BEiT encoder (--model beit) or a timm Swin "
                                     f"(--model swin_tiny_patch4_window7_224, ...), got --model {self.model}")
            if self.num_classes < 1:
                raise ValueError("--task segmentation needs --num_classes (ADE20K: 150 with --reduce_zero_label true)")
            if self.batch_size < 2:
                raise ValueError("--task segmentation needs --batch_size >= 2 (the heads use BatchNorm)")
            if not 0 < self.seg_scale_min <= self.seg_scale_max:
                raise ValueError(f"need 0 < --seg_scale_min <= --seg_scale_max, got {self.seg_scale_min}, {self.seg_scale_max}")
            if self.model_ema:
                raise ValueError("--model_ema is for classification (its BatchNorm statistics are not averaged)")
        if not self.train_shards and not self.data:
            raise ValueError("no training data: pass --data <folder with one sub-folder per class> or --train_shards "
                             "(labelled shards from `beit shards write --layout imagenet`)")
        self.check_data(bool(self.train_shards), "train_shards")
        if self.val_data and not self.data:
            raise ValueError("--val_data goes with --data (class folders); with shards pass --val_shards")
        if self.val_data and self.val_shards:
            raise ValueError("--val_data and --val_shards both name the held-out data: give one")
        if self.batch_size < 1 or self.grad_accum_steps < 1 or self.epochs < 1 or self.checkpoint_every < 1:
            raise ValueError("batch_size, grad_accum_steps, epochs and checkpoint_every must be >= 1")
        if self.task == "classification" and (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0 \
                and self.batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even --batch_size, got {self.batch_size}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"--layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.model_kwargs and self.model == "beit":
            raise ValueError("--model_kwargs are for --model <timm name>; a BEiT encoder takes --embed_dim/--depth/...")
        if self.linear_probe and self.model != "beit":
            raise ValueError("--linear_probe is for BEiT encoders (--model beit)")
        if self.probe_block < 0:
            raise ValueError(f"--probe_block must be >= 0 (0 = last block), got {self.probe_block}")
        self.check_precision()
        if self.position and self.position not in POSITIONS:
            raise ValueError(f"--position must be one of {', '.join(POSITIONS)} (or empty), got {self.position!r}")
        if self.init and not Path(self.init).exists():
            raise ValueError(f"--init {self.init} does not exist")

    def beit_dims(self, init_dims: dict | None = None) -> dict:
        """embed_dim / depth / num_heads / mlp_ratio: explicit flags > the --init checkpoint's (``init_dims``)
        > model_size."""
        keys = ("embed_dim", "depth", "num_heads", "mlp_ratio")
        dims: dict = {"mlp_ratio": 4.0}
        if init_dims:
            dims.update({k: init_dims[k] for k in keys if k in init_dims})
        if not all(k in dims for k in keys) and not (self.embed_dim and self.depth and self.num_heads):
            from beit.modeling.mim import BEIT_SIZES
            if self.model_size not in BEIT_SIZES:
                raise ValueError(f"--model_size must be one of {sorted(BEIT_SIZES)}, got {self.model_size!r}")
            dims.update({k: v for k, v in BEIT_SIZES[self.model_size].items() if k in keys and k not in dims})
        dims.update({k: getattr(self, k) for k in keys if getattr(self, k)})
        return dims


RESUME_KEYS = ("model", "model_kwargs", "model_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size",
               "image_size", "num_classes", "linear_probe", "probe_block", "init", "epochs", "teacher", "unlabelled_shards",
               "unlabelled_batch_size", "distill_temperature", "distill_alpha")

