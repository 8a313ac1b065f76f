"""BEiT masked-image-modelling pretraining on sharded WebDataset streams.

    accelerate launch beit/pretrain.py --config launch/pretrain_beit_base_in1k.yaml --output_dir runs/x
    python -m beit.pretrain --config launch/demo_pretrain.yaml --lr 1e-3

Options: dataclass defaults < --config YAML < --flag value (``--help`` lists every option). The run
resumes automatically from the newest complete checkpoint in --output_dir.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from beit.checkpoints.integrity import remove_stale_temp, select_resume
from beit.checkpoints.checkpointing import (TRAIN_STATE, check_resume_compatible, config_fingerprint, load_checkpoint,
                                        save_checkpoint, save_weights)
from beit.runtime.faults import RunFault
from beit.runtime.run_lock import OutputDirError, check_output_dir, end_with_launcher, hold_output_dir
from beit.config import load_yaml, parse_config, save_config, to_dict
from beit.options.pretrain import RESUME_KEYS, PretrainConfig
from beit.engines.pretrain import MimMeter, TrainState, evaluate_mim, train_one_epoch
from beit.optim import WarmupCosineSchedule, create_adamw, param_groups_weight_decay
from beit.runtime.run_logging import TENSORBOARD_RUN, RunLogger, data_error_metrics, data_summary, resolve_trackers
from beit.runtime.precision import resolve_mixed_precision
from beit.runtime.scaling import accelerator_kwargs_handlers, refuse_under_fsdp


class MimSample:
    """The loader's ``map_fn``: two-view augmentation + a block mask for one image.

    The stream seeds ``random``/numpy/torch per sample (the crop, jitter and flip) and passes the
    seed as ``sample["__seed__"]``; the masking generator is reseeded with it, so a sample's views
    and mask are reproducible and a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, transform, masker):
        self.transform, self.masker = transform, masker

    def __call__(self, img, sample: dict) -> dict:
        enc, tok = self.transform(img)
        self.masker.reseed(sample["__seed__"])
        return {"image": enc, "tokenizer_image": tok, "mask": torch.from_numpy(self.masker())}


class CachedMimSample(MimSample):
    """The loader's ``map_fn`` on token-cache shards: one stored view with its tokens + a block mask."""

    def __call__(self, img, sample: dict) -> dict:
        view = self.transform(img, sample)  # CachedViews: picks a stored view with the seeded `random`
        self.masker.reseed(sample["__seed__"])
        return {"image": view["images"], "tokens": view["tokens"], "mask": torch.from_numpy(self.masker())}


def model_dims(cfg: PretrainConfig) -> dict:
    """embed_dim/depth/num_heads/init_values of the config's model (size preset + custom dims)."""
    from beit.modeling.mim import BEIT_SIZES

    if cfg.model_size not in BEIT_SIZES:
        raise ValueError(f"unknown model_size {cfg.model_size!r}; choose one of {sorted(BEIT_SIZES)}")
    dims = dict(BEIT_SIZES[cfg.model_size])
    dims.update({k: getattr(cfg, k) for k in ("embed_dim", "depth", "num_heads", "init_values") if getattr(cfg, k)})
    if dims["embed_dim"] % dims["num_heads"]:
        raise ValueError(f"embed_dim {dims['embed_dim']} is not divisible by num_heads {dims['num_heads']}")
    return dims


def build_model(cfg: PretrainConfig, vocab_size: int):
    """The pretraining model of the config (the BEiT ViT, or a timm Swin with ``--arch swin_*``)."""
    from beit.modeling.mim import create_pretrain_model

    if cfg.arch != "beit":
        from beit.modeling.swin_mim import SwinMimModel
        model = SwinMimModel(cfg.arch, token_grid=cfg.grid, vocab_size=vocab_size, head=cfg.swin_head,
                             drop_path_rate=cfg.drop_path, img_size=cfg.image_size, patch_size=cfg.swin_patch_size,
                             embed_dim=cfg.embed_dim, depths=cfg.swin_depths, num_heads=cfg.swin_heads,
                             window_size=cfg.swin_window_size, mlp_ratio=cfg.mlp_ratio)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    overrides = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, vocab_size=vocab_size,
                     drop_path_rate=cfg.drop_path, mlp_ratio=cfg.mlp_ratio)
    model = create_pretrain_model(None, **model_dims(cfg), **overrides)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.compile:
        model.compile_blocks()
    return model


