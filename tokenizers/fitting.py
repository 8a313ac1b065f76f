"""Fit a tokenizer on shards: the k-means visual words and the small discrete VAE (``beit tokenizer train``,
beit.tokenizers.train, parses the options and calls these).

Both write ``<name>.safetensors`` + ``<name>.json`` for ``load_tokenizer(kind, path)``. The dVAE run
checkpoints atomically every ``checkpoint_every`` steps and resumes from the latest complete
checkpoint when the same command is run again. ``--model_grid`` (the BEiT image_size / patch_size)
makes sure the token grid equals the model's patch grid before any compute is spent.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, Optional

import torch

from beit.config import field, save_config, to_dict
from beit.data.pipelines.transforms import CropOptions
from beit.options.common import (
    DataRecipeOptions,
    HeldOutOptions,
    LoaderOptions,
    PrecisionOptions,
    RunOptions,
    ThreadOptions,
    TrackerOptions,
    TrainDataOptions,
)
from beit.tokenizers.train_data import CropSpec, build_view_loader


def check_grid(kind: str, input_size: int, factor: int, model_grid: int, factor_name: str) -> None:
    """The token grid (input_size / factor) must equal the BEiT patch grid when one is given."""
    if input_size % factor:
        raise ValueError(f"{kind}: input_size {input_size} is not a multiple of {factor_name} {factor}")
    grid = input_size // factor
    if model_grid and grid != model_grid:
        raise ValueError(
            f"{kind}: token grid {grid}x{grid} (input_size {input_size} / {factor_name} {factor}) != the model's "
            f"patch grid {model_grid}x{model_grid}; every masked patch needs exactly one token. "
            f"Use input_size {model_grid * factor} (tokenizer view) or change {factor_name} to "
            f"{input_size // model_grid}"
            if input_size % model_grid == 0 else
            f"{kind}: token grid {grid}x{grid} != the model's patch grid {model_grid}x{model_grid}; use input_size "
            f"{model_grid * factor}")


@dataclass
class TokenizerViewOptions(CropOptions):
    """The training view of a tokenizer being fitted (every kind fitted here has one)."""
    vocab_size: int = field(1024, help="codebook size (tokens)")
    input_size: int = field(112, help="tokenizer view side in px (the token grid is input_size / the kind's "
                                      "patch or stride)")
    interpolation: str = field("lanczos", help="resize filter of the tokenizer view")
    model_grid: int = field(0, help="BEiT patch grid side (image_size / patch_size) to check against; 0 = no check")


@dataclass
class KMeansTrainConfig(TrackerOptions, ThreadOptions, TokenizerViewOptions, LoaderOptions, HeldOutOptions,
                        DataRecipeOptions):
    RECIPE_STAGE = "tokenizer"
    out: str = field("runs/tokenizer/kmeans", help="output stem: writes OUT.safetensors + OUT.json (and the "
                     "trackers' files in OUT_run/)")
    patch_size: int = field(8, help="patch side in px of the tokenizer view (one token per patch)")
    epochs: int = field(3, help="mini-batch k-means passes over the shards")
    batch_size: int = field(64, help="images per mini-batch")
    init_patches: int = field(20000, help="patches used for k-means++ seeding")
    color_weight: float = field(1.0, help="weight of the mean colour feature (keeps flat patches informative)")
    contrast_weight: float = field(2.0, help="weight of the patch contrast feature")
    contrast_floor: float = field(0.05, help="std below which a patch counts as flat")
    whiten: bool = field(False, help="ZCA-whiten the patch shapes")
    seed: int = field(0, help="seed (same data + seed -> same codebook)")

    def validate(self) -> None:
        self.check_train_data()
        self.check_workers()
        self.check_threads()
        self.trackers()
        check_grid("kmeans", self.input_size, self.patch_size, self.model_grid, "patch_size")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError("crop_scale_min must be in (0, 1]")


@dataclass
class DVAETrainConfig(RunOptions, PrecisionOptions, TokenizerViewOptions, LoaderOptions, HeldOutOptions,
                      TrainDataOptions):
    # the shared options with the dVAE's defaults
    output_dir: str = field("runs/dvae")
    checkpoint_every: int = field(250)
    log_every: int = field(50)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = field("no")
    vocab_size: int = field(512)
    input_size: int = field(64)

    hidden: int = field(64, help="conv channels")
    downsample: int = field(8, help="encoder stride (power of 2): grid = input_size / downsample")
    batch_size: int = field(32, help="images per step per process")
    steps: int = field(2000, help="optimizer steps")
    lr: float = field(1e-3, help="peak learning rate (AdamW), cosine-decayed to a tenth after a warmup of 5 percent of "
                                 "the steps")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    tau_start: float = field(1.0, help="Gumbel-softmax temperature at step 0")
    tau_end: float = field(1 / 16, help="temperature after anneal_steps (exponential decay)")
    anneal_steps: int = field(1500, help="steps over which the temperature is annealed")
    kl_weight: float = field(1.0, help="weight of KL(q || uniform) after kl_warmup_steps")
    kl_warmup_steps: int = field(500, help="linear warm-up of the KL weight from 0")
    usage_weight: float = field(0.1, help="weight of the codebook-usage term log K - H(batch-mean code distribution)")
    recon_sigma: float = field(0.1, help="Gaussian likelihood scale of the reconstruction (pixels in [0,1])")
    progress: bool = field(True, help="tqdm progress bar on rank 0")

    def validate(self) -> None:
        self.check_choices()
        self.check_train_data()
        self.check_workers()
        self.check_run()
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of two, got {self.downsample}")
        check_grid("dvae", self.input_size, self.downsample, self.model_grid, "downsample")
        if self.tau_end <= 0 or self.tau_start <= 0:
            raise ValueError("temperatures must be > 0")


def _val_report(tok, cfg) -> Optional[dict]:
    if not cfg.val_shards:
        return None
    from beit.tokenizers.images import shard_image_batches
    from beit.tokenizers.metrics import measure

    return measure(tok, shard_image_batches(cfg.val_shards, cfg.input_size, 64, cfg.interpolation,
                                            allow_remote=cfg.allow_remote_shards, remote_retries=cfg.remote_retries))


def train_kmeans(cfg: KMeansTrainConfig):
    """Fit the k-means tokenizer on the shards; returns it (and writes cfg.out). A stop signal ends the fit after
    its current batch with a checkpoint in ``<out>.fit/`` (``beit.runtime.stopping``), which the same command
    resumes; the folder is removed once the tokenizer is written. The trackers of --report_to get each pass's
    inertia, the config, the fit's and the held-out numbers and the tokenizer's JSON (in OUT_run/)."""
    import shutil

    from beit.runtime.run_lock import open_run
    from beit.runtime.stopping import stop_signals
    from beit.runtime.trackers import check_trackers

    check_trackers(cfg.trackers())  # before any compute
    run_dir = Path(f"{cfg.out}.fit")
    with stop_signals() as stop, open_run(run_dir) as latest:
        tok = _fit_kmeans(cfg, run_dir, latest, stop)
    shutil.rmtree(run_dir, ignore_errors=True)  # the tokenizer is written: nothing left to resume
    return tok


def _fit_options(options: dict) -> dict:
    """The options a resumed fit must share with its checkpoint: all but where the results are reported."""
    return {k: v for k, v in options.items() if k not in {f.name for f in fields(TrackerOptions)}}


def _fit_kmeans(cfg: KMeansTrainConfig, run_dir: Path, latest: Path | None, stop):
    from tqdm.auto import tqdm

    from beit.checkpoints.checkpointing import load_tensor_checkpoint, save_tensor_checkpoint
    from beit.runtime.run_logging import tensorboard_tag
    from beit.runtime.trackers import RunTrackers, default_run_name
    from beit.tokenizers.kmeans import KMeansFit

    cfg.apply_threads()
    loader = build_view_loader(cfg.train_shards, CropSpec(cfg.input_size, cfg.interpolation, (cfg.crop_scale_min, 1.0)),
                               cfg.batch_size, seed=cfg.seed, num_workers=cfg.loader_workers,
                               max_bad_fraction=cfg.max_bad_fraction, **cfg.shard_source())
    print(f"[kmeans] training data: {loader.describe()}" + "".join(f"\n[kmeans] note: {n}" for n in loader.notes))
    trackers = RunTrackers(cfg.trackers(), f"{cfg.out}_run", cfg.run_name or default_run_name(cfg.out))
    if trackers:
        trackers.start(to_dict(cfg), resume=latest is not None)
    t0 = time.time()
    config = dict(vocab_size=cfg.vocab_size, patch_size=cfg.patch_size, input_size=cfg.input_size,
                  interpolation=cfg.interpolation, color_weight=cfg.color_weight, contrast_weight=cfg.contrast_weight,
                  contrast_floor=cfg.contrast_floor, whiten=cfg.whiten)
    if latest is not None:
        tensors, state, rank_state = load_tensor_checkpoint(latest)
        if _fit_options(state["options"]) != _fit_options(to_dict(cfg)):
            raise ValueError(f"{latest} is a fit with other options than this one; remove {run_dir} to start over, "
                             "or rerun the original command")
        fit = KMeansFit.from_state(tensors, state["fit"])
        loader.load_state_dict(rank_state["loader"])
        print(f"[kmeans] resumed from {latest} at step {fit.step} (epoch {fit.epoch})")
    else:  # loader epoch 0 seeds the codes; the passes read epochs 1..epochs
        loader.set_epoch(0)
        fit = KMeansFit.start((b["images"] for b in loader), seed=cfg.seed, init_patches=cfg.init_patches, **config)

    def save() -> Path:
        tensors, state = fit.state_dict()
        return save_tensor_checkpoint(run_dir, fit.step, tensors, {"fit": state, "options": to_dict(cfg)},
                                      {"loader": loader.state_dict()})

    for epoch in range(fit.epoch, cfg.epochs):
        loader.set_epoch(epoch + 1)
        bar = tqdm(loader, desc=f"k-means epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                   total=len(loader), initial=loader.position)
        for batch in bar:
            fit.update(batch["images"])
            bar.set_postfix(inertia=f"{fit.inertia:.4f}", reseeded=fit.n_reseeded, refresh=False)
            if loader.position >= len(loader):
                fit.end_epoch()
                trackers.log({tensorboard_tag(k): v for k, v in fit.pass_metrics().items()}, fit.step)
            stop.check(None, fit.step, save)
    tok = fit.finish()
    stem = tok.save(cfg.out)
    bad = loader.metrics().get("data/bad", 0)
    print(f"[kmeans] fit in {time.time() - t0:.1f}s ({len(loader)} batches/epoch, bad samples: {bad}); "
          f"{tok.fit_stats}; wrote {stem}.safetensors/.json")
    val = _val_report(tok, cfg)
    if val:
        print("[kmeans] held-out: " + json.dumps({k: round(v, 4) for k, v in val.items()}))
    trackers.finish({**tok.fit_stats, "data/bad": bad, **{f"val/{k}": v for k, v in (val or {}).items()}},
                    tok.fit_stats["steps"], files={f"{stem.name}.json": stem.with_suffix(".json")})
    return tok


def _schedules(cfg: DVAETrainConfig, step: int) -> tuple[float, float, float]:
    """(lr, tau, kl_weight) at ``step``; stateless, so resume needs only the step."""
    warm = max(1, int(0.05 * cfg.steps))
    if step < warm:
        lr = cfg.lr * (step + 1) / warm
    else:
        lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm))))
    frac = min(1.0, step / max(1, cfg.anneal_steps))
    tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** frac
    klw = cfg.kl_weight * min(1.0, step / max(1, cfg.kl_warmup_steps))
    return lr, tau, klw


def train_dvae(cfg: DVAETrainConfig):
    """Train the discrete VAE with Accelerate; resumable, stops on a signal with a checkpoint
    (``beit.runtime.stopping``); returns the DVAETokenizer (rank 0) or None."""
    from beit.runtime.stopping import stop_signals

    with stop_signals() as stop:
        return _train_dvae(cfg, stop)


def _train_dvae(cfg: DVAETrainConfig, stop):
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from beit.checkpoints.checkpointing import TRAIN_STATE, find_latest_complete, load_checkpoint, save_checkpoint
    from beit.runtime.precision import resolve_mixed_precision
    from beit.runtime.run_logging import RunLogger
    from beit.runtime.scaling import accelerator_kwargs_handlers
    from beit.runtime.trackers import check_trackers
    from beit.tokenizers.dvae import DiscreteVAE, DVAETokenizer

    check_trackers(cfg.trackers())  # before any compute
    acc = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
                      kwargs_handlers=accelerator_kwargs_handlers(cfg.dist_timeout_s))
    out = Path(cfg.output_dir)
    set_seed(cfg.seed)
    loader = build_view_loader(cfg.train_shards, CropSpec(cfg.input_size, cfg.interpolation, (cfg.crop_scale_min, 1.0)),
                               cfg.batch_size, seed=cfg.seed, rank=acc.process_index, world_size=acc.num_processes,
                               num_workers=cfg.loader_workers, max_bad_fraction=cfg.max_bad_fraction,
                               **cfg.shard_source())
    if acc.is_main_process:
        print(f"[dvae] training data: {loader.describe()}" + "".join(f"\n[dvae] note: {n}" for n in loader.notes))
    model = DiscreteVAE(cfg.vocab_size, cfg.hidden, cfg.downsample)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, opt = acc.prepare(model, opt)
    step, epoch = 0, 0
    latest = find_latest_complete(out)
    if latest is not None:
        saved_cfg = json.loads((latest / TRAIN_STATE).read_text()).get("config", {})
        for key in ("vocab_size", "hidden", "downsample", "input_size"):
            if saved_cfg.get(key) != getattr(cfg, key):
                raise ValueError(f"{latest} was trained with {key}={saved_cfg.get(key)}, this run has "
                                 f"{getattr(cfg, key)}; use another output_dir or the same settings")
        state, rank_state = load_checkpoint(acc, latest)
        step, epoch = int(state["step"]), int(state["epoch"])
        if rank_state:
            loader.load_state_dict(rank_state["loader"])
        acc.print(f"[dvae] resumed from {latest} at step {step} (epoch {epoch})")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    bar = tqdm(total=cfg.steps, initial=step, desc="dvae", disable=not (cfg.progress and acc.is_main_process))
    logger = RunLogger(acc, out, resume_step=step if latest is not None else None, cfg=cfg)
    t0, saved = time.time(), {step: latest}

    def save() -> Path:  # the checkpoint of this step, once
        if step not in saved:
            saved[step] = save_checkpoint(acc, out, step, {"epoch": epoch, "config": to_dict(cfg)},
                                          {"loader": loader.state_dict()}, keep_last=cfg.keep_last)
        return saved[step]

    while step < cfg.steps:
        loader.set_epoch(epoch)
        if loader.position >= len(loader):  # resumed exactly at the end of an epoch
            epoch += 1
            continue
        for batch in loader:
            images = batch["images"]
            lr, tau, klw = _schedules(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            with acc.autocast():
                loss, parts = model(images.to(acc.device), tau=tau, kl_weight=klw, recon_sigma=cfg.recon_sigma,
                                     usage_weight=cfg.usage_weight)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite dVAE loss at step {step}; lower lr or check the data")
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                vals = {k: float(acc.reduce(v.detach().float(), "mean")) for k, v in parts.items()}
                rec = {"epoch": epoch, "lr": lr, "tau": tau, "kl_weight": klw, **vals,
                       "bad_samples": loader.metrics().get("data/bad", 0), "elapsed_s": round(time.time() - t0, 1)}
                bar.set_postfix(mse=f"{vals['mse']:.4f}", tau=f"{tau:.3f}")
                logger.log(rec, step=step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save()
            stop.check(acc, step, save)
            if step >= cfg.steps:
                break
        else:
            epoch += 1
    bar.close()
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return None
    tok = DVAETokenizer(cfg.vocab_size, cfg.hidden, cfg.downsample, cfg.input_size, cfg.interpolation)
    tok.vae.load_state_dict(acc.unwrap_model(model).state_dict())
    stem = tok.freeze().save(out / "dvae")
    print(f"[dvae] {step} steps; wrote {stem}.safetensors/.json (bad samples: {loader.metrics().get('data/bad', 0)})")
    val = _val_report(tok, cfg)
    if val:
        (out / "val_metrics.json").write_text(json.dumps(val, indent=2))
        print("[dvae] held-out: " + json.dumps({k: round(v, 4) for k, v in val.items()}))
    logger.finish({"step": step, **{f"val/{k}": v for k, v in (val or {}).items()}}, step,
                  files=("config.yaml", "val_metrics.json", "dvae.json"))
    return tok
