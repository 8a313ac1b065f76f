"""Fine-tune a BEiT encoder (or any timm model) for image classification on WebDataset shards.

    beit finetune --data my_labelled/ --init runs/pretrain/pretrained.safetensors   # class folders, 20% held out
    beit finetune --config beit_base_in1k --init runs/pretrain/pretrained.safetensors \
        --train_shards 'in1k/train-{000000..001023}.tar' --val_shards 'in1k/val-{000000..000049}.tar'
    accelerate launch beit/finetune.py ...            # same flags on 1..N GPUs
    python -m beit.finetune ... --linear_probe true --probe_block 9
    python -m beit.finetune ... --model swin_tiny_patch4_window7_224   # a timm baseline

Recipe (BEiT): AdamW, warmup + per-step cosine, layer-wise lr decay, drop path, Mixup/CutMix with
label smoothing, RandAugment + random erasing, mean pooling + fc_norm, head init scale, optional EMA.
Writes metrics.jsonl, checkpoints (resumed automatically), final.json, confusion_matrix.png and
the fine-tuned weights (``model.safetensors`` + JSON, loadable by timm; see beit/export/timm_export.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from beit.config import parse_config, save_config, to_dict
from beit.modeling.build import build_model
from beit.options.finetune import RESUME_KEYS, FinetuneConfig


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


def build_optimizer(cfg: FinetuneConfig, model, total_steps: int, warmup_steps: int):
    from beit.modeling.classifier import layer_decay_param_groups
    from beit.optim import WarmupCosineSchedule, create_adamw, param_groups_weight_decay
    if cfg.linear_probe:
        groups = param_groups_weight_decay(model, cfg.weight_decay)
    elif cfg.task == "distill":  # the student is trained from scratch: no layer-wise lr decay
        groups = layer_decay_param_groups(model, cfg.weight_decay, 1.0)
    elif cfg.task == "segmentation":
        from beit.modeling.segmenter import seg_layer_decay_groups
        groups = seg_layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay)
    else:
        groups = layer_decay_param_groups(model, cfg.weight_decay, cfg.layer_decay)
    optimizer = create_adamw(groups, lr=cfg.lr)
    schedule = WarmupCosineSchedule(optimizer, lr=cfg.lr, min_lr=cfg.min_lr, total_steps=total_steps,
                                    warmup_steps=warmup_steps, weight_decay=cfg.weight_decay)
    return optimizer, schedule


def build_criterion(cfg: FinetuneConfig, num_classes: int):
    """(loss, mixup_fn): SoftTargetCrossEntropy with Mixup/CutMix (which smooths the labels itself),
    else label-smoothed cross-entropy."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if cfg.task == "segmentation":
        from beit.modeling.segmenter import SegLoss
        return SegLoss(cfg.seg_aux_weight), None
    if cfg.task == "distill":
        from beit.modeling.distill import DistillLoss
        return DistillLoss(cfg.distill_temperature, cfg.distill_alpha, cfg.label_smoothing), None
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
                      num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing), None
    return torch.nn.CrossEntropyLoss(), None


def logger_free_print(accelerator):
    """A print for the main process, before the run's logger exists."""
    return lambda msg: print(msg, flush=True) if accelerator.is_main_process else None