def check_grids(cfg: PretrainConfig, tokenizer) -> None:
    if tuple(tokenizer.grid_size) != cfg.grid:
        raise ValueError(
            f"the {cfg.tokenizer} tokenizer's token grid is {tokenizer.grid_size[0]}x{tokenizer.grid_size[1]} "
            f"(for its {tokenizer.input_size} px view), but the model's patch grid is {cfg.grid[0]}x{cfg.grid[1]} "
            f"(image_size {cfg.image_size} / patch_size {cfg.patch_size}). Every patch needs exactly one target "
            f"token: choose image_size/patch_size with that grid, or a tokenizer made for it")


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(json.dumps({"vocab": tokenizer.vocab_size, "grid": list(tokenizer.grid_size)}).encode())
    for k, v in sorted(tokenizer.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def token_cache_fingerprint(cache_dir: str) -> str:
    """Hash of a token cache's tokenizer settings, views and shard contents (its folder may move)."""
    from beit.data.storage.shard_format import MANIFEST_NAME

    manifest = json.loads((Path(cache_dir) / MANIFEST_NAME).read_text())
    info = {k: v for k, v in manifest["token_cache"].items() if k not in ("seconds", "tokenizer_path")}
    shards = [(s["name"], s["sha256"]) for s in manifest["shards"]]
    return hashlib.sha256(json.dumps([info, shards, manifest.get("options")], sort_keys=True).encode()).hexdigest()[:16]


def check_token_cache(cfg: PretrainConfig, info: dict, tokenizer) -> None:
    """Refuse a token cache that does not fit the config (tokenizer kind, vocab, patch grid)."""
    from beit.tokenizers.token_cache import check_cache_compatible

    if info["tokenizer"] != cfg.tokenizer:
        raise ValueError(f"--token_cache {cfg.token_cache} holds {info['tokenizer']} tokens, but tokenizer is "
                         f"{cfg.tokenizer}: set --tokenizer {info['tokenizer']} (and its --tokenizer_path for val_shards)")
    try:
        check_cache_compatible(info, tokenizer.vocab_size if tokenizer else info["vocab_size"], cfg.grid)
    except ValueError as e:
        raise ValueError(f"--token_cache {cfg.token_cache} does not fit this run: {e} (model grid = image_size "
                         f"{cfg.image_size} / patch_size {cfg.patch_size})") from e


def build_loader(cfg: PretrainConfig, shards, tokenizer, accelerator, *, train: bool, batch_size: int,
                 accum: int = 1):
    """Training (``train``) or held-out loader; training reads the token cache when cfg.token_cache is set.
    The held-out loader reads every image of this rank's share once (a partial last batch included)."""
    from beit.data.loading.global_order import build_loader_for_order
    from beit.data.loading.heldout import heldout_loader
    from beit.data.pipelines.transforms import TwoViewTransform
    from beit.masking import MaskingGenerator
    from beit.tokenizers.token_cache import CachedViews

    if train and cfg.token_cache:
        transform = CachedViews(image_size=cfg.image_size, color_jitter=cfg.color_jitter)
    elif train:
        transform = TwoViewTransform(image_size=cfg.image_size, tokenizer_size=tokenizer.input_size,
                                     tokenizer_interpolation=tokenizer.interpolation,
                                     scale=(cfg.crop_scale_min, 1.0), color_jitter=cfg.color_jitter, hflip=cfg.hflip)
    else:  # held-out: the whole image (centre square), no jitter or flip
        transform = TwoViewTransform(image_size=cfg.image_size, tokenizer_size=tokenizer.input_size,
                                     tokenizer_interpolation=tokenizer.interpolation,
                                     scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=0.0, hflip=0.0)
    masker = MaskingGenerator(cfg.grid, cfg.masked_count(), min_num_patches=min(cfg.min_mask_patches, cfg.masked_count()),
                              max_num_patches=cfg.max_mask_patches or None, min_aspect=cfg.min_mask_aspect)
    map_fn = (CachedMimSample if train and cfg.token_cache else MimSample)(transform, masker)
    if not train:
        return heldout_loader(shards, map_fn, accelerator, batch_size=batch_size, num_workers=cfg.num_workers,
                              seed=cfg.seed, lazy_jpeg=True)
    return build_loader_for_order(
        cfg.data_order, shards, map_fn=map_fn, batch_size=batch_size, num_workers=cfg.num_workers,
        rank=accelerator.process_index, world_size=accelerator.num_processes, seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer, batches_per_epoch=cfg.batches_per_epoch or None,
        allow_remote=cfg.allow_remote_shards, max_bad_fraction=cfg.max_bad_fraction,
        small_image_size=cfg.image_size, labels=False,  # upscaled images counted as data/upscaled
        resampled=cfg.resampled, batch_multiple=accum,
        pin_memory=accelerator.device.type == "cuda")  # page-locked batches: the non_blocking copies overlap


def resolve_steps(cfg: PretrainConfig, batches_per_epoch: int, accum: int, log=print) -> tuple[int, int, int]:
    """(steps per epoch, total optimizer steps, warmup steps)."""
    from beit.optim.schedules import warmup_for

    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch has {batches_per_epoch} batches per rank, fewer than grad_accum_steps={accum}: "
                         "lower batch_size/grad_accum_steps or add data")
    total = cfg.total_steps if cfg.total_steps > 0 else cfg.epochs * steps_per_epoch
    return steps_per_epoch, total, warmup_for(steps_per_epoch, total, cfg.warmup_epochs, cfg.warmup_steps, log)


