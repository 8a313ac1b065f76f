"""Options of the pretraining stage (``beit pretrain --help``)."""
from __future__ import annotations

from dataclasses import dataclass

from beit.config import check_finite_numbers, check_lr, field
from beit.checkpoints.safe_pickle import TRUST_PICKLE_HELP
from beit.options.common import DataOptions, OptimOptions, PrecisionOptions, RunOptions

# Fields that define the model and its targets: a resumed run must not change them. (The tokenizer's
# weights are compared by fingerprint, so a tokenizer file may move but not change.)
RESUME_KEYS = ("image_size", "patch_size", "model_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
               "init_values", "tokenizer", "arch", "swin_patch_size", "swin_window_size", "swin_depths", "swin_heads",
               "swin_head")
REFERENCE_GRID, REFERENCE_MASKED = (14, 14), 75


@dataclass
class PretrainConfig(RunOptions, PrecisionOptions, OptimOptions, DataOptions):
    """Shared sections (beit.options.common) first, then pretraining's own options."""
    RECIPE_PREFIX = "pretrain_"
    # the shared options with pretraining's defaults (BEiT-B on ImageNet-1k)
    num_workers: int = field(4)
    epochs: int = field(800)
    lr: float = field(1.5e-3)
    min_lr: float = field(1e-5)
    warmup_epochs: float = field(10.0)
    clip_grad: float = field(3.0)
    output_dir: str = field("runs/pretrain")
    keep_last: int = field(3)

    # data
    data_shards: list[str] = field(default_factory=list, help="training shards: brace patterns / paths (a YAML list, "
                                   "or one pattern on the command line), e.g. '/data/train-{000000..000127}.tar'")
    val_shards: list[str] = field(default_factory=list, help="held-out shards for the final masked-token evaluation "
                                  "(empty: no evaluation)")
    allow_remote_shards: bool = field(False, help="allow pipe:/http(s) shard specs (they run commands / fetch URLs)")
    shuffle_buffer: int = field(1000, help="samples in the streaming shuffle buffer")
    # augmentation
    image_size: int = field(224, help="encoder input side in px")
    crop_scale_min: float = field(0.08, help="random-resized-crop minimum area fraction (max is 1)")
    color_jitter: float = field(0.4, help="brightness/contrast/saturation jitter (0: off)")
    hflip: float = field(0.5, help="horizontal flip probability")
    # model
    arch: str = field("beit", help="encoder: beit (the BEiT ViT) or a timm Swin name, e.g. swin_tiny_patch4_window7_224 "
                      "(then patch_size is the token cell in px, Swin's own patch is swin_patch_size)")
    model_size: str = field("base", help="tiny | small | base | large; embed_dim/depth/num_heads override it")
    patch_size: int = field(16, help="patch side in px; the patch grid must equal the tokenizer's token grid")
    embed_dim: int = field(0, help="custom width (0: from model_size)")
    depth: int = field(0, help="custom number of blocks (0: from model_size)")
    num_heads: int = field(0, help="custom attention heads (0: from model_size)")
    mlp_ratio: float = field(4.0, help="MLP hidden width / embed_dim")
    init_values: float = field(0.0, help="layer-scale init (0: from model_size: 0.1, large 1e-5)")
    drop_path: float = field(0.1, help="stochastic depth rate")
    grad_checkpointing: bool = field(False, help="recompute block activations in backward (less memory, ~1/3 slower)")
    compile: bool = field(False, help="torch.compile the transformer blocks (in place: same weights and checkpoints; "
                          "costs compile time at start-up, see `beit bench`)")
    swin_patch_size: int = field(0, help="--arch swin_*: Swin's patch side in px (0: the arch's, 4)")
    swin_window_size: int = field(0, help="--arch swin_*: attention window side (0: the arch's)")
    swin_depths: list[int] = field(default_factory=list, help="--arch swin_*: blocks per stage (empty: the arch's)")
    swin_heads: list[int] = field(default_factory=list, help="--arch swin_*: heads per stage (empty: the arch's)")
    swin_head: str = field("last", help="--arch swin_*: what the masked-token head reads: last (last stage, upsampled "
                           "to the token grid; every stage trained) | stage (the stage at the token stride; later "
                           "stages stay untrained)")
    # tokenizer
    tokenizer: str = field("auto", help="visual tokenizer kind: auto | kmeans | dalle | vqkd | dvae (auto: the kind "
                                        "saved beside --tokenizer_path, else dalle)")
    tokenizer_path: str | None = field(None, help="saved tokenizer (<name>.safetensors + <name>.json)")
    trust_pickle: bool = field(False, help=TRUST_PICKLE_HELP)
    token_cache: str | None = field(None, help="pre-tokenised training data: a folder written by `python -m "
                                    "beit.tokenizers.cache` (its cache-*.tar replace data_shards, its stored crops and "
                                    "flips replace crop_scale_min/hflip; no tokenizer call in training; the tokenizer "
                                    "is then loaded only for val_shards)")
    # masking
    num_masking_patches: int = field(0, help="masked patches per image (0: 75 on a 14x14 grid as BEiT, otherwise "
                                     "round(mask_ratio * patches))")
    mask_ratio: float = field(0.4, help="masked fraction used when num_masking_patches is 0 and the grid is not 14x14")
    min_mask_patches: int = field(16, help="smallest masking block in patches (BEiT: 16)")
    max_mask_patches: int = field(0, help="largest masking block in patches (0: no limit)")
    min_mask_aspect: float = field(0.3, help="masking block aspect range [a, 1/a]")
    # optimisation
    total_steps: int = field(0, help="optimizer steps in total (0: epochs * steps per epoch)")
    weight_decay_end: float | None = field(None, help="weight decay at the end of the cosine wd schedule (None: constant)")
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
        check_finite_numbers(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.log_images_every < 0:
            raise ValueError(f"log_images_every must be >= 0 (0: off), got {self.log_images_every}")
        for name in ("batch_size", "grad_accum_steps", "checkpoint_every", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.total_steps < 0 or self.epochs < 0 or (self.total_steps == 0 and self.epochs == 0):
            raise ValueError("set epochs >= 1 or total_steps >= 1")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        self.check_precision()
        check_lr(self.lr)
        if self.min_lr < 0:
            raise ValueError("min_lr must be >= 0")
        if self.global_batch_size < 0:
            raise ValueError("global_batch_size must be >= 0")
        self.check_data(bool(self.data_shards) or bool(self.token_cache), "data_shards")
        if self.val_fraction and not self.data:
            raise ValueError("--val_fraction splits a --data folder; with shards pass --val_shards")
        if self.dist_timeout_s < 1:
            raise ValueError(f"dist_timeout_s must be >= 1, got {self.dist_timeout_s}")
        if bool(self.knn_train_shards) != bool(self.knn_val_shards):
            raise ValueError("the kNN health metric needs both knn_train_shards and knn_val_shards (labelled); "
                             "set both or neither")
        if self.knn_every < 0 or self.knn_k < 1:
            raise ValueError(f"knn_every must be >= 0 and knn_k >= 1, got {self.knn_every}, {self.knn_k}")
        if self.arch != "beit" and self.knn_train_shards:
            raise ValueError("the kNN health metric reads the ViT's patch tokens: leave knn_train_shards/knn_val_shards "
                             "empty with --arch swin_*")
        if self.arch != "beit" and self.swin_head not in ("last", "stage"):
            raise ValueError(f"swin_head must be last or stage, got {self.swin_head!r}")
        if not self.data_shards and not self.token_cache and not self.data:
            raise ValueError("no training data: pass --data <folder of images> or --data_shards "
                             "'/data/train-{000000..000099}.tar'")

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size // self.patch_size,) * 2

    def masked_count(self) -> int:
        if self.num_masking_patches > 0:
            return self.num_masking_patches
        if self.grid == REFERENCE_GRID:
            return REFERENCE_MASKED
        return max(1, round(self.mask_ratio * self.grid[0] * self.grid[1]))
