"""Option sections, each defined once: every command's config is built from the ones it uses.

A config inherits its sections (``class PretrainConfig(RunOptions, ..., DataOptions)``: dataclasses collect
fields from the last base first), so an option has the same name, unit and help in every command. A command
with another default re-declares the field with ``field(<default>)`` and no help: ``--help`` shows the
section's text. Old names a section replaced are in its ``DEPRECATED`` map (they still work, with a warning).

* ``TrainDataOptions``: the training images (shards or a folder) and, from ``ShardSourceOptions``, where shards
  may come from (http(s), ``pipe:``), their manifest and the reconnects; ``HeldOutOptions``: held-out shards;
  ``WorkerOptions``: loader workers; ``LoaderOptions``: those and the bad-sample budget; ``DataOptions``: the
  training stream of pretraining and fine-tuning (all of the above, plus epoch length, data order, the memory cache,
  the folder's held-out part);
* ``ModelOptions``: the encoder's size; ``TokenizerOptions``: which frozen tokenizer, from where;
* ``TrackerOptions``: where the results go (--report_to, --run_name); ``RunOptions``: the run folder, seed,
  checkpoints, logging, and the trackers (every run command has them);
* ``PrecisionOptions``: mixed precision; ``DeviceOptions``: the device of a command without a launcher;
  ``OptimOptions``: batch, epochs, lr schedule, AdamW.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Literal, Optional

from beit.checkpoints.safe_pickle import TRUST_PICKLE_HELP
from beit.config import Options, field
from beit.tokenizers import TOKENIZER_KINDS

TokenizerKind = Literal[("auto", *TOKENIZER_KINDS)]  # a new registered tokenizer is a choice at once


@dataclass
class ShardSourceOptions(Options):
    """Where shards may come from; every command that reads training shards has these (pretraining, fine-tuning,
    tokenizer training, the token cache)."""
    allow_remote_shards: bool = field(False, help="allow http(s):// and pipe: shard specs (they fetch URLs / run "
                                                  "commands); gs:// and s3:// go through pipe: or https")
    manifest: str = field("", help="the training shards' manifest.json (a path or http(s) URL) for their sample "
                                   "counts (and label map); default: the manifest.json beside the shards, fetched "
                                   "for http(s) shards")
    remote_retries: int = field(5, help="reconnects in a row without a new byte before an http(s) shard whose "
                                        "connection dropped counts as lost (its remaining samples are counted as "
                                        "connection_lost); a reconnect resumes the shard with an HTTP Range request")

    def shard_source(self) -> dict:
        """Keyword arguments of the data layer's training loaders (``build_stream_loader`` and its wrappers)."""
        return {"allow_remote": self.allow_remote_shards, "manifest": self.manifest or None,
                "remote_retries": self.remote_retries}

    def check_sources(self) -> None:
        if self.remote_retries < 0:
            raise ValueError(f"--remote_retries must be >= 0, got {self.remote_retries}")
        if self.manifest and not self.allow_remote_shards and "://" in self.manifest:
            raise ValueError(f"--manifest {self.manifest} is a URL: pass --allow_remote_shards true as well")


@dataclass
class TrainDataOptions(ShardSourceOptions):
    DEPRECATED = {"data_shards": "train_shards", "shards": "train_shards"}  # pretraining's / the tools' old names
    train_shards: list[str] = field(default_factory=list, help="training shards: paths, brace patterns, globs or "
                                    "folders of WebDataset tars (a YAML list, or patterns on the command line), e.g. "
                                    "'/data/train-{000000..000127}.tar'")
    data: str = field("", help="a folder of images instead of --train_shards (flat, recursive; one sub-folder per "
                               "class for fine-tuning): written once into shards under --data_cache and reused while "
                               "it is unchanged")
    data_cache: str = field("", help="folder for the shards written from --data (default: $BEIT_CACHE or "
                                     "~/.cache/beit/shards)")

    def check_train_data(self, other_source: str = "") -> None:
        """Exactly one source of training images: --data, --train_shards (or ``other_source``, e.g. a token cache)."""
        given = [name for name, on in (("--data", self.data), ("--train_shards", self.train_shards),
                                       (other_source, bool(other_source))) if on]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} both name the training data: give one")
        if not given:
            raise ValueError("no training data: pass --data <folder of images> or --train_shards "
                             "'/data/train-{000000..000099}.tar'")
        self.check_sources()
        if self.manifest and not self.train_shards:
            raise ValueError(f"--manifest describes --train_shards; {given[0]} brings its own shards and manifest: "
                             "leave --manifest out")

    def folder_shards(self, *, labelled: bool, val_fraction: float = 0.0, seed: int = 0, log=print):
        """``--data``'s folder as shards (written once into --data_cache; see beit.data.storage.folder_cache),
        or None without --data."""
        if not self.data:
            return None
        from beit.data.storage.folder_cache import folder_shards

        return folder_shards(self.data, labelled=labelled, val_fraction=val_fraction, seed=seed, cache=self.data_cache,
                             log=log)


