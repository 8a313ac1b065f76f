"""Options of the pretraining stage (``beit pretrain --help``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from beit.config import check_finite_numbers, field
from beit.data.pipelines.transforms import AugmentOptions
from beit.options.common import (
    DataOptions,
    DataRecipeOptions,
    ModelOptions,
    OptimOptions,
    PrecisionOptions,
    RunOptions,
    ThreadOptions,
    TokenizerOptions,
)

# Fields that define the model and its targets: a resumed run must not change them. (The tokenizer's
# weights are compared by fingerprint, so a tokenizer file may move but not change.)
RESUME_KEYS = ("image_size", "patch_size", "model_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
               "init_values", "tokenizer", "arch", "swin_patch_size", "swin_window_size", "swin_depths", "swin_heads",
               "swin_head", "cls_pretraining", "early_layers", "head_layers", "shared_lm_head")
REFERENCE_GRID, REFERENCE_MASKED = (14, 14), 75


@dataclass
class PretrainConfig(RunOptions, ThreadOptions, PrecisionOptions, OptimOptions, TokenizerOptions, ModelOptions,
                     AugmentOptions, DataOptions, DataRecipeOptions):
    """Shared sections (beit.options.common) first, then pretraining's own options."""
    RECIPE_PREFIX = "pretrain_"
    RECIPE_STAGE = "pretrain"
    # the shared options with pretraining's defaults (BEiT-B on ImageNet-1k)
    epochs: int = field(800)
    lr: float = field(1.5e-3)
    min_lr: float = field(1e-5)
    warmup_epochs: float = field(10.0)
    clip_grad: float = field(3.0)
    output_dir: str = field("runs/pretrain")
    keep_last: int = field(3)

    # data
    shuffle_buffer: int = field(1000, help="samples in the streaming shuffle buffer")
    token_cache: Optional[str] = field(None, help="pre-tokenised training data: a folder written by `beit tokenizer "
                                       "cache` (its cache-*.tar replace train_shards, its stored crops and flips "
                                       "replace crop_scale_min/hflip; no tokenizer call in training; the tokenizer is "
                                       "then loaded only for val_shards)")
    image_size: int = field(224, help="encoder input side in px")
    # model
    arch: str = field("beit", help="encoder (beit.modeling.backbones): beit (the BEiT ViT), a timm Swin name, e.g. "
                      "swin_tiny_patch4_window7_224 (patch_size is then the token cell in px, Swin's own patch is "
                      "swin_patch_size), or a timm ViT name, e.g. vit_small_patch16_224")
    init_values: float = field(0.0, help="layer-scale init (0: from model_size: 0.1, large 1e-5)")
    compile: bool = field(False, help="torch.compile the transformer blocks (in place: same weights and checkpoints; "
                          "costs compile time at start-up, see `beit bench`)")
    swin_patch_size: int = field(0, help="--arch swin_*: Swin's patch side in px (0: the arch's, 4)")
    swin_window_size: int = field(0, help="--arch swin_*: attention window side (0: the arch's)")
    swin_depths: list[int] = field(default_factory=list, help="--arch swin_*: blocks per stage (empty: the arch's)")
    swin_heads: list[int] = field(default_factory=list, help="--arch swin_*: heads per stage (empty: the arch's)")
    swin_head: Literal["last", "stage"] = field("last", help="--arch swin_*: what the masked-token head reads: last "
                                                "(last stage, upsampled to the token grid; every stage trained) | "
                                                "stage "
                                                "(the stage at the token stride; later stages stay untrained)")
    init: str = field("", help="continue pretraining from these weights (step 0, a new optimizer and schedule): our "
                      "pretrained.safetensors or a unilm BEiT / BEiT v2 pretraining .pth, mask token, LM head and "
                      "the CLS-pretraining branch included; its sizes, vocabulary and branch must be those the "
                      "options build (--arch beit). Not used when output_dir holds a checkpoint to resume")
    # BEiT v2's CLS pretraining ("patch aggregation"; unilm beit2's *_cls_pt models and their option names)
    cls_pretraining: bool = field(False, help="BEiT v2's CLS-pretraining branch (--arch beit): the last block's CLS "
                                  "token joined with the patch tokens after block early_layers goes through "
                                  "head_layers more blocks and predicts the same masked tokens; its loss is added")
    early_layers: int = field(0, help="with cls_pretraining: the block whose patch tokens the CLS branch reads (0: "
                              "depth - 3, the reference's 9 for base and 21 for large)")
    head_layers: int = field(2, help="with cls_pretraining: transformer blocks of the CLS branch's head")
    shared_lm_head: bool = field(True, help="with cls_pretraining: the CLS branch predicts through the encoder's "
                                 "final norm and lm_head (false: its own cls_pt_norm and cls_pt_lm_head)")
    # masking
    num_masking_patches: int = field(0, help="masked patches per image (0: 75 on a 14x14 grid as BEiT, otherwise "
                                     "round(mask_ratio * patches))")
    mask_ratio: float = field(0.4, help="masked fraction used when num_masking_patches is 0 and the grid is not 14x14")
    min_mask_patches: int = field(16, help="smallest masking block in patches (BEiT: 16)")
    max_mask_patches: int = field(0, help="largest masking block in patches (0: no limit)")
    min_mask_aspect: float = field(0.3, help="masking block aspect range [a, 1/a]")
    # optimisation
    total_steps: int = field(0, help="optimizer steps in total (0: epochs * steps per epoch)")
    weight_decay_end: Optional[float] = field(None, help="weight decay at the end of the wd schedule (None: constant)")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], help="AdamW betas")
    eps: float = field(1e-8, help="AdamW epsilon")
    max_nonfinite_steps: int = field(5, help="abort after this many consecutive optimizer steps with a non-finite loss")
    # run
    log_images_every: int = field(100, help="TensorBoard pictures (masks, predicted tokens, reconstructions) of the "
                                  "step's batch every N optimizer steps (0: off; needs tensorboard)")
    eval_batches: int = field(0, help="held-out batches per rank for the final evaluation (0: all)")
    eval_batch_size: int = field(0, help="held-out batch size (0: batch_size)")
    # health metric: online kNN accuracy of the encoder's features on labelled images
    knn_train_shards: list[str] = field(default_factory=list, help="labelled shards for the kNN health metric's "
                                        "memory bank (with knn_val_shards: kNN top-1 logged every knn_every steps)")
    knn_val_shards: list[str] = field(default_factory=list, help="labelled held-out shards the kNN health metric "
                                      "scores (monitoring only: nothing is chosen on it)")
    knn_every: int = field(0, help="kNN health metric every N optimizer steps (0: about 10 times a run, and "
                           "before the first step)")
    knn_k: int = field(20, help="neighbours of the kNN health metric")

    def validate(self) -> None:
        """Checks that need no files; raises ValueError naming the option."""
        from beit.modeling.backbones import backbone_for

        self.check_choices()
        check_finite_numbers(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.log_images_every < 0:
            raise ValueError(f"log_images_every must be >= 0 (0: off), got {self.log_images_every}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.total_steps < 0 or self.epochs < 0 or (self.total_steps == 0 and self.epochs == 0):
            raise ValueError("set epochs >= 1 or total_steps >= 1")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        self.check_augment()
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        self.check_optim()
        self.check_run()
        self.check_threads()
        self.check_data("--token_cache" if self.token_cache else "")
        if bool(self.knn_train_shards) != bool(self.knn_val_shards):
            raise ValueError("the kNN health metric needs both knn_train_shards and knn_val_shards (labelled); "
                             "set both or neither")
        if self.knn_every < 0 or self.knn_k < 1:
            raise ValueError(f"knn_every must be >= 0 and knn_k >= 1, got {self.knn_every}, {self.knn_k}")
        backbone = backbone_for(self.arch, pretraining=True)
        if self.compile and not backbone.compiles:
            raise ValueError(f"--compile compiles the blocks of the beit and timm ViT backbones; leave it out with "
                             f"--arch {self.arch}")
        if self.cls_pretraining and not backbone.cls_pretraining:
            raise ValueError(f"--cls_pretraining is BEiT v2's branch of the BEiT ViT (--arch beit); --arch {self.arch} "
                             "has none: leave it false")
        if self.knn_train_shards and not backbone.patch_tokens:
            raise ValueError(f"the kNN health metric reads a ViT's patch tokens: leave knn_train_shards/knn_val_shards "
                             f"empty with --arch {self.arch}")

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size // self.patch_size,) * 2

    def masked_count(self) -> int:
        if self.num_masking_patches > 0:
            return self.num_masking_patches
        if self.grid == REFERENCE_GRID:
            return REFERENCE_MASKED
        return max(1, round(self.mask_ratio * self.grid[0] * self.grid[1]))