def resolve_tokenizer_kind(cfg: PretrainConfig) -> PretrainConfig:
    """``--tokenizer auto``: the kind saved in ``<tokenizer_path>.json`` (a tokenizer trained with
    ``beit tokenizer train``), else dalle."""
    import dataclasses

    if cfg.tokenizer != "auto":
        return cfg
    kind = "dalle"
    if cfg.tokenizer_path:
        from beit.tokenizers.base import resolve_stem
        try:
            meta = json.loads(resolve_stem(cfg.tokenizer_path).with_suffix(".json").read_text())
            kind = meta.get("kind", kind) if isinstance(meta, dict) else kind
        except (OSError, ValueError):
            pass  # not one of our saved tokenizers (e.g. DALL-E's converted weights): the loader says more
    return dataclasses.replace(cfg, tokenizer=kind)


def main_print(msg: str) -> None:
    """Print on the main process only (before the Accelerator exists)."""
    if os.environ.get("RANK", "0") == "0":
        print(msg, flush=True)


class SetupError(ValueError):
    """A problem with the inputs, found before any compute (printed without a traceback)."""


def build_knn_health(cfg: PretrainConfig, accelerator, logger, total_steps: int):
    """The kNN health metric of the config, or None when no kNN shards are set. ``knn_every`` 0: about
    ten evaluations a run, on logging steps, so each sits beside a masked-token accuracy record."""
    if not cfg.knn_train_shards:
        return None
    from beit.data.storage.shardspec import expand_shards
    from beit.engines.knn import KnnHealth, KnnMonitor
    try:
        monitor = KnnMonitor(expand_shards(cfg.knn_train_shards), expand_shards(cfg.knn_val_shards), cfg.image_size,
                             accelerator, k=cfg.knn_k)
    except ValueError as e:
        raise SetupError(str(e)) from None
    every = cfg.knn_every or max(cfg.log_every, round(total_steps / 10 / cfg.log_every) * cfg.log_every)
    logger.info(f"kNN health metric: {monitor.n_train} labelled images as memory bank, {monitor.n_val} scored, "
                f"k={cfg.knn_k}, mean-pooled patch features, every {every} steps (decoded in "
                f"{monitor.load_seconds:.1f}s)")
    return KnnHealth(monitor, logger, every, total_steps)