@dataclass
class HeldOutOptions(Options):
    val_shards: list[str] = field(default_factory=list, help="held-out shards, never trained on: scored at the end "
                                  "(empty: no held-out score)")


@dataclass
class WorkerOptions(Options):
    num_workers: int = field(2, help="data loader worker processes per process (fewer when the shards do not allow "
                                     "that many: the log says so)")


@dataclass
class LoaderOptions(WorkerOptions):
    max_bad_fraction: float = field(0.01, help="stop with an error when more than this fraction of samples fails "
                                               "to decode")


@dataclass
class DataOptions(LoaderOptions, HeldOutOptions, TrainDataOptions):
    val_fraction: float = field(0.0, help="with --data: hold out this fraction of the images (seeded, stratified "
                                          "by class) for the final evaluation; 0: none")
    resampled: bool = field(False, help="draw shards with replacement (per process and worker, seeded) instead of "
                                        "one pass over disjoint shards; for fewer shards than processes, or "
                                        "endless streams")
    batches_per_epoch: int = field(0, help="micro-batches per process per epoch (0: every image once, from the "
                                           "shards' manifest)")
    memory_cache_mb: float = field(2048, help="decode the training set once into a uint8 tensor per process and "
                                              "augment whole batches on the device, when the decoded set fits in "
                                              "this many MiB (kept for the next run in the same process, e.g. the "
                                              "stages of beit compare); 0: always the per-image stream. The start-up "
                                              "summary's 'data path' line says which runs and why")
    data_order: Literal["shards", "global"] = field("shards", help="shards: disjoint shards per process (scalable "
                                                    "default); global: every process reads one seeded stream and keeps "
                                                    "its slice, so any process count sees the same global batches "
                                                    "(exact 1-vs-N equivalence; N x the read I/O)")

    def check_data(self, other_source: str = "") -> None:
        self.check_train_data(other_source)
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.memory_cache_mb < 0:
            raise ValueError(f"--memory_cache_mb must be >= 0 (0: off), got {self.memory_cache_mb}")
        if self.resampled and self.data_order == "global":
            raise ValueError("--resampled draws shards at random per process; --data_order global reads one fixed "
                             "order: choose one")


@dataclass
class ModelOptions(Options):
    model_size: Literal["tiny", "small", "base", "large"] = field(
        "base", help="BEiT size preset (beit.modeling.mim.BEIT_SIZES); embed_dim/depth/num_heads override it")
    patch_size: int = field(16, help="patch side in px (pretraining: the patch grid must equal the tokenizer's token "
                                     "grid; fine-tuning: --init's patch embedding is resampled to it)")
    embed_dim: int = field(0, help="custom width (0: from --init's weights when fine-tuning, else from model_size "
                                   "or the timm arch's)")
    depth: int = field(0, help="custom number of blocks (0: as embed_dim)")
    num_heads: int = field(0, help="custom attention heads (0: as embed_dim; --init's head count comes from its "
                                   "rel-pos tables or the config / args saved beside them)")
    mlp_ratio: float = field(4.0, help="MLP hidden width / embed_dim (0: from --init's weights when fine-tuning, "
                                       "else 4)")
    drop_path: float = field(0.1, help="stochastic depth rate")
    grad_checkpointing: bool = field(False, help="recompute block activations in backward (less memory, ~1/3 "
                                                 "slower)")


@dataclass
class TokenizerOptions(Options):
    tokenizer: TokenizerKind = field("auto", help=f"visual tokenizer kind: auto | {' | '.join(TOKENIZER_KINDS)} (auto: "
                                                  "the kind saved beside --tokenizer_path, else dalle)")
    tokenizer_path: Optional[str] = field(None, help="saved tokenizer (<name>.safetensors + <name>.json), converted "
                                                     "DALL-E weights or an official checkpoint")
    trust_pickle: bool = field(False, help=TRUST_PICKLE_HELP)

    def tokenizer_kind(self) -> str:
        """--tokenizer, with ``auto`` resolved: the kind saved in ``<tokenizer_path>.json`` (a tokenizer trained
        with ``beit tokenizer train``), else dalle."""
        if self.tokenizer != "auto":
            return self.tokenizer
        if self.tokenizer_path:
            from beit.tokenizers.base import resolve_stem
            try:
                meta = json.loads(resolve_stem(self.tokenizer_path).with_suffix(".json").read_text())
                return meta.get("kind", "dalle") if isinstance(meta, dict) else "dalle"
            except (OSError, ValueError):
                pass  # not one of our saved tokenizers (e.g. DALL-E's converted weights): the loader says more
        return "dalle"


