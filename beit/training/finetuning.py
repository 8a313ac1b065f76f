"""A whole fine-tune run: hold the run folder, resolve the data and classes, build the task's model, resume, run the
engine epoch after epoch with held-out evaluation and checkpoints, write the results and the export.

``run_finetuning(cfg)`` is what ``beit finetune`` / ``beit distill`` / ``beit/finetune.py`` run (and ``beit
compare``). What differs between classification, segmentation and distillation is the task's (beit.tasks);
what differs between encoders is the backbone's (beit.modeling.backbones).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from beit.config import save_config, to_dict
from beit.options.finetune import RESUME_KEYS, FinetuneConfig


def run_finetuning(cfg: FinetuneConfig) -> dict:
    """Train, evaluate, checkpoint/resume, and write the final results; returns the final metrics.
    One run per output_dir (a lock); the resume checkpoint is verified (damaged ones moved aside)."""
    from beit.runtime.run_lock import end_with_launcher, open_run
    from beit.runtime.stopping import stop_signals
    from beit.runtime.trackers import check_trackers

    cfg.apply_threads()
    end_with_launcher()
    check_trackers(cfg.trackers())        # before any compute: a tracker that cannot work stops the run here
    with stop_signals() as stop, open_run(cfg.output_dir, resume=cfg.resume) as latest:
        run = FinetuneRun(cfg, latest)        # data, classes, the task's model, optimizer, loaders, resume checks
        run.restore(latest)
        run.train(stop)                       # the engine, epoch after epoch: evaluation, checkpoints, a stop
        return run.finish()                   # final.json, the task's export and pictures


def plan_folders(cfg: FinetuneConfig):
    """``--data`` (class folders) and ``--val_data`` listed and checked, nothing written yet: (train plan, held-out
    plan or None), or None without ``--data``. The held-out part is ``--val_fraction`` of each class unless
    ``--val_data`` / ``--val_shards`` name the held-out data; ``--val_data`` takes the training classes."""
    if not cfg.data:
        return None
    train = cfg.data_plan()
    held = dataclasses.replace(cfg, data=cfg.val_data).folder_plan(labelled=True, hold_out=False,
                                                                   label_map=train.label_map) if cfg.val_data else None
    return train, held


def resolve_folders(cfg: FinetuneConfig, plans, log=print) -> tuple[FinetuneConfig, str]:
    """The planned folders written into the cache (or reused) and held for this run: the config with their shards,
    and what the held-out images are (for the confusion matrix and final.json)."""
    held_out = held_out_name(cfg)
    if plans is None:
        return cfg, held_out
    train, held = plans
    found = train.shards(log=log)
    log(f"--data {cfg.data}: {found.describe()}")
    val = cfg.val_shards
    if found.val:
        val, held_out = found.val, f"{cfg.data}: {found.held_out}"
    if held is not None:
        held_found = held.shards(log=log)
        log(f"--val_data {cfg.val_data}: {held_found.describe()}")
        val = held_found.train
    return dataclasses.replace(cfg, train_shards=found.train, val_shards=val), held_out


def held_out_name(cfg: FinetuneConfig) -> str:
    """The held-out images as the user named them: --val_data's folder or --val_shards' spec."""
    if cfg.val_data:
        return f"--val_data {cfg.val_data}"
    spec = ", ".join(cfg.val_shards)
    return spec if len(spec) <= 60 else spec[:57] + "..."


def saved_options(saved: dict) -> dict:
    """A checkpoint's saved options as today's config reads them (old names and types included)."""
    from beit.config import apply_aliases, from_dict
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    saved = {k: v for k, v in apply_aliases(FinetuneConfig, dict(saved), "the checkpoint").items() if k in known}
    return to_dict(from_dict(FinetuneConfig, saved, source="the checkpoint's config"))


def check_resume_schedule(train_state: dict, cfg, world: int, total_steps: int, where: str) -> None:
    """A run may resume on another process count or micro-batch size, but only with the same global
    batch (images per optimizer step) and the same number of optimizer steps: the lr schedule and
    the optimizer state were built for them."""
    saved = train_state["config"]
    saved_world = int(train_state.get("world_size", 1))
    before = saved["batch_size"] * saved["grad_accum_steps"] * saved_world
    now = cfg.batch_size * cfg.grad_accum_steps * world
    if before != now:
        raise ValueError(
            f"cannot resume {where}: it was trained with a global batch of {before} images per optimizer step "
            f"({saved['batch_size']} x {saved['grad_accum_steps']} accum x {saved_world} process(es)), this run "
            f"has {now} ({cfg.batch_size} x {cfg.grad_accum_steps} x {world}); pass --global_batch_size {before}")
    if "total_steps" in train_state and int(train_state["total_steps"]) != total_steps:
        raise ValueError(
            f"cannot resume {where}: it was planned for {train_state['total_steps']} optimizer steps, this run for "
            f"{total_steps} (--batches_per_epoch counts micro-batches per process: scale it with the process count "
            f"and micro-batch size, or leave it 0 for one pass over the shards)")


class FinetuneRun:
    """The pieces of one fine-tune run."""

    def __init__(self, cfg: FinetuneConfig, latest: Path | None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from beit.checkpoints.checkpointing import TRAIN_STATE, check_resume_compatible
        from beit.data.pipelines.labelled import check_shards, resolve_classes
        from beit.modeling.backbones import backbone_for
        from beit.runtime.precision import resolve_mixed_precision
        from beit.runtime.run_lock import world_size
        from beit.runtime.scaling import accelerator_kwargs_handlers, grad_accum_for, refuse_under_fsdp
        from beit.tasks import get_task

        self.out, self.task = Path(cfg.output_dir), get_task(cfg.task)
        if cfg.global_batch_size:  # keep the global batch for any process count (lr is not rescaled)
            cfg = dataclasses.replace(cfg, grad_accum_steps=grad_accum_for(cfg.global_batch_size, cfg.batch_size,
                                                                           world_size()))
        self.accelerator = acc = Accelerator(
            mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
            gradient_accumulation_steps=cfg.grad_accum_steps, project_dir=str(self.out),
            kwargs_handlers=accelerator_kwargs_handlers(cfg.dist_timeout_s))
        refuse_under_fsdp(acc.distributed_type, "fine-tuning's evaluation and export",
                          "fine-tune with DDP (launch/accelerate/8gpu.yaml, plus --grad_checkpointing true for ViT-L)")
        set_seed(cfg.seed)
        folders = plan_folders(cfg)  # --data folders are checked here and written once every other check has passed
        check_shards(cfg, ("train_shards", "val_shards", *self.task.shard_options(cfg)))  # before any model
        self.num_classes, self.class_names = resolve_classes(cfg.train_shards, cfg.val_shards, cfg.num_classes,
                                                             manifest=cfg.manifest,
                                                             allow_remote=cfg.allow_remote_shards,
                                                             folder=folders[0] if folders else None)
        cfg = dataclasses.replace(cfg, num_classes=self.num_classes)
        self.saved = json.loads((latest / TRAIN_STATE).read_text()) if latest else None
        self.early_log: list[str] = []  # build messages, logged once the logger exists (after the resume checks)
        model = self.task.build_model(cfg, self.num_classes, log=self.early_log.append)
        if cfg.grad_checkpointing:
            (model.encoder if cfg.linear_probe else model).set_grad_checkpointing(True)
        # the options the model was really built with (its dims may come from --init) go into config.yaml
        cfg = dataclasses.replace(cfg, **backbone_for(cfg.model).built_options(cfg, model))
        if self.saved is not None:  # before anything of this run is written
            check_resume_compatible(saved_options(self.saved["config"]), to_dict(cfg), RESUME_KEYS, where=str(self.out))
        model = self.task.prepare(model, acc)
        cfg, self.held_out = resolve_folders(cfg, folders, log=lambda m: print(m, flush=True) if acc.is_main_process
                                             else None)
        self.cfg = cfg
        set_seed(cfg.seed + acc.process_index)  # mixup / drop path differ per rank
        self.train_loader, self.val_loader = self.task.loaders(cfg, acc, self.num_classes)
        self.teacher = self.task.teacher(cfg, self.num_classes, acc)
        self.steps_per_epoch = len(self.train_loader) // cfg.grad_accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(f"an epoch has {len(self.train_loader)} batches, fewer than grad_accum_steps="
                             f"{cfg.grad_accum_steps}: lower --batch_size or --grad_accum_steps")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if self.saved is not None:
            check_resume_schedule(self.saved, cfg, acc.num_processes, self.total_steps, where=str(self.out))
        self.model = model

    def build_optimizer(self, log) -> None:
        from beit.optim import create_adamw, create_schedule, warmup_for
        cfg = self.cfg
        self.warmup = warmup_for(self.steps_per_epoch, self.total_steps, cfg.warmup_epochs, cfg.warmup_steps, log=log)
        optimizer = create_adamw(self.task.param_groups(cfg, self.model), lr=cfg.lr)
        self.schedule = create_schedule(cfg.lr_schedule, optimizer, lr=cfg.lr, min_lr=cfg.min_lr,
                                        total_steps=self.total_steps, warmup_steps=self.warmup,
                                        weight_decay=cfg.weight_decay)
        self.criterion, self.mixup_fn = self.task.criterion(cfg, self.num_classes)
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.ema = None
        if cfg.model_ema:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.accelerator.unwrap_model(self.model), decay=cfg.model_ema_decay)
            self.accelerator.register_for_checkpointing(self.ema)

    def restore(self, latest: Path | None) -> None:
        """The logger, config.yaml, the optimizer and schedule, and the state of ``latest``."""
        from beit.checkpoints.checkpointing import load_checkpoint
        from beit.engines.finetune import new_epoch_sums
        from beit.runtime.run_logging import RunLogger

        cfg, acc = self.cfg, self.accelerator
        self.logger = RunLogger(acc, self.out, resume_step=self.saved["step"] if self.saved else None, cfg=cfg)
        for line in filter(None, [self.task.describe(cfg), *self.early_log]):
            self.logger.info(line)
        if acc.is_main_process:
            save_config(cfg, self.out / "config.yaml")
        self.build_optimizer(self.logger.info)
        self.step, self.start_epoch, self.epoch_sums = 0, 0, new_epoch_sums()
        self.saved_step = None
        if latest is not None:
            train_state, rank_state = load_checkpoint(acc, latest)
            self.schedule.load_state_dict(train_state["schedule"])
            self.step, self.start_epoch = int(train_state["step"]), int(train_state["epoch"])
            self.saved_step = self.step
            if rank_state is not None:
                self.train_loader.load_state_dict(rank_state["loader"])
            if train_state.get("mid_epoch"):
                self.epoch_sums.update(train_state.get("epoch_sums", {}))
            where = "mid-epoch, " if train_state.get("mid_epoch") else ""
            self.logger.info(f"resumed from {latest} (epoch {self.start_epoch}, {where}step {self.step})")
        self.log_start()

    def log_start(self) -> None:
        from beit.runtime.run_logging import data_summary
        from beit.runtime.scaling import describe_scaling

        cfg, acc, log = self.cfg, self.accelerator, self.logger.info
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        for line in data_summary(self.train_loader, cfg.batch_size, acc.num_processes) + [cfg.describe_workers()]:
            log(line)
        names = self.class_names
        names = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") if names else "no names"
        log(f"classes: {self.num_classes} ({names}); held-out: "
            + (f"{', '.join(cfg.val_shards)}" if self.val_loader is not None else "none (no top-1; pass --val_shards, "
               "or --data with --val_fraction > 0)"))
        log(f"model: {cfg.model}{' linear probe' if cfg.linear_probe else ''}, {n_train / 1e6:.2f}M trainable "
            f"params, init {cfg.init or 'scratch'}; device {acc.device}, {acc.num_processes} process(es), mixed "
            f"precision {acc.mixed_precision}")
        log(describe_scaling(cfg.batch_size, cfg.grad_accum_steps, acc.num_processes, cfg.lr,
                             "not rescaled; global batch kept by gradient accumulation" if cfg.global_batch_size
                             else "not rescaled; set global_batch_size to keep the global batch") +
            f"; {self.total_steps} optimizer steps ({self.steps_per_epoch}/epoch x {cfg.epochs} epochs), warmup "
            f"{self.warmup}; data order {cfg.data_order}")
        extra = f", {self.task.outputs}" if self.val_loader is not None and self.task.outputs else ""
        log(f"outputs: {self.out}/ (config.yaml, metrics.jsonl, checkpoints/, final.json, model.safetensors{extra})")

    def save(self, step: int, epoch: int, mid_epoch: bool, stopping: bool = False) -> Path:
        """The checkpoint of ``step`` (a stop right after a save reuses it); returns its path."""
        from beit.checkpoints.checkpointing import checkpoint_path, save_checkpoint
        from beit.engines.finetune import new_epoch_sums
        if stopping and self.saved_step == step:
            return checkpoint_path(self.out, step)
        path = save_checkpoint(self.accelerator, self.out, step,
                               {"epoch": epoch, "mid_epoch": mid_epoch, "schedule": self.schedule.state_dict(),
                                "config": to_dict(self.cfg), "total_steps": self.total_steps,
                                "epoch_sums": dict(self.epoch_sums) if mid_epoch else new_epoch_sums()},
                               rank_state={"loader": self.train_loader.state_dict()}, keep_last=self.cfg.keep_last)
        self.saved_step = step
        self.logger.info(f"checkpoint saved: {path}")
        return path

    def train(self, stop) -> None:
        """Epochs of the engine; held-out evaluation every ``eval_every`` epochs and at the last; ``stop``
        (``beit.runtime.stopping``) ends it after a step with that step's checkpoint (mid-epoch, even at an
        epoch's last step: the resumed run then evaluates and saves that epoch's end as this one would have)."""
        from beit.engines.finetune import new_epoch_sums, train_one_epoch
        from beit.runtime.estimate import TimeEstimate
        from beit.runtime.run_logging import data_error_metrics

        cfg, acc = self.cfg, self.accelerator
        self.results, self.train_stats = {}, {}
        epoch = self.start_epoch
        estimate = TimeEstimate(self.total_steps, self.logger.info,
                                extra=", plus the held-out evaluations" if self.val_loader is not None else "")

        def on_step(s: int, metrics: dict) -> None:
            estimate(s)
            if s % cfg.log_every == 0 or s == self.total_steps:
                self.logger.log(metrics, step=s)
            if s % cfg.checkpoint_every == 0 and s % self.steps_per_epoch:  # epoch ends save after their evaluation
                self.save(s, epoch, mid_epoch=True)
            stop.check(acc, s, lambda: self.save(s, epoch, mid_epoch=True, stopping=True))

        eff_batch = cfg.batch_size * cfg.grad_accum_steps * acc.num_processes
        with self.logger.progress(total=self.total_steps, initial=self.step, desc="finetune",
                                   images_per_step=eff_batch) as bar:  # closed on a stop too, before its line
            for epoch in range(self.start_epoch, cfg.epochs):
                self.train_loader.set_epoch(epoch)
                self.step, self.train_stats = train_one_epoch(
                    self.model, self.train_loader, self.optimizer, self.schedule, acc, self.criterion, epoch=epoch,
                    step=self.step, max_steps=(epoch + 1) * self.steps_per_epoch, mixup_fn=self.mixup_fn, ema=self.ema,
                    clip_grad=cfg.clip_grad, on_step=on_step, progress=bar, teacher=self.teacher, sums=self.epoch_sums)
                self.epoch_sums = new_epoch_sums()
                record = {"epoch": epoch + 1, **self.train_stats, **data_error_metrics(self.train_loader, acc)}
                last = epoch + 1 == cfg.epochs
                if self.val_loader is not None and (last or (epoch + 1) % cfg.eval_every == 0):
                    self.results = self.evaluate()
                    record.update({f"val_{k}": v for k, v in self.results.items()
                                   if not k.endswith("confusion") and not isinstance(v, list)})
                self.logger.info(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in record.items()
                                                                    if isinstance(v, float)))
                self.logger.log(record, step=self.step)
                if last or self.step % cfg.checkpoint_every == 0:
                    self.save(self.step, epoch + 1, mid_epoch=False)

    def evaluate(self) -> dict:
        return self.task.evaluate(self.model, self.ema, self.val_loader, self.accelerator, self.num_classes, self.cfg)

    def finish(self) -> dict:
        """final.json (and confusion.json), the task's export; returns the held-out results."""
        from beit.data.loading.data_stats import describe_reads
        from beit.runtime.run_logging import data_error_metrics

        cfg, acc, out, step = self.cfg, self.accelerator, self.out, self.step
        results = self.results
        if not results and self.val_loader is not None:  # resumed after the last epoch: evaluate the restored weights
            results = self.evaluate()
        reads = describe_reads(data_error_metrics(self.train_loader, acc), cfg.image_size)  # a collective
        if acc.is_main_process:
            final = {k: v for k, v in results.items() if not k.endswith("confusion")}
            final.update(step=step, epochs=cfg.epochs, num_classes=self.num_classes, class_names=self.class_names,
                         train_loss=self.train_stats.get("train_loss"), held_out=self.val_loader is not None,
                         held_out_set=self.held_out if self.val_loader is not None else "")
            if "confusion" in results:
                (out / "confusion.json").write_text(json.dumps(results["confusion"]))
            (out / "final.json").write_text(json.dumps(final, indent=1))
            scores = self.task.finish(acc.unwrap_model(self.model), out, cfg, results, final, self.class_names)
            loss = final["train_loss"]
            written = [f"{out}/final.json"] + ([f"{out}/{self.task.outputs}"] if results and self.task.outputs else [])
            self.logger.info(f"final: {scores}; {self.num_classes} classes; {step} steps, last epoch's train loss "
                             + (f"{loss:.4f}" if loss is not None else "n/a") + " ->  " + ", ".join(written)
                             + f", {out}/model.safetensors ({self.task.export_format})")
            if reads:
                self.logger.info(reads)
            self.logger.finish(final, step, files=("config.yaml", "final.json", "confusion.json",
                                                   *([self.task.outputs] if self.task.outputs else [])))
        acc.wait_for_everyone()
        acc.end_training()
        return results or {"train_loss": self.train_stats.get("train_loss"), "step": step,
                           "num_classes": self.num_classes}
