"""Option sections every training stage shares, defined once: data, optimisation, precision, run.

A stage's config inherits the sections (``class PretrainConfig(RunOptions, PrecisionOptions,
OptimOptions, DataOptions)``: dataclasses collect fields from the last base first, so data comes first),
so the same option has the same name, unit and help everywhere. A stage with another default
re-declares the field with ``field(<default>)`` and no help: ``--help`` shows the section's text.
"""
from __future__ import annotations

from dataclasses import dataclass

from beit.config import field


@dataclass
class DataOptions:
    data: str = field("", help="a folder of images (flat, recursive; one sub-folder per class for fine-tuning): "
                               "written once into shards under --data_cache and reused while it is unchanged")
    val_fraction: float = field(0.0, help="with --data: hold out this fraction of the images (seeded, stratified "
                                          "by class) for the final evaluation; 0: none")
    data_cache: str = field("", help="folder for the shards written from --data (default: $BEIT_CACHE or "
                                     "~/.cache/beit/shards)")
    num_workers: int = field(2, help="data loader worker processes per process (fewer when the shards do not allow "
                                     "that many: the log says so)")
    resampled: bool = field(False, help="draw shards with replacement (per process and worker, seeded) instead of "
                                        "one pass over disjoint shards; for fewer shards than processes, or "
                                        "endless streams")
    batches_per_epoch: int = field(0, help="micro-batches per process per epoch (0: every image once, from the "
                                           "shards' manifest)")
    max_bad_fraction: float = field(0.01, help="stop with an error when more than this fraction of samples fails "
                                               "to decode")
    data_order: str = field("shards", help="shards: disjoint shards per process (scalable default); global: every "
                                           "process reads one seeded stream and keeps its slice, so any process "
                                           "count sees the same global batches (exact 1-vs-N equivalence; N x the "
                                           "read I/O)")

    def check_data(self, shards_given: bool, shards_flag: str) -> None:
        if self.data and shards_given:
            raise ValueError(f"--data and --{shards_flag} both name the training data: give one")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.resampled and self.data_order == "global":
            raise ValueError("--resampled draws shards at random per process; --data_order global reads one fixed "
                             "order: choose one")
        from beit.runtime.scaling import check_data_order
        check_data_order(self.data_order)


@dataclass
class OptimOptions:
    batch_size: int = field(64, help="images per process per micro-step")
    grad_accum_steps: int = field(1, help="micro-steps per optimizer step (ignored when global_batch_size is set)")
    global_batch_size: int = field(0, help="images per optimizer step over all processes; sets grad_accum_steps = "
                                           "global / (batch_size x processes) so the recipe holds for any process "
                                           "count")
    epochs: int = field(100, help="passes over the data (every image once per epoch)")
    lr: float = field(1e-3, help="peak learning rate (for the effective batch; not rescaled)")
    min_lr: float = field(1e-6, help="final learning rate of the cosine schedule")
    warmup_epochs: float = field(5.0, help="linear warmup length in epochs (a warmup not shorter than the run is "
                                           "capped to a tenth of it, with a warning)")
    warmup_steps: int = field(-1, help="linear warmup length in optimizer steps (>= 0 overrides warmup_epochs)")
    weight_decay: float = field(0.05, help="AdamW weight decay (none on biases, norms, tokens, position tables)")
    clip_grad: float = field(0.0, help="max global gradient norm (0: no clipping)")


@dataclass
class PrecisionOptions:
    mixed_precision: str = field("auto", help="auto | no | fp16 | bf16 (auto: the launcher's fp16/bf16 if set, else "
                                              "bf16 on GPUs that support it, fp16 on other GPUs, bf16 on CPUs with AMX or "
                                              "AVX-512-BF16, else no)")

    def check_precision(self) -> None:
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")


@dataclass
class RunOptions:
    output_dir: str = field("runs/run", help="run folder: config, checkpoints, metrics, final weights; a rerun "
                                            "resumes from its newest complete checkpoint")
    seed: int = field(0, help="seed for weights, data order, augmentation")
    checkpoint_every: int = field(1000, help="save a checkpoint every N optimizer steps (and at the end); a killed "
                                             "run resumes exactly from the newest complete one, mid-epoch included")
    keep_last: int = field(2, help="complete checkpoints to keep (0: all)")
    log_every: int = field(20, help="log metrics every N optimizer steps")
    tensorboard: bool = field(True, help="also log to TensorBoard (output_dir/tensorboard)")
    dist_timeout_s: int = field(1800, help="seconds a collective may wait for a hung process before the job fails")