@dataclass
class TrackerOptions(Options):
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], help="where the metrics, training pictures, "
                                 "config, final results and report go: tensorboard (output_dir/tensorboard), wandb, "
                                 "mlflow, a comma list (tensorboard,wandb) or none. wandb and mlflow are extras (pip "
                                 "install 'beit-pipeline[wandb]') configured by their own environment: WANDB_PROJECT, "
                                 "WANDB_MODE=offline, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME (docs/viz.md)")
    run_name: str = field("", help="the run's name in W&B and MLflow (empty: the run folder's last two parts, e.g. "
                                   "demo/pretrain)")
    tensorboard: Optional[bool] = field(None, help="deprecated, use --report_to: true adds tensorboard to it, false "
                                                   "takes it out")

    def __post_init__(self) -> None:
        super().__post_init__()
        names = [n.strip().lower() for v in self.report_to for n in str(v).split(",") if n.strip()]
        names = [n for n in names if n != "none"]
        if self.tensorboard is not None:
            change = "adds tensorboard to" if self.tensorboard else "takes tensorboard out of"
            print(f"warning: option tensorboard is deprecated, use --report_to (tensorboard "
                  f"{str(self.tensorboard).lower()} {change} it)", file=sys.stderr)
            names = (["tensorboard"] if self.tensorboard else []) + [n for n in names if n != "tensorboard"]
            self.tensorboard = None
        self.report_to = list(dict.fromkeys(names))

    def trackers(self) -> list[str]:
        """The kinds of --report_to (checked names; empty: none)."""
        from beit.runtime.trackers import parse_report_to
        return parse_report_to(self.report_to)


@dataclass
class RunOptions(TrackerOptions):
    output_dir: str = field("runs/run", help="run folder: config, checkpoints, metrics, final weights; a rerun "
                                            "resumes from its newest complete checkpoint")
    seed: int = field(0, help="seed for weights, data order, augmentation")
    checkpoint_every: int = field(1000, help="save a checkpoint every N optimizer steps (and at the end); a killed "
                                             "run resumes exactly from the newest complete one, mid-epoch included")
    keep_last: int = field(2, help="complete checkpoints to keep (0: all)")
    log_every: int = field(20, help="log metrics every N optimizer steps")
    dist_timeout_s: int = field(1800, help="seconds a collective may wait for a hung process before the job fails")

    def check_run(self) -> None:
        for name in ("checkpoint_every", "log_every", "dist_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_last < 0:
            raise ValueError(f"--keep_last must be >= 0 (0: all), got {self.keep_last}")
        self.trackers()


@dataclass
class PrecisionOptions(Options):
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = field(
        "auto", help="auto: the launcher's fp16/bf16 if set, else bf16 on GPUs that support it, fp16 on other GPUs, "
                     "bf16 on CPUs with AMX or AVX-512-BF16, else no")


@dataclass
class DeviceOptions(Options):
    """The device of a command that runs a model without a launcher (viz, predict)."""
    device: str = field("auto", help="auto | cpu | cuda | cuda:N (auto: a GPU when there is one)")

    def check_device(self) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def torch_device(self):
        import torch
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: no CUDA device is available here; use --device cpu")
        return torch.device(self.device)


@dataclass
class OptimOptions(Options):
    batch_size: int = field(64, help="images per process per micro-step")
    grad_accum_steps: int = field(1, help="micro-steps per optimizer step (ignored when global_batch_size is set)")
    global_batch_size: int = field(0, help="images per optimizer step over all processes; sets grad_accum_steps = "
                                           "global / (batch_size x processes) so the recipe holds for any process "
                                           "count")
    epochs: int = field(100, help="passes over the data (every image once per epoch)")
    lr: float = field(1e-3, help="peak learning rate (for the effective batch; not rescaled)")
    min_lr: float = field(1e-6, help="final learning rate of the schedule")
    lr_schedule: str = field("cosine", help="the lr / weight-decay schedule after the warmup, one of "
                                            "beit.optim.schedules.SCHEDULES (cosine: half-cosine to min_lr)")
    warmup_epochs: float = field(5.0, help="linear warmup length in epochs (a warmup not shorter than the run is "
                                           "capped to a tenth of it, with a warning)")
    warmup_steps: int = field(-1, help="linear warmup length in optimizer steps (>= 0 overrides warmup_epochs)")
    weight_decay: float = field(0.05, help="AdamW weight decay (none on biases, norms, tokens, position tables)")
    clip_grad: float = field(0.0, help="max global gradient norm (0: no clipping)")

    def check_optim(self) -> None:
        from beit.config import check_lr
        from beit.optim.schedules import SCHEDULES

        for name in ("batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size < 0:
            raise ValueError(f"--global_batch_size must be >= 0, got {self.global_batch_size}")
        check_lr(self.lr)
        if self.min_lr < 0:
            raise ValueError(f"--min_lr must be >= 0, got {self.min_lr}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"--lr_schedule {self.lr_schedule!r} is not one of {sorted(SCHEDULES)}")