def check_inputs(cfg: PretrainConfig, world: int):
    """Every check that needs files but no compute and writes nothing: shards, tokenizer grid, token cache,
    masking, batch split (resume compatibility: ``check_resume``, under the run lock). Returns (shards, val_shards, tokenizer or None, grad_accum_steps,
    token cache info or None); the tokenizer is None when a token cache replaces it and nothing else needs it."""
    from beit.data.storage.shardspec import expand_shards
    from beit.masking import MaskingGenerator
    from beit.tokenizers import load_tokenizer
    from beit.tokenizers.token_cache import read_cache_info

    try:
        cfg.validate()
        check_output_dir(cfg.output_dir)
        cache = read_cache_info(cfg.token_cache) if cfg.token_cache else None
        val_spec = cfg.val_shards
        if cache is not None:
            shards = expand_shards(str(Path(cfg.token_cache) / "cache-*.tar"))
        elif cfg.data:
            from beit.data.storage.folder_cache import folder_shards
            found = folder_shards(cfg.data, labelled=False, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                  cache=cfg.data_cache, log=main_print)
            main_print(f"--data {cfg.data}: {found.describe()}")
            shards = expand_shards(found.train)
            val_spec = found.val or val_spec
        else:
            shards = expand_shards(cfg.data_shards, allow_remote=cfg.allow_remote_shards)
        val_shards = expand_shards(val_spec, allow_remote=cfg.allow_remote_shards) if val_spec else []
        for name in ("knn_train_shards", "knn_val_shards"):
            if getattr(cfg, name):
                try:
                    expand_shards(getattr(cfg, name))
                except ValueError as e:
                    raise ValueError(f"--{name}: {e}") from None
        if val_shards and len(val_shards) < world:
            raise ValueError(f"{len(val_shards)} held-out shard(s) for {world} processes: each process needs one; "
                             "split the held-out set into more shards")
        tokenizer = (load_tokenizer(cfg.tokenizer, cfg.tokenizer_path, trust_pickle=cfg.trust_pickle)
                     if cache is None or val_shards else None)
        if tokenizer is not None:
            check_grids(cfg, tokenizer)
        if cache is not None:
            check_token_cache(cfg, cache, tokenizer)
        n_masked = cfg.masked_count()
        MaskingGenerator(cfg.grid, n_masked, min_num_patches=min(cfg.min_mask_patches, n_masked),
                         max_num_patches=cfg.max_mask_patches or None, min_aspect=cfg.min_mask_aspect)
        if n_masked >= cfg.grid[0] * cfg.grid[1]:
            raise ValueError(f"num_masking_patches {n_masked} leaves no visible patch on the {cfg.grid} grid")
        accum = cfg.grad_accum_steps
        if cfg.global_batch_size:
            if cfg.global_batch_size % (cfg.batch_size * world):
                raise ValueError(f"global_batch_size {cfg.global_batch_size} is not divisible by batch_size "
                                 f"{cfg.batch_size} x {world} process(es)")
            accum = cfg.global_batch_size // (cfg.batch_size * world)
        if cfg.arch == "beit":
            model_dims(cfg)
        else:  # the Swin's sizes, windows and token-grid geometry, checked without allocating weights
            try:
                with torch.device("meta"):
                    build_model(cfg, tokenizer.vocab_size if tokenizer is not None else int(cache["vocab_size"]))
            except (TypeError, AssertionError, IndexError, RuntimeError) as e:  # timm's own checks
                raise ValueError(f"--arch {cfg.arch} cannot be built with these Swin options: {e}") from None
    except (ValueError, FileNotFoundError, PermissionError) as e:
        raise SetupError(str(e)) from e
    return shards, val_shards, tokenizer, accum, cache