def resolve_folders(cfg: FinetuneConfig, log=print) -> FinetuneConfig:
    """``--data`` (class folders) -> labelled shards written once into the cache, with a held-out
    part (``--val_fraction``) unless ``--val_data`` / ``--val_shards`` name the held-out data."""
    if not cfg.data:
        return cfg
    from beit.data.storage.folder_cache import folder_shards

    own_val = not (cfg.val_data or cfg.val_shards)
    found = folder_shards(cfg.data, labelled=cfg.task == "classification", val_fraction=cfg.val_fraction if own_val
                          else 0.0, seed=cfg.seed, cache=cfg.data_cache, log=log)
    log(f"--data {cfg.data}: {found.describe()}" + (f"; {cfg.val_fraction:.0%} of each class held out"
                                                   if own_val and found.val else ""))
    val = found.val if own_val else cfg.val_shards
    if cfg.val_data:
        held = folder_shards(cfg.val_data, labelled=True, cache=cfg.data_cache, log=log)
        log(f"--val_data {cfg.val_data}: {held.describe()}")
        val = held.train
    return dataclasses.replace(cfg, train_shards=found.train, val_shards=val)


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Train, evaluate, checkpoint/resume, and write the final results; returns the final metrics.
    One run per output_dir (a lock); the resume checkpoint is verified (damaged ones moved aside)."""
    from beit.checkpoints.integrity import remove_stale_temp, select_resume
    from beit.runtime.run_lock import end_with_launcher, hold_output_dir

    end_with_launcher()
    rank0 = os.environ.get("RANK", "0") == "0"
    with hold_output_dir(cfg.output_dir, is_main=rank0):
        latest = None
        if cfg.resume:
            if rank0:
                remove_stale_temp(cfg.output_dir)
            log = (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True)) if rank0 else (lambda m: None)
            latest = select_resume(cfg.output_dir, move_aside=rank0, log=log)
        return _run(cfg, latest)


def _run(cfg: FinetuneConfig, latest: Path | None) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from beit.checkpoints.checkpointing import TRAIN_STATE, check_resume_compatible, load_checkpoint, save_checkpoint
    from beit.engines.finetune import new_epoch_sums, save_confusion_png, train_one_epoch
    from beit.export.timm_export import export_model
    from beit.data.pipelines.labelled import build_loaders, check_shards, resolve_classes
    from beit.optim.schedules import warmup_for
    from beit.runtime.precision import resolve_mixed_precision
    from beit.runtime.run_logging import TENSORBOARD_RUN, RunLogger, data_error_metrics, data_summary, resolve_trackers
    from beit.runtime.scaling import accelerator_kwargs_handlers, describe_scaling, grad_accum_for, refuse_under_fsdp

    out = Path(cfg.output_dir)
    if cfg.global_batch_size:  # keep the global batch for any process count (lr is not rescaled)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = dataclasses.replace(cfg, grad_accum_steps=grad_accum_for(cfg.global_batch_size, cfg.batch_size, world))
    trackers = resolve_trackers(cfg.tensorboard)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
                              gradient_accumulation_steps=cfg.grad_accum_steps,
                              log_with=trackers or None, project_dir=str(out),
                              kwargs_handlers=accelerator_kwargs_handlers(cfg.dist_timeout_s))
    refuse_under_fsdp(accelerator.distributed_type, "fine-tuning's evaluation and export",
                      "fine-tune with DDP (launch/accelerate/8gpu.yaml, plus --grad_checkpointing true for ViT-L)")
    set_seed(cfg.seed)
    cfg = resolve_folders(cfg, log=logger_free_print(accelerator))
    check_shards(cfg)  # missing / empty shard specs fail here, before any model is built
    num_classes, class_names = resolve_classes(cfg.train_shards, cfg.val_shards, cfg.num_classes)
    cfg = dataclasses.replace(cfg, num_classes=num_classes)
    saved = json.loads((latest / TRAIN_STATE).read_text()) if latest else None
    early_log: list[str] = []  # build messages, logged once the logger exists (after the resume checks)
    model = build_model(cfg, num_classes, log=early_log.append)
    if cfg.grad_checkpointing:
        (model.encoder if cfg.linear_probe else model).set_grad_checkpointing(True)
    if cfg.model == "beit":  # record the dims actually built (they may come from --init)
        enc = model.encoder if cfg.linear_probe else model.backbone if cfg.task == "segmentation" else model
        attn = enc.blocks[0].attn
        position = {(False, True): "relative", (True, False): "absolute", (True, True): "both", (False, False): "none"}[
            (enc.pos_embed is not None, attn.relative_position_bias_table is not None)]
        cfg = dataclasses.replace(cfg, embed_dim=enc.embed_dim, depth=len(enc.blocks), num_heads=attn.num_heads,
                                  mlp_ratio=enc.blocks[0].mlp.fc1.out_features / enc.embed_dim, position=position,
                                  init_values=cfg.init_values if enc.blocks[0].gamma_1 is not None else 0.0)
    if saved is not None:  # before anything of this run is written
        saved_cfg = dict(saved["config"])
        if "img_size" in saved_cfg:  # a checkpoint from before the rename
            saved_cfg.setdefault("image_size", saved_cfg.pop("img_size"))
        check_resume_compatible(saved_cfg, to_dict(cfg), RESUME_KEYS, where=str(out))
    if cfg.task == "segmentation" and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm statistics over all ranks
    set_seed(cfg.seed + accelerator.process_index)  # mixup / drop path differ per rank
    train_loader, val_loader = build_loaders(cfg, accelerator, num_classes)
    teacher = None
    if cfg.task == "distill":
        from beit.data.pipelines.distillation import PairedLoader, build_unlabelled_loader
        from beit.data.pipelines.labelled import build_transforms
        from beit.modeling.distill import load_teacher
        teacher = load_teacher(cfg.teacher, num_classes=num_classes, mean=cfg.mean, std=cfg.std).to(accelerator.device)
        train_loader = PairedLoader(train_loader, build_unlabelled_loader(cfg, accelerator, build_transforms(cfg, True)))
        distill_note = (f"distilling {cfg.teacher} into {cfg.model}: temperature {cfg.distill_temperature:g}, hard-label "
                    f"weight {cfg.distill_alpha:g}; each batch {cfg.batch_size} labelled + "
                    f"{cfg.unlabelled_batch_size or cfg.batch_size} unlabelled images ({cfg.unlabelled_shards})")
    steps_per_epoch = len(train_loader) // cfg.grad_accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch has {len(train_loader)} batches, fewer than grad_accum_steps="
                         f"{cfg.grad_accum_steps}: lower --batch_size or --grad_accum_steps")
    total_steps = steps_per_epoch * cfg.epochs
    if saved is not None:
        check_resume_schedule(saved, cfg, accelerator.num_processes, total_steps, where=str(out))
    logger = RunLogger(accelerator, out, resume_step=saved["step"] if saved else None)
    if teacher is not None:
        logger.info(distill_note)
    for line in early_log:
        logger.info(line)
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
    warmup = warmup_for(steps_per_epoch, total_steps, cfg.warmup_epochs, cfg.warmup_steps, log=logger.info)
    optimizer, schedule = build_optimizer(cfg, model, total_steps, warmup)
    criterion, mixup_fn = build_criterion(cfg, num_classes)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.model_ema_decay)
        accelerator.register_for_checkpointing(ema)

    step, start_epoch = 0, 0
    epoch_sums = new_epoch_sums()
    if latest is not None:
        train_state, rank_state = load_checkpoint(accelerator, latest)
        schedule.load_state_dict(train_state["schedule"])
        step, start_epoch = int(train_state["step"]), int(train_state["epoch"])
        if rank_state is not None:
            train_loader.load_state_dict(rank_state["loader"])
        if train_state.get("mid_epoch"):
            epoch_sums.update(train_state.get("epoch_sums", {}))
        where = "mid-epoch, " if train_state.get("mid_epoch") else ""
        logger.info(f"resumed from {latest} (epoch {start_epoch}, {where}step {step})")
    if trackers:
        accelerator.init_trackers(TENSORBOARD_RUN, config={k: v for k, v in to_dict(cfg).items()
                                                           if isinstance(v, (int, float, str, bool))})
    eff_batch = cfg.batch_size * cfg.grad_accum_steps * accelerator.num_processes
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for line in data_summary(train_loader, cfg.batch_size, accelerator.num_processes):
        logger.info(line)
    names = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "") if class_names else "no names"
    logger.info(f"classes: {num_classes} ({names}); held-out: "
                + (f"{cfg.val_shards}" if val_loader is not None else "none (no top-1; pass --val_shards, or "
                   "--data with --val_fraction)"))
    logger.info(f"model: {cfg.model}{' linear probe' if cfg.linear_probe else ''}, {n_train / 1e6:.2f}M trainable "
                f"params, init {cfg.init or 'scratch'}; device {accelerator.device}, {accelerator.num_processes} "
                f"process(es), mixed precision {accelerator.mixed_precision}")
    logger.info(describe_scaling(cfg.batch_size, cfg.grad_accum_steps, accelerator.num_processes, cfg.lr,
                                 "not rescaled; global batch kept by gradient accumulation" if cfg.global_batch_size
                                 else "not rescaled; set global_batch_size to keep the global batch") +
                f"; {total_steps} optimizer steps ({steps_per_epoch}/epoch x {cfg.epochs} epochs), warmup {warmup}; "
                f"data order {cfg.data_order}")
    logger.info(f"outputs: {out}/ (config.yaml, metrics.jsonl, checkpoints/, final.json, model.safetensors"
                + (", confusion_matrix.png)" if val_loader is not None and cfg.task == "classification" else ")"))

    def save(s: int, epoch: int, mid_epoch: bool) -> None:
        path = save_checkpoint(accelerator, out, s,
                               {"epoch": epoch, "mid_epoch": mid_epoch, "schedule": schedule.state_dict(),
                                "config": to_dict(cfg), "total_steps": total_steps,
                                "epoch_sums": dict(epoch_sums) if mid_epoch else new_epoch_sums()},
                               rank_state={"loader": train_loader.state_dict()}, keep_last=cfg.keep_last)
        logger.info(f"checkpoint saved: {path}")

    epoch = start_epoch

    def on_step(s: int, metrics: dict) -> None:
        if s % cfg.log_every == 0 or s == total_steps:
            logger.log(metrics, step=s)
        if s % cfg.checkpoint_every == 0 and s % steps_per_epoch:  # epoch ends save after their evaluation
            save(s, epoch, mid_epoch=True)

    results: dict = {}
    bar = logger.progress(total=total_steps, initial=step, desc="finetune", images_per_step=eff_batch)
    train_stats: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch)
        step, train_stats = train_one_epoch(
            model, train_loader, optimizer, schedule, accelerator, criterion, epoch=epoch, step=step,
            max_steps=(epoch + 1) * steps_per_epoch, mixup_fn=mixup_fn, ema=ema, clip_grad=cfg.clip_grad,
            on_step=on_step, progress=bar, teacher=teacher, sums=epoch_sums)
        epoch_sums = new_epoch_sums()
        record = {"epoch": epoch + 1, **train_stats, **data_error_metrics(train_loader, accelerator)}
        last = epoch + 1 == cfg.epochs
        if val_loader is not None and (last or (epoch + 1) % cfg.eval_every == 0):
            results = _evaluate_all(model, ema, val_loader, accelerator, num_classes, cfg)
            record.update({f"val_{k}": v for k, v in results.items()
                           if not k.endswith("confusion") and not isinstance(v, list)})
        logger.info(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in record.items()
                                                      if isinstance(v, float)))
        logger.log(record, step=step)
        if last or step % cfg.checkpoint_every == 0:
            save(step, epoch + 1, mid_epoch=False)
    bar.close()
    if not results and val_loader is not None:  # resumed after the last epoch: evaluate the restored weights
        results = _evaluate_all(model, ema, val_loader, accelerator, num_classes, cfg)
    if accelerator.is_main_process:
        final = {k: v for k, v in results.items() if not k.endswith("confusion")}
        final.update(step=step, epochs=cfg.epochs, num_classes=num_classes, class_names=class_names,
                     train_loss=train_stats.get("train_loss"), held_out=val_loader is not None)
        if "confusion" in results:
            (out / "confusion.json").write_text(json.dumps(results["confusion"]))
        (out / "final.json").write_text(json.dumps(final, indent=1))
        if cfg.task == "segmentation":
            from beit.modeling.segmenter import export_seg_model
            export_seg_model(accelerator.unwrap_model(model), out / "model.safetensors", cfg,
                             metrics={k: v for k, v in final.items() if k != "per_class_iou"})
            scores = (f"mIoU {results['mIoU']:.2f}%  mAcc {results['mAcc']:.2f}%  aAcc {results['aAcc']:.2f}%"
                      if results else "no held-out data")
            logger.info(f"final: {scores}; {step} steps ->  {out}/final.json, {out}/model.safetensors")
        else:
            if results:
                save_confusion_png(results["confusion"], out / "confusion_matrix.png", class_names,
                                   title=f"{cfg.model} on {cfg.val_shards} (top-1 {results['top1']:.1f}%)")
            export_model(accelerator.unwrap_model(model), out / "model.safetensors", cfg, class_names=class_names,
                         metrics=final)
            scores = (f"top-1 {results['top1']:.2f}%  top-5 {results['top5']:.2f}% on {results['samples']} held-out "
                      "images" if results else "no held-out data (no top-1)")
            loss = final["train_loss"]
            logger.info(f"final: {scores}; {num_classes} classes; {step} steps, last epoch's train loss "
                        + (f"{loss:.4f}" if loss is not None else "n/a") + f" ->  {out}/final.json, "
                        + (f"{out}/confusion_matrix.png, " if results else "") + f"{out}/model.safetensors "
                        "(timm-loadable)")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results or {"train_loss": train_stats.get("train_loss"), "step": step, "num_classes": num_classes}


def _evaluate_all(model, ema, loader, accelerator, num_classes: int, cfg) -> dict:
    from beit.engines.finetune import evaluate
    if cfg.task == "segmentation":
        from beit.engines.seg import evaluate_seg
        return evaluate_seg(accelerator.unwrap_model(model), loader, accelerator, num_classes, cfg.image_size,
                            cfg.seg_stride or max(1, cfg.image_size * 2 // 3))
    # The unwrapped module: a DDP forward broadcasts buffers, a collective that ranks with fewer
    # held-out batches would not join (the job would hang).
    res = evaluate(accelerator.unwrap_model(model), loader, accelerator, num_classes)
    if ema is not None:
        res.update({f"ema_{k}": v for k, v in evaluate(ema.module, loader, accelerator, num_classes).items()})
    return res


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(FinetuneConfig, argv, description=__doc__)
    return run_finetune(cfg)


if __name__ == "__main__":
    from beit.runtime.faults import RunFault
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, PermissionError) as e:  # bad input (shards, checkpoint shapes): a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunFault as e:  # a fault during the run (non-finite state, damaged checkpoints, disk, lock)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
