"""Option sections, each defined once: every command's config is built from the ones it uses.

A config inherits its sections (``class PretrainConfig(RunOptions, ..., DataOptions)``: dataclasses collect
fields from the last base first), so an option has the same name, unit and help in every command. A command
with another default re-declares the field with ``field(<default>)`` and no help: ``--help`` shows the
section's text. Old names a section replaced are in its ``DEPRECATED`` map (they still work, with a warning).

* ``TrainDataOptions``: the training images (shards, or a folder and its held-out split, the same in every stage)
  and, from ``ShardSourceOptions``, where shards may come from (http(s), ``pipe:``), their manifest and the
  reconnects; ``DataRecipeOptions``: those and a recipe fitted to the folder (the k-means tokenizer, pretraining,
  fine-tuning); ``HeldOutOptions``: held-out shards; ``WorkerOptions``: loader workers; ``LoaderOptions``: those
  and the bad-sample budget; ``DataOptions``: the training stream of pretraining, fine-tuning and VQ-KD (all of
  the above but the recipe, plus epoch length, data order, the memory cache);
* ``ModelOptions``: the encoder's size; ``TokenizerOptions``: which frozen tokenizer, from where;
* ``TrackerOptions``: where the results go (--report_to, --run_name); ``RunOptions``: the run folder, seed,
  checkpoints, logging, and the trackers (every run command has them);
* ``PrecisionOptions``: mixed precision; ``ThreadOptions``: CPU threads; ``DeviceOptions``: the device of a
  command without a launcher; ``OptimOptions``: batch, epochs, lr schedule, AdamW.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Literal, Optional

from beit.checkpoints.safe_pickle import TRUST_PICKLE_HELP
from beit.config import Options, field
from beit.tokenizers import TOKENIZER_KINDS

TokenizerKind = Literal[("auto", *TOKENIZER_KINDS)]  # a new registered tokenizer is a choice at once


AUTO_WORKERS_MOST = 4


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as torch's DataLoader counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_workers() -> int:
    """Data loader workers for ``--num_workers -1``: one per available core, at most AUTO_WORKERS_MOST."""
    return max(1, min(AUTO_WORKERS_MOST, available_cores()))


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
    val_fraction: float = field(0.2, help="with --data: hold out this fraction of the images of each sub-folder "
                                          "(seeded, at most 5000; a folder of fewer than 10 images holds none out) "
                                          "for the end-of-run score, unless held-out data is given; the tokenizer, "
                                          "pretraining and fine-tuning of one folder hold out the same images; 0: none")
    split_seed: int = field(0, help="with --data: seed of the held-out split (the same in every stage by default)")

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
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")

    def folder_plan(self, *, labelled: bool, hold_out: bool = True, label_map=None):
        """``--data``'s folder listed and checked, its held-out part (``--val_fraction``, ``--split_seed``; none
        without ``hold_out``) chosen, nothing written yet (``.shards()`` writes it once into --data_cache and
        holds it; see beit.data.storage.folder_cache), or None without --data."""
        if not self.data:
            return None
        from beit.data.storage.folder_cache import plan_folder

        return plan_folder(self.data, labelled=labelled, val_fraction=self.val_fraction if hold_out else 0.0,
                           seed=self.split_seed, cache=self.data_cache, label_map=label_map)

    def folder_shards(self, *, labelled: bool, hold_out: bool = True, log=print):
        """``--data``'s folder as shards (written once into --data_cache and held by this process), or None
        without --data."""
        plan = self.folder_plan(labelled=labelled, hold_out=hold_out)
        return plan.shards(log=log) if plan is not None else None

    def fit_to_data(self, given: set[str]):
        """Called by ``parse_config`` with the options given by flags or --config: a split asked for without
        --data is refused. A saved run's config.yaml holds the split fields with a value that asks for nothing
        (no split, today's or an older default, seed 0): those load, so a run on shards resumes from its config."""
        inert = {"val_fraction": (0.0, type(self).__dataclass_fields__["val_fraction"].default), "split_seed": (0,)}
        split = sorted(k for k in given & set(inert) if getattr(self, k) not in inert[k]) if not self.data else []
        if split:
            raise ValueError(f"--{split[0]} splits a --data folder; with shards pass --val_shards")
        return self


@dataclass
class DataRecipeOptions(TrainDataOptions):
    """A stage that fits its options to a --data folder (beit.options.data_recipe); ``RECIPE_STAGE`` names it."""
    RECIPE_STAGE = ""
    auto_recipe: bool = field(True, help="with --data: every option not given on the command line or in --config "
                                         "comes from a recipe fitted to the folder and the machine (printed at "
                                         "start-up; beit.options.data_recipe); false: the stage's defaults")

    def data_plan(self):
        """The --data folder as this stage trains on it (listed, nothing written)."""
        return self.folder_plan(labelled=False, hold_out=not getattr(self, "val_shards", None))

    def fit_to_data(self, given: set[str]):
        """Called by ``parse_config`` with the options given by flags or --config."""
        super().fit_to_data(given)
        if not self.data or not self.auto_recipe:
            return self
        from beit.options.data_recipe import fit_to_data
        from beit.runtime.run_lock import main_print

        return fit_to_data(self, given, self.RECIPE_STAGE, self.data_plan(), log=main_print)


@dataclass
class HeldOutOptions(Options):
    val_shards: list[str] = field(default_factory=list, help="held-out shards, never trained on: scored at the end "
                                  "(empty: no held-out score)")


@dataclass
class WorkerOptions(Options):
    num_workers: int = field(-1, help="data loader worker processes per process (-1: min(4, the CPU cores this "
                                      "process may use), stated at start-up; fewer when the shards do not allow that "
                                      "many: the log says so)")

    @property
    def loader_workers(self) -> int:
        """``num_workers`` with -1 resolved for this machine."""
        return self.num_workers if self.num_workers >= 0 else auto_workers()

    def describe_workers(self) -> str:
        """The start-up line that says how many loader workers each process starts, and why."""
        why = (f"--num_workers -1: min({AUTO_WORKERS_MOST}, {available_cores()} CPU core(s) this process may use)"
               if self.num_workers < 0 else "--num_workers")
        return f"data loader: {self.loader_workers} worker process(es) per process ({why})"

    def check_workers(self) -> None:
        if self.num_workers < -1:
            raise ValueError(f"--num_workers must be >= 0, or -1 for one per available core (at most "
                             f"{AUTO_WORKERS_MOST}), got {self.num_workers}")


@dataclass
class LoaderOptions(WorkerOptions):
    max_bad_fraction: float = field(0.01, help="stop with an error when more than this fraction of samples fails "
                                               "to decode")


@dataclass
class DataOptions(LoaderOptions, HeldOutOptions, TrainDataOptions):
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
        self.check_workers()
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
class ThreadOptions(Options):
    threads: int = field(0, help="torch intra-op CPU threads per process (0: torch's default, one per core; 1 is "
                                 "fastest for tiny models on a shared CPU: the recipe from the data picks it there)")

    def check_threads(self) -> None:
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0: torch's default), got {self.threads}")

    def apply_threads(self) -> None:
        if self.threads:
            import torch
            torch.set_num_threads(self.threads)


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
