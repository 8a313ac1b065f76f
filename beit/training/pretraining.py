"""A whole BEiT pretraining run: check the inputs, hold the run folder, build, resume, run the engine, write.

``run_pretraining(cfg)`` is what ``beit pretrain`` / ``accelerate launch beit/pretrain.py`` run (and ``beit
compare``). Bad input raises ``SetupError`` before any compute; faults during the run (a non-finite state, no
intact checkpoint, a full disk, a second run on the folder) raise ``RunFault``, all with a message.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from beit.config import load_yaml, save_config, to_dict
from beit.options.pretrain import RESUME_KEYS, PretrainConfig
from beit.runtime.faults import SetupError


def run_pretraining(cfg: PretrainConfig) -> dict:
    """Run (or resume) pretraining; returns the final summary (also written to final_metrics.json)."""
    from beit.runtime.run_lock import end_with_launcher, open_run, world_size
    from beit.runtime.stopping import stop_signals

    cfg = dataclasses.replace(cfg, tokenizer=cfg.tokenizer_kind())
    cfg.apply_threads()
    end_with_launcher()
    with stop_signals() as stop:                      # SIGTERM/SIGINT/SIGUSR1: checkpoint at the step, then stop
        inputs = check_inputs(cfg, world_size())      # every input checked, nothing written, no compute
        with open_run(cfg.output_dir) as latest:      # one run per folder; the newest intact checkpoint
            check_resume(cfg, latest, inputs)
            folder_inputs(cfg, inputs, world_size())  # --data: the folder written (or reused) and held
            run = PretrainRun(cfg, inputs, init=None if latest else inputs.init)  # accelerator, model, optimizer...
            run.restore(latest)
            run.train(stop)                           # the engine, epoch after epoch, checkpoints
            return run.finish()                       # weights, held-out evaluation, final_metrics.json


@dataclass
class PretrainInputs:
    """What ``check_inputs`` found: the shards, the tokenizer (None when a token cache replaces it and nothing
    else needs it), the token cache's description, the gradient accumulation, the masking generator, the
    checked ``--init``; with ``--data`` the folder's plan, whose shards ``folder_inputs`` fills in once every
    check has passed."""
    shards: list[str]
    val_shards: list[str]
    tokenizer: object | None
    cache: dict | None
    grad_accum_steps: int
    masker: object
    init: object | None = None
    folder: object | None = None  # --data's checked FolderPlan, written by folder_inputs

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size if self.tokenizer is not None else int(self.cache["vocab_size"])


def check_inputs(cfg: PretrainConfig, world: int) -> PretrainInputs:
    """Every check that needs files but no compute and writes nothing: shards (``--data``'s folder listed and
    checked, written later by ``folder_inputs``), tokenizer grid, token cache, masking, batch split, the model's
    geometry (resume compatibility: ``check_resume``, under the run lock). Bad input raises ``SetupError``."""
    from beit.data.pipelines.pretraining import masking_generator
    from beit.data.storage.shardspec import expand_shards
    from beit.modeling.backbones import backbone_for
    from beit.runtime.run_lock import check_output_dir
    from beit.runtime.scaling import grad_accum_for
    from beit.runtime.trackers import check_trackers
    from beit.tokenizers import load_tokenizer
    from beit.tokenizers.token_cache import read_cache_info

    try:
        cfg.validate()
        check_output_dir(cfg.output_dir)
        check_trackers(cfg.trackers())
        cache = read_cache_info(cfg.token_cache) if cfg.token_cache else None
        val_spec, folder = cfg.val_shards, None
        if cache is not None:
            shards = expand_shards(str(Path(cfg.token_cache) / "cache-*.tar"))
        elif cfg.data:  # listed and checked now, written by folder_inputs once every check has passed
            folder = cfg.data_plan()
            shards = []
        else:
            shards = expand_shards(cfg.train_shards, allow_remote=cfg.allow_remote_shards)
        val_shards = expand_shards(val_spec, allow_remote=cfg.allow_remote_shards) if val_spec else []
        for name in ("knn_train_shards", "knn_val_shards"):
            if getattr(cfg, name):
                try:
                    expand_shards(getattr(cfg, name), allow_remote=cfg.allow_remote_shards)
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
        masker = masking_generator(cfg)
        if cfg.masked_count() >= cfg.grid[0] * cfg.grid[1]:
            raise ValueError(f"num_masking_patches {cfg.masked_count()} leaves no visible patch on the {cfg.grid} grid")
        accum = grad_accum_for(cfg.global_batch_size, cfg.batch_size, world) if cfg.global_batch_size \
            else cfg.grad_accum_steps
        inputs = PretrainInputs(shards, val_shards, tokenizer, cache, accum, masker, folder=folder)
        backbone = backbone_for(cfg.arch, pretraining=True)
        backbone.check_mim(cfg, inputs.vocab_size)
        if cfg.init:
            inputs.init = backbone.read_mim_init(cfg, inputs.vocab_size)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        raise SetupError(str(e)) from e
    return inputs


def folder_inputs(cfg: PretrainConfig, inputs: PretrainInputs, world: int) -> None:
    """``--data``: the checked folder written into the cache, or reused, and held for this run (its shards put
    into ``inputs``); called after every check, so a refused command writes nothing."""
    from beit.data.storage.shardspec import expand_shards
    from beit.runtime.run_lock import main_print

    if inputs.folder is None:
        return
    try:
        found = inputs.folder.shards(log=main_print)
        main_print(f"--data {cfg.data}: {found.describe()}")
        inputs.shards = expand_shards(found.train)
        if found.val:
            inputs.val_shards = expand_shards(found.val)
        if inputs.val_shards and len(inputs.val_shards) < world:
            raise ValueError(f"{len(inputs.val_shards)} held-out shard(s) for {world} processes: each process needs "
                             "one; raise --val_fraction or add images")
    except ValueError as e:
        raise SetupError(str(e)) from e


def check_grids(cfg: PretrainConfig, tokenizer) -> None:
    if tuple(tokenizer.grid_size) != cfg.grid:
        raise ValueError(
            f"the {cfg.tokenizer} tokenizer's token grid is {tokenizer.grid_size[0]}x{tokenizer.grid_size[1]} "
            f"(for its {tokenizer.input_size} px view), but the model's patch grid is {cfg.grid[0]}x{cfg.grid[1]} "
            f"(image_size {cfg.image_size} / patch_size {cfg.patch_size}). Every patch needs exactly one target "
            f"token: choose image_size/patch_size with that grid, or a tokenizer made for it")


def check_token_cache(cfg: PretrainConfig, info: dict, tokenizer) -> None:
    """Refuse a token cache that does not fit the config (tokenizer kind, vocab, patch grid)."""
    from beit.tokenizers.token_cache import check_cache_compatible

    if info["tokenizer"] != cfg.tokenizer:
        raise ValueError(f"--token_cache {cfg.token_cache} holds {info['tokenizer']} tokens, but tokenizer is "
                         f"{cfg.tokenizer}: set --tokenizer {info['tokenizer']} (and its --tokenizer_path for "
                         "val_shards)")
    try:
        check_cache_compatible(info, tokenizer.vocab_size if tokenizer else info["vocab_size"], cfg.grid)
    except ValueError as e:
        raise ValueError(f"--token_cache {cfg.token_cache} does not fit this run: {e} (model grid = image_size "
                         f"{cfg.image_size} / patch_size {cfg.patch_size})") from e


def check_resume(cfg: PretrainConfig, latest: Path | None, inputs: PretrainInputs) -> None:
    """Refuse to resume ``latest`` (the newest intact checkpoint) with another model, tokenizer or token cache;
    runs before anything of this run is written."""
    from beit.checkpoints.checkpointing import TRAIN_STATE, check_resume_compatible
    from beit.tokenizers.base import tokenizer_fingerprint
    from beit.tokenizers.token_cache import token_cache_fingerprint

    if latest is None:
        return
    out = Path(cfg.output_dir)
    try:
        if (out / "config.yaml").is_file():  # the saved options, their old names read as today's
            saved = to_dict(load_yaml(PretrainConfig, out / "config.yaml"))
            check_resume_compatible(saved, to_dict(cfg), RESUME_KEYS, where=str(out))
        saved = json.loads((latest / TRAIN_STATE).read_text())
        saved_fp = saved.get("tokenizer_fingerprint")
        if inputs.tokenizer is not None and saved_fp not in (None, tokenizer_fingerprint(inputs.tokenizer)):
            raise ValueError(f"cannot resume {out}: the tokenizer at {cfg.tokenizer_path} has other weights than "
                             "the one this run was trained with; use a new --output_dir or the original tokenizer")
        cache_fp = token_cache_fingerprint(cfg.token_cache) if inputs.cache is not None else None
        saved_cache = saved.get("token_cache_fingerprint", cache_fp)  # absent: a checkpoint from before caches
        if saved_cache != cache_fp:
            was = ("another token cache than " if cache_fp else "a token cache, not ") if saved_cache else \
                "no token cache, not "
            raise ValueError(f"cannot resume {out}: it was trained with {was}--token_cache {cfg.token_cache}; "
                             "use a new --output_dir or the run's original token cache setting")
    except (ValueError, FileNotFoundError) as e:
        raise SetupError(str(e)) from e


def build_model(cfg: PretrainConfig, vocab_size: int):
    """The masked-image-modelling model of the config's backbone (``--arch``), with gradient checkpointing and
    compiled blocks when asked."""
    from beit.modeling.backbones import backbone_for

    model = backbone_for(cfg.arch, pretraining=True).build_mim(cfg, vocab_size)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.compile:
        model.compile_blocks()
    return model


def resolve_steps(cfg: PretrainConfig, batches_per_epoch: int, accum: int, log=print) -> tuple[int, int, int]:
    """(steps per epoch, total optimizer steps, warmup steps)."""
    from beit.optim.schedules import warmup_for

    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch has {batches_per_epoch} batches per rank, fewer than grad_accum_steps={accum}: "
                         "lower batch_size/grad_accum_steps or add data")
    total = cfg.total_steps if cfg.total_steps > 0 else cfg.epochs * steps_per_epoch
    return steps_per_epoch, total, warmup_for(steps_per_epoch, total, cfg.warmup_epochs, cfg.warmup_steps, log)


class PretrainRun:
    """The pieces of one pretraining run, built from its checked inputs."""

    def __init__(self, cfg: PretrainConfig, inputs: PretrainInputs, init=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from beit.data.pipelines.pretraining import build_mim_loader
        from beit.optim import create_adamw, create_schedule, param_groups_weight_decay
        from beit.runtime.precision import resolve_mixed_precision
        from beit.runtime.run_lock import main_print
        from beit.runtime.scaling import accelerator_kwargs_handlers, refuse_under_fsdp
        from beit.tokenizers.base import tokenizer_fingerprint
        from beit.tokenizers.token_cache import token_cache_fingerprint

        self.cfg, self.inputs, self.out = cfg, inputs, Path(cfg.output_dir)
        self.accelerator = acc = Accelerator(
            mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
            gradient_accumulation_steps=inputs.grad_accum_steps, project_dir=str(self.out),
            kwargs_handlers=accelerator_kwargs_handlers(cfg.dist_timeout_s))
        if inputs.val_shards:
            try:
                refuse_under_fsdp(acc.distributed_type, "the held-out evaluation (--val_shards)",
                                  "leave --val_shards empty and evaluate pretrained.safetensors afterwards")
            except ValueError as e:
                raise SetupError(str(e)) from None
        self.tok_fp = tokenizer_fingerprint(inputs.tokenizer) if inputs.tokenizer is not None else None
        self.cache_fp = token_cache_fingerprint(cfg.token_cache) if inputs.cache is not None else None

        set_seed(cfg.seed)
        model = build_model(cfg, inputs.vocab_size)
        self.init_report = init.load_into(model) if init is not None else None  # before prepare: every rank
        self.tokenizer = inputs.tokenizer.to(acc.device) if inputs.tokenizer is not None else None
        optimizer = create_adamw(param_groups_weight_decay(model, cfg.weight_decay), lr=cfg.lr,
                                 betas=tuple(cfg.betas), eps=cfg.eps)
        try:  # the loader's start-up checks (worker split, empty shards) are bad input too
            self.loader = build_mim_loader(cfg, inputs.shards, self.tokenizer, acc, train=True,
                                           batch_size=cfg.batch_size, accum=inputs.grad_accum_steps,
                                           masker=inputs.masker)
            self.steps_per_epoch, self.total_steps, self.warmup = resolve_steps(
                cfg, len(self.loader), inputs.grad_accum_steps, log=main_print)
        except ValueError as e:
            raise SetupError(str(e)) from None
        if acc.is_main_process:  # every start-up check has passed; --data's held-out shards saved for `beit viz`
            save_config(dataclasses.replace(cfg, val_shards=inputs.val_shards) if inputs.folder is not None else cfg,
                        self.out / "config.yaml")
        acc.wait_for_everyone()
        self.schedule = create_schedule(cfg.lr_schedule, optimizer, lr=cfg.lr, min_lr=cfg.min_lr,
                                        total_steps=self.total_steps, warmup_steps=self.warmup,
                                        weight_decay=cfg.weight_decay, weight_decay_end=cfg.weight_decay_end)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        set_seed(cfg.seed, device_specific=True)  # per-rank stream for drop path

    def restore(self, latest: Path | None) -> None:
        """The saved state of ``latest`` (weights, optimizer, schedule, data position), the logger, the start-up log."""
        from beit.checkpoints.checkpointing import resume_run
        from beit.engines.pretrain import MimMeter, TrainState, prediction_branches
        from beit.runtime.run_logging import RunLogger

        self.state = TrainState()
        self.meter = MimMeter(self.inputs.vocab_size, self.accelerator.device,
                              prediction_branches(self.accelerator.unwrap_model(self.model)))
        self.saved_step = None
        if latest is not None:
            saved_state, epoch_done = resume_run(self.accelerator, latest, self.schedule, self.loader,
                                                 {"meter": self.meter.load_state_dict})
            self.state = TrainState(**saved_state["train"])
            self.state.epoch += epoch_done
            self.saved_step = self.state.step
        self.logger = RunLogger(self.accelerator, self.out, resume_step=self.state.step if latest else None,
                                cfg=self.cfg)
        self.log_start(latest)

    def log_start(self, latest: Path | None) -> None:
        from beit.runtime.run_logging import data_summary

        cfg, acc, log, accum = self.cfg, self.accelerator, self.logger.info, self.inputs.grad_accum_steps
        n_params = sum(p.numel() for p in acc.unwrap_model(self.model).parameters())
        log(f"BEiT pretraining: {cfg.arch}, {n_params / 1e6:.2f}M params, grid {cfg.grid[0]}x{cfg.grid[1]}, "
            f"{cfg.masked_count()} masked, {cfg.tokenizer} tokenizer (vocab {self.inputs.vocab_size})")
        if self.inputs.cache is not None:
            cache = self.inputs.cache
            log(f"token cache {cfg.token_cache}: {cache['views_per_image']} stored views per image (crop scale "
                f"{cache['scale']}, hflip {cache['hflip']}); no tokenizer call in training")
        log(f"processes {acc.num_processes}, device {acc.device}, mixed precision {acc.mixed_precision}; effective "
            f"batch {cfg.batch_size * accum * acc.num_processes} = {cfg.batch_size} x {accum} accum x "
            f"{acc.num_processes} proc; lr {cfg.lr:g} (not rescaled), {self.total_steps} steps "
            f"({self.steps_per_epoch}/epoch), warmup {self.warmup}")
        for line in data_summary(self.loader, cfg.batch_size, acc.num_processes) + [cfg.describe_workers()]:
            log(line)
        log(f"held-out: {len(self.inputs.val_shards)} shard(s), scored at the end" if self.inputs.val_shards else
            "held-out: none (no masked-token score at the end; pass --val_shards, or --data with --val_fraction > 0)")
        log(f"outputs: {self.out}/ (config.yaml, metrics.jsonl, checkpoints/ every {cfg.checkpoint_every} steps, "
            "final_metrics.json, pretrained.safetensors)")
        if latest:
            log(f"resumed from {latest} at step {self.state.step} (epoch {self.state.epoch})"
                + (f"; --init {cfg.init} not used (the run's own checkpoint is newer)" if cfg.init else ""))
        else:
            log(f"starting a new run in {self.out}" + (" from --init:" if self.init_report else ""))
        for line in self.init_report.summary().splitlines() if self.init_report else ():
            log(f"  {line}")

    def checkpoint(self, st, stopping: bool = False) -> Path:
        """A checkpoint every ``checkpoint_every`` optimizer steps, at the last, and at a stop (once per step);
        returns the step's checkpoint. The meter's open logging window goes with this rank's data position."""
        from beit.checkpoints.checkpointing import checkpoint_path, config_fingerprint, save_checkpoint

        if self.saved_step == st.step or not stopping and st.step % self.cfg.checkpoint_every \
                and st.step != self.total_steps:
            return checkpoint_path(self.out, st.step)
        st.train_seconds = self.time_before + time.time() - self.t_start
        train_state = {"train": st.to_dict(), "schedule": self.schedule.state_dict(),
                       "config_hash": config_fingerprint(to_dict(self.cfg), RESUME_KEYS),
                       "tokenizer_fingerprint": self.tok_fp,
                       "token_cache_fingerprint": self.cache_fp}
        path = save_checkpoint(self.accelerator, self.out, st.step, train_state,
                               {"loader": self.loader.state_dict(), "meter": self.meter.state_dict()},
                               keep_last=self.cfg.keep_last)
        self.saved_step = st.step
        self.logger.info(f"checkpoint saved: {path}")
        return path

    def train(self, stop) -> None:
        """Epochs of the engine until ``total_steps`` optimizer steps are done (kNN health and pictures beside);
        ``stop`` (``beit.runtime.stopping``) ends it after a step with that step's checkpoint."""
        from beit.engines.knn import build_knn_health
        from beit.engines.pretrain import train_one_epoch
        from beit.runtime.estimate import TimeEstimate
        from beit.runtime.run_logging import data_error_metrics

        cfg, acc, state, loader, meter = self.cfg, self.accelerator, self.state, self.loader, self.meter
        self.health = health = build_knn_health(cfg, acc, self.logger, self.total_steps)
        estimate = TimeEstimate(self.total_steps, self.logger.info,
                                extra=", plus the held-out evaluation" if self.inputs.val_shards else "")

        def after_step(st) -> None:
            estimate(st.step)
            if health is not None:
                health(acc.unwrap_model(self.model), st.step)
            self.checkpoint(st)
            stop.check(acc, st.step, lambda: self.checkpoint(st, stopping=True))

        if health is not None and state.step == 0:
            health(acc.unwrap_model(self.model), 0)  # the random encoder: what the metric must rise above
        pictures = None
        if self.logger.trackers and cfg.log_images_every:
            from beit.runtime.train_pictures import TrainingPictures
            pictures = TrainingPictures(self.logger, self.tokenizer, cfg.log_images_every,
                                        vocab_size=self.inputs.vocab_size)
        self.t_start, self.time_before = time.time(), state.train_seconds
        eff_batch = cfg.batch_size * self.inputs.grad_accum_steps * acc.num_processes
        with self.logger.progress(self.total_steps, initial=state.step, images_per_step=eff_batch) as bar:
            while state.step < self.total_steps:
                loader.set_epoch(state.epoch)
                train_one_epoch(self.model, self.tokenizer, loader, self.optimizer, self.schedule, acc, state,
                                total_steps=self.total_steps, clip_grad=cfg.clip_grad,
                                max_nonfinite_in_a_row=cfg.max_nonfinite_steps, log_every=cfg.log_every,
                                logger=self.logger, after_step=after_step, progress=bar, meter=meter,
                                pictures=pictures, data_stats=lambda: data_error_metrics(loader, acc))
                if state.step < self.total_steps:
                    state.epoch += 1

    def finish(self) -> dict:
        """pretrained.safetensors, the held-out masked-token evaluation, final_metrics.json; the summary."""
        from beit.checkpoints.checkpointing import save_weights
        from beit.data.loading.data_stats import describe_reads
        from beit.data.pipelines.pretraining import build_mim_loader
        from beit.engines.pretrain import evaluate_mim, learning_of
        from beit.runtime.run_logging import data_error_metrics

        cfg, acc, state, out = self.cfg, self.accelerator, self.state, self.out
        summary = {"step": state.step, "epoch": state.epoch, "nonfinite_steps": state.nonfinite_steps,
                   "train_seconds": round(state.train_seconds, 1), "output_dir": str(out)}
        summary.update(data_error_metrics(self.loader, acc))
        if self.health is not None:
            summary.update(self.health.summary(summary["train_seconds"]))
        unwrapped = acc.unwrap_model(self.model)
        full_state = acc.get_state_dict(self.model)  # a collective under FSDP/DeepSpeed
        if acc.is_main_process:
            weights = save_weights(full_state, out / "pretrained.safetensors",
                                   {"model": unwrapped.config, "tokenizer": cfg.tokenizer,
                                    "tokenizer_path": cfg.tokenizer_path, "tokenizer_fingerprint": self.tok_fp,
                                    "token_cache": cfg.token_cache, "token_cache_fingerprint": self.cache_fp,
                                    "step": state.step, "pretrain_config": to_dict(cfg)})
            summary["pretrained"] = str(weights)
        if self.inputs.val_shards:
            val_loader = build_mim_loader(cfg, self.inputs.val_shards, self.tokenizer, acc, train=False,
                                          batch_size=cfg.eval_batch_size or cfg.batch_size, masker=self.inputs.masker)
            ev = evaluate_mim(unwrapped, self.tokenizer, val_loader, acc, max_batches=cfg.eval_batches)
            summary.update({f"val/{k}": v for k, v in ev.items()})
            self.logger.log({f"val/{k}": v for k, v in ev.items()}, step=state.step)
            if "mim_acc" in ev:
                cls_pt = f" (CLS-pretraining branch {ev['cls_pt_mim_acc']:.4f})" if "cls_pt_mim_acc" in ev else ""
                self.logger.info(f"held-out masked-token accuracy {ev['mim_acc']:.4f}{cls_pt} vs majority-token "
                                 f"baseline {ev['majority_acc']:.4f} ({ev['tokens']} masked tokens in {ev['images']} "
                                 "images"
                                 + (f"; {ev['bad_images']} undecodable images left out)" if ev["bad_images"] else ")"))
        last = self.logger.last_logged
        summary.update({f"train/{k}": last[k] for k in ("loss", "mim_acc", "majority_acc", "cls_pt_loss",
                                                         "cls_pt_mim_acc") if k in last})
        summary.update(learning_of(summary, last))
        if acc.is_main_process:
            (out / "final_metrics.json").write_text(json.dumps(summary, indent=1))
        cls_pt = f" (CLS-pretraining branch {last['cls_pt_mim_acc']:.3f})" if "cls_pt_mim_acc" in last else ""
        train = (f"last logged training loss {last['loss']:.4f}, masked-token accuracy {last['mim_acc']:.3f}{cls_pt} "
                 f"vs majority {last['majority_acc']:.3f}" if "mim_acc" in last else "no training metrics logged")
        self.logger.info(f"finished: {state.step} steps, {state.epoch + 1} epoch(s), {summary['train_seconds']:.0f} s "
                         f"training; {train}; held-out: "
                         + (f"{summary['val/mim_acc']:.4f}" if "val/mim_acc" in summary else "none")
                         + f"  ->  {out}/final_metrics.json, {out}/pretrained.safetensors")
        reads = describe_reads(summary, cfg.image_size)
        if reads:
            self.logger.info(reads)
        for warning in summary.get("warnings", []):
            self.logger.info(f"warning: {warning}")
        self.logger.finish(summary, state.step, files=("config.yaml", "final_metrics.json"))
        acc.end_training()
        return summary