def check_resume(cfg: PretrainConfig, latest: Path | None, tokenizer, cache) -> None:
    """Refuse to resume ``latest`` (the newest intact checkpoint) with another model, tokenizer or token
    cache; runs before anything of this run is written."""
    if latest is None:
        return
    out = Path(cfg.output_dir)
    try:
        if (out / "config.yaml").is_file():
            saved = to_dict(load_yaml(PretrainConfig, out / "config.yaml"))
            check_resume_compatible(saved, to_dict(cfg), RESUME_KEYS, where=str(out))
        saved = json.loads((latest / TRAIN_STATE).read_text())
        saved_fp = saved.get("tokenizer_fingerprint")
        if tokenizer is not None and saved_fp not in (None, tokenizer_fingerprint(tokenizer)):
            raise ValueError(f"cannot resume {out}: the tokenizer at {cfg.tokenizer_path} has other weights than "
                             "the one this run was trained with; use a new --output_dir or the original tokenizer")
        cache_fp = token_cache_fingerprint(cfg.token_cache) if cache is not None else None
        saved_cache = saved.get("token_cache_fingerprint", cache_fp)  # absent: a checkpoint from before caches
        if saved_cache != cache_fp:
            was = ("another token cache than " if cache_fp else "a token cache, not ") if saved_cache else \
                "no token cache, not "
            raise ValueError(f"cannot resume {out}: it was trained with {was}--token_cache {cfg.token_cache}; "
                             "use a new --output_dir or the run's original token cache setting")
    except (ValueError, FileNotFoundError) as e:
        raise SetupError(str(e)) from e


def main(argv: list[str] | None = None, cfg: PretrainConfig | None = None) -> dict:
    """Run (or resume) pretraining; returns the final summary (also written to final_metrics.json).
    Bad input raises SetupError/OutputDirError; faults during the run (a non-finite state, no intact
    checkpoint, a full disk, a second run on the folder) raise RunFault, all with a message."""
    cfg = resolve_tokenizer_kind(cfg or parse_config(PretrainConfig, argv, description=__doc__))
    end_with_launcher()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    inputs = check_inputs(cfg, world)
    rank0 = os.environ.get("RANK", "0") == "0"
    with hold_output_dir(cfg.output_dir, is_main=rank0):
        if rank0:
            remove_stale_temp(cfg.output_dir)
        log = (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True)) if rank0 else (lambda m: None)
        latest = select_resume(cfg.output_dir, move_aside=rank0, log=log)
        check_resume(cfg, latest, inputs[2], inputs[4])
        return _train(cfg, world, inputs, latest)


