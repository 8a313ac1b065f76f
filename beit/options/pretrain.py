"""Options of the pretraining stage (``beit pretrain --help``)."""
from __future__ import annotations

from dataclasses import dataclass

from beit.config import check_finite_numbers, check_lr, field
from beit.runtime.safe_pickle import TRUST_PICKLE_HELP
from beit.runtime.scaling import check_data_order

# Fields that define the model and its targets: a resumed run must not change them. (The tokenizer's
# weights are compared by fingerprint, so a tokenizer file may move but not change.)
RESUME_KEYS = ("image_size", "patch_size", "model_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
               "init_values", "tokenizer", "arch", "swin_patch_size", "swin_window_size", "swin_depths", "swin_heads",
               "swin_head")
REFERENCE_GRID, REFERENCE_MASKED = (14, 14), 75


@dataclass
class PretrainConfig:
    # data
    data_shards: list[str] = field(default_factory=list, help="training shards: brace patterns / paths (a YAML list, "
                                   "or one pattern on the command line), e.g. '/data/train-{000000..000127}.tar'")
    val_shards: list[str] = field(default_factory=list, help="held-out shards for the final masked-token evaluation "
                                  "(empty: no evaluation)")
    allow_remote_shards: bool = field(False, help="allow pipe:/http(s) shard specs (they run commands / fetch URLs)")
    batches_per_epoch: int = field(0, help="batches per rank per epoch (0: from the shards' manifest)")
    shuffle_buffer: int = field(1000, help="samples in the streaming shuffle buffer")
    num_workers: int = field(4, help="data loader worker processes per rank")
    max_bad_fraction: float = field(0.01, help="stop with an error when more than this fraction of samples fails to decode")
    data_order: str = field("shards", help="shards: disjoint shards per process (scalable default); global: every "
                            "process reads one seeded stream and keeps its slice, so any process count sees the "
                            "same global batches (exact 1-vs-N equivalence; N x the read I/O)")
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
    tokenizer: str = field("dalle", help="visual tokenizer kind: kmeans | dalle | vqkd | dvae")
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
    batch_size: int = field(64, help="images per process per micro-step")
    grad_accum_steps: int = field(1, help="micro-steps per optimizer step (ignored when global_batch_size is set)")
    global_batch_size: int = field(0, help="images per optimizer step over all processes; sets grad_accum_steps = "
                                   "global / (batch_size * processes) so the recipe holds for any process count")
    epochs: int = field(800, help="passes over the data (ignored when total_steps > 0)")
    total_steps: int = field(0, help="optimizer steps in total (0: epochs * steps per epoch)")
    lr: float = field(1.5e-3, help="peak learning rate (for the effective batch; not rescaled)")
    min_lr: float = field(1e-5, help="final learning rate of the cosine schedule")
    warmup_epochs: float = field(10.0, help="linear warmup length in epochs")
    warmup_steps: int = field(-1, help="linear warmup length in optimizer steps (>= 0 overrides warmup_epochs)")
    weight_decay: float = field(0.05, help="AdamW weight decay (none on biases, norms, tokens, position tables)")
    weight_decay_end: float | None = field(None, help="weight decay at the end of the cosine wd schedule (None: constant)")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], help="AdamW betas")
    eps: float = field(1e-8, help="AdamW epsilon")
    clip_grad: float = field(3.0, help="max global gradient norm (0: no clipping)")
    max_nonfinite_steps: int = field(5, help="abort after this many consecutive optimizer steps with a non-finite loss")
    mixed_precision: str = field("auto", help="auto | no | fp16 | bf16 (auto: the launcher's fp16/bf16 if set, else "
                                 "bf16 on GPUs that support it, fp16 on other GPUs, bf16 on CPUs with AMX or AVX-512-BF16, "
                                 "else no)")
    seed: int = field(0, help="seed for weights, data order, augmentation and masks")
    dist_timeout_s: int = field(1800, help="seconds a collective may wait for a hung process before the job fails")
    # run
    output_dir: str = field("runs/pretrain", help="run folder: config, checkpoints, metrics, final weights")
    checkpoint_every: int = field(1000, help="save a checkpoint every N optimizer steps (and at the end)")
    keep_last: int = field(3, help="complete checkpoints to keep (0: all)")
    log_every: int = field(20, help="log metrics every N optimizer steps")
    tensorboard: bool = field(True, help="also log to TensorBoard (output_dir/tensorboard)")
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
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")
        check_lr(self.lr)
        if self.min_lr < 0:
            raise ValueError("min_lr must be >= 0")
        if self.global_batch_size < 0:
            raise ValueError("global_batch_size must be >= 0")
        check_data_order(self.data_order)
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
        if not self.data_shards and not self.token_cache:
            raise ValueError("no training data: set data_shards (e.g. --data_shards '/data/train-{000000..000099}.tar')")

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size // self.patch_size,) * 2

    def masked_count(self) -> int:
        if self.num_masking_patches > 0:
            return self.num_masking_patches
        if self.grid == REFERENCE_GRID:
            return REFERENCE_MASKED
        return max(1, round(self.mask_ratio * self.grid[0] * self.grid[1]))