def _train(cfg: PretrainConfig, world: int, inputs: tuple, latest: Path | None) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = Path(cfg.output_dir)
    shards, val_shards, tokenizer, accum, cache = inputs
    vocab_size = tokenizer.vocab_size if tokenizer is not None else int(cache["vocab_size"])

    trackers = resolve_trackers(cfg.tensorboard)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
                              gradient_accumulation_steps=accum, log_with=trackers or None, project_dir=str(out),
                              kwargs_handlers=accelerator_kwargs_handlers(cfg.dist_timeout_s))
    if accelerator.num_processes != world:
        raise RuntimeError(f"process count mismatch: WORLD_SIZE={world}, accelerate sees {accelerator.num_processes}")
    if val_shards:
        try:
            refuse_under_fsdp(accelerator.distributed_type, "the held-out evaluation (--val_shards)",
                              "leave --val_shards empty and evaluate pretrained.safetensors afterwards")
        except ValueError as e:
            raise SetupError(str(e)) from None
    tok_fp = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
    cache_fp = token_cache_fingerprint(cfg.token_cache) if cache is not None else None

    # --- build ---------------------------------------------------------------------------------
    set_seed(cfg.seed)
    model = build_model(cfg, vocab_size)
    if tokenizer is not None:
        tokenizer = tokenizer.to(accelerator.device)
    optimizer = create_adamw(param_groups_weight_decay(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps)
    try:  # the loader's start-up checks (worker split, empty shards) are bad input too
        loader = build_loader(cfg, shards, tokenizer, accelerator, train=True, batch_size=cfg.batch_size, accum=accum)
        steps_per_epoch, total_steps, warmup = resolve_steps(cfg, len(loader), accum, log=main_print)
    except ValueError as e:
        raise SetupError(str(e)) from None
    if accelerator.is_main_process:  # every start-up check has passed
        save_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()
    schedule = WarmupCosineSchedule(optimizer, lr=cfg.lr, min_lr=cfg.min_lr, total_steps=total_steps,
                                    warmup_steps=warmup, weight_decay=cfg.weight_decay,
                                    weight_decay_end=cfg.weight_decay_end)
    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(cfg.seed, device_specific=True)  # per-rank stream for drop path

    # --- resume --------------------------------------------------------------------------------
    state = TrainState()
    cfg_hash = config_fingerprint(to_dict(cfg), RESUME_KEYS)
    resumed_from = None
    if latest is not None:
        saved_state, rank_state = load_checkpoint(accelerator, latest)
        state = TrainState(**saved_state["train"])
        schedule.load_state_dict(saved_state["schedule"])
        if rank_state is not None:
            loader.load_state_dict(rank_state["loader"])
            if loader.epoch == state.epoch and loader.position >= len(loader):
                state.epoch += 1  # saved right at the end of an epoch
        resumed_from = latest
    logger = RunLogger(accelerator, out, resume_step=state.step if resumed_from else None)
    if trackers:
        accelerator.init_trackers(TENSORBOARD_RUN, config={k: v for k, v in to_dict(cfg).items()
                                                         if isinstance(v, (int, float, str, bool))})

    n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    eff_batch = cfg.batch_size * accum * accelerator.num_processes
    logger.info(f"BEiT pretraining{'' if cfg.arch == 'beit' else ' of ' + cfg.arch}: {n_params / 1e6:.2f}M params, grid {cfg.grid[0]}x{cfg.grid[1]}, "
                f"{cfg.masked_count()} masked, {cfg.tokenizer} tokenizer (vocab {vocab_size})")
    if cache is not None:
        logger.info(f"token cache {cfg.token_cache}: {cache['views_per_image']} stored views per image (crop scale "
                    f"{cache['scale']}, hflip {cache['hflip']}); no tokenizer call in training")
    logger.info(f"processes {accelerator.num_processes}, device {accelerator.device}, mixed precision "
                f"{accelerator.mixed_precision}; effective batch {eff_batch} = {cfg.batch_size} x {accum} accum x "
                f"{accelerator.num_processes} proc; lr {cfg.lr:g} (not rescaled), {total_steps} steps "
                f"({steps_per_epoch}/epoch), warmup {warmup}")
    for line in data_summary(loader, cfg.batch_size, accelerator.num_processes):
        logger.info(line)
    logger.info(f"held-out: {len(val_shards)} shard(s), scored at the end" if val_shards else
                "held-out: none (no masked-token score at the end; pass --val_shards, or --data with --val_fraction)")
    logger.info(f"outputs: {out}/ (config.yaml, metrics.jsonl, checkpoints/ every {cfg.checkpoint_every} steps, "
                "final_metrics.json, pretrained.safetensors)")
    if resumed_from:
        logger.info(f"resumed from {resumed_from} at step {state.step} (epoch {state.epoch})")
    else:
        logger.info(f"starting a new run in {out}")

    # --- train ---------------------------------------------------------------------------------
    def checkpoint(st: TrainState) -> None:
        if st.step % cfg.checkpoint_every and st.step != total_steps:
            return
        st.train_seconds = time_before + time.time() - t_start
        train_state = {"train": st.to_dict(), "schedule": schedule.state_dict(), "config_hash": cfg_hash,
                       "tokenizer_fingerprint": tok_fp, "token_cache_fingerprint": cache_fp}
        path = save_checkpoint(accelerator, out, st.step, train_state, {"loader": loader.state_dict()},
                               keep_last=cfg.keep_last)
        logger.info(f"checkpoint saved: {path}")

    health = build_knn_health(cfg, accelerator, logger, total_steps)

    def after_step(st: TrainState) -> None:
        if health is not None:
            health(accelerator.unwrap_model(model), st.step)
        checkpoint(st)

    meter = MimMeter(vocab_size, accelerator.device)
    if health is not None and state.step == 0:
        health(accelerator.unwrap_model(model), 0)  # the random encoder: what the metric must rise above
    pictures = None
    if trackers and cfg.log_images_every:
        from beit.runtime.train_pictures import TrainingPictures
        pictures = TrainingPictures(logger, tokenizer, cfg.log_images_every, vocab_size=vocab_size)
    t_start, time_before = time.time(), state.train_seconds
    with logger.progress(total_steps, initial=state.step, images_per_step=eff_batch) as bar:
        while state.step < total_steps:
            loader.set_epoch(state.epoch)
            train_one_epoch(model, tokenizer, loader, optimizer, schedule, accelerator, state,
                            total_steps=total_steps, clip_grad=cfg.clip_grad, max_nonfinite_in_a_row=cfg.max_nonfinite_steps, log_every=cfg.log_every, logger=logger,
                            after_step=after_step, progress=bar, meter=meter, pictures=pictures,
                            data_stats=lambda: data_error_metrics(loader, accelerator))
            if state.step < total_steps:
                state.epoch += 1

    # --- finish: weights, held-out evaluation ----------------------------------------------------
    summary = {"step": state.step, "epoch": state.epoch, "nonfinite_steps": state.nonfinite_steps,
               "train_seconds": round(state.train_seconds, 1), "output_dir": str(out)}
    summary.update(data_error_metrics(loader, accelerator))
    if health is not None:
        summary.update(health.summary(summary["train_seconds"]))
    unwrapped = accelerator.unwrap_model(model)
    full_state = accelerator.get_state_dict(model)  # a collective under FSDP/DeepSpeed
    if accelerator.is_main_process:
        weights = save_weights(full_state, out / "pretrained.safetensors",
                               {"model": unwrapped.config, "tokenizer": cfg.tokenizer,
                                "tokenizer_path": cfg.tokenizer_path, "tokenizer_fingerprint": tok_fp,
                                "token_cache": cfg.token_cache, "token_cache_fingerprint": cache_fp,
                                "step": state.step, "pretrain_config": to_dict(cfg)})
        summary["pretrained"] = str(weights)
    if val_shards:
        val_loader = build_loader(cfg, val_shards, tokenizer, accelerator, train=False,
                                  batch_size=cfg.eval_batch_size or cfg.batch_size)
        ev = evaluate_mim(unwrapped, tokenizer, val_loader, accelerator, max_batches=cfg.eval_batches)
        summary.update({f"val/{k}": v for k, v in ev.items()})
        logger.log({f"val/{k}": v for k, v in ev.items()}, step=state.step)
        if "mim_acc" in ev:
            logger.info(f"held-out masked-token accuracy {ev['mim_acc']:.4f} vs majority-token baseline "
                        f"{ev['majority_acc']:.4f} ({ev['tokens']} masked tokens in {ev['images']} images"
                        + (f"; {ev['bad_images']} undecodable images left out)" if ev["bad_images"] else ")"))
    last = logger.last_logged
    summary.update({f"train/{k}": last[k] for k in ("loss", "mim_acc", "majority_acc") if k in last})
    if accelerator.is_main_process:
        (out / "final_metrics.json").write_text(json.dumps(summary, indent=1))
    train = (f"last logged training loss {last['loss']:.4f}, masked-token accuracy {last['mim_acc']:.3f} vs "
             f"majority {last['majority_acc']:.3f}" if "mim_acc" in last else "no training metrics logged")
    logger.info(f"finished: {state.step} steps, {state.epoch + 1} epoch(s), {summary['train_seconds']:.0f} s "
                f"training; {train}; held-out: "
                + (f"{summary['val/mim_acc']:.4f}" if "val/mim_acc" in summary else "none")
                + f"  ->  {out}/final_metrics.json, {out}/pretrained.safetensors")
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    from beit.engines.pretrain import NonFiniteLossError
    try:
        main()
    except (SetupError, OutputDirError) as e:  # bad input: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (RunFault, NonFiniteLossError) as e:  # a fault during the run: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
