"""Fine-tune a BEiT encoder (or any timm model) for image classification on WebDataset shards.

    python -m beit.finetune --config launch/finetune_base.yaml --init out/pretrained.safetensors \
        --train_shards 'in1k/train-{000000..001023}.tar' --val_shards 'in1k/val-{000000..000049}.tar'
    accelerate launch beit/finetune.py ...            # same flags on 1..N GPUs
    python -m beit.finetune ... --linear_probe true --probe_block 9
    python -m beit.finetune ... --model swin_tiny_patch4_window7_224   # a timm baseline

Recipe (BEiT): AdamW, warmup + per-step cosine, layer-wise lr decay, drop path, Mixup/CutMix with
label smoothing, RandAugment + random erasing, mean pooling + fc_norm, head init scale, optional EMA.
Writes metrics.jsonl, checkpoints (resumed automatically), final.json, confusion_matrix.png and
the fine-tuned weights (``model.safetensors`` + JSON, loadable by timm; see beit/export.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import torch

from beit.config import field, parse_config, save_config, to_dict


@dataclasses.dataclass
class FinetuneConfig:
    task: str = field("classification", help="classification | segmentation (image + seg.png shards, UperNet head, "
                                             "mIoU; --img_size is the crop)")
    # data
    train_shards: str = field("", help="training shards: path, brace pattern or comma list of WebDataset tars")
    val_shards: str = field("", help="held-out shards (never trained on) for top-1/top-5 and the confusion matrix")
    num_classes: int = field(0, help="number of classes; 0 = from the label_map in the shards' manifest.json")
    img_size: int = field(224, help="input resolution (rel-pos tables/patch embed are resized to it on load)")
    in_chans: int = field(3, help="input channels (images are decoded as RGB)")
    num_workers: int = field(2, help="data loader workers per process")
    mean: tuple[float, float, float] = field((0.485, 0.456, 0.406), help="normalisation mean (as in pretraining)")
    std: tuple[float, float, float] = field((0.229, 0.224, 0.225), help="normalisation std (as in pretraining)")
    # model
    model: str = field("beit", help="'beit' or any timm model name (swin_tiny_patch4_window7_224, mobilevit_s, "
                                     "deit_small_patch16_224, ...) for a baseline")
    model_size: str = field("base", help="BEiT size: tiny | small | base | large (see beit.model.BEIT_SIZES)")
    embed_dim: int = field(0, help="override the size's embedding dim (0 = from --init's weights, else model_size)")
    depth: int = field(0, help="override the size's depth (0 = from --init's weights, else model_size)")
    num_heads: int = field(0, help="override the size's heads (0 = from --init's weights, else model_size)")
    mlp_ratio: float = field(0.0, help="MLP width / embed_dim (0 = from --init's weights, else 4)")
    patch_size: int = field(16, help="patch size in px (--init's patch embedding is resampled to it)")
    init_values: float = field(0.1, help="layer-scale init (0.1 base, 1e-5 large; overwritten by loaded weights)")
    init: str = field("", help="weights to start from: our pretrained.safetensors / checkpoint dir, an official "
                               "BEiT .pth, timm weights; for --model <timm name> a timm weights file. Empty = scratch")
    init_key: str = field("", help="entry of a wrapping dict holding the weights (default: model/module/state_dict)")
    drop_path: float = field(0.1, help="stochastic depth rate")
    head_init_scale: float = field(0.001, help="the new head's weights are scaled by this")
    linear_probe: bool = field(False, help="freeze the encoder; train a linear head on pooled block features")
    probe_block: int = field(0, help="linear probe: features after this block (1-based; 0 = last)")
    # optimisation
    epochs: int = field(100, help="training epochs")
    batches_per_epoch: int = field(0, help="optimizer micro-batches per epoch per process (0 = one pass over the shards)")
    batch_size: int = field(64, help="per-process batch size")
    grad_accum_steps: int = field(1, help="micro-batches per optimizer step (ignored when global_batch_size is set)")
    global_batch_size: int = field(0, help="images per optimizer step over all processes; sets grad_accum_steps = "
                                   "global / (batch_size x processes) so the recipe holds for any process count")
    lr: float = field(4e-3, help="peak learning rate (layer scales multiply it)")
    min_lr: float = field(1e-6, help="final learning rate of the cosine")
    warmup_epochs: float = field(5.0, help="linear warmup length in epochs")
    weight_decay: float = field(0.05, help="AdamW weight decay (none on 1-d params, tokens, rel-pos tables)")
    layer_decay: float = field(0.65, help="layer-wise lr decay: scale = layer_decay ** (L + 1 - layer_id)")
    clip_grad: float = field(0.0, help="gradient norm clip (0 = off)")
    label_smoothing: float = field(0.1, help="label smoothing")
    mixup: float = field(0.8, help="mixup alpha (0 = off)")
    cutmix: float = field(1.0, help="cutmix alpha (0 = off)")
    mixup_prob: float = field(1.0, help="probability of applying mixup or cutmix to a batch")
    mixup_switch_prob: float = field(0.5, help="probability of cutmix instead of mixup when both are on")
    # augmentation
    auto_augment: str = field("rand-m9-mstd0.5-inc1", help="timm RandAugment spec ('' = off)")
    reprob: float = field(0.25, help="random erasing probability")
    color_jitter: float = field(0.4, help="colour jitter (timm ignores it when RandAugment is on)")
    crop_scale_min: float = field(0.08, help="RandomResizedCrop minimum area fraction")
    hflip: float = field(0.5, help="horizontal flip probability (use 0 for digits/text)")
    crop_pct: float = field(0.875, help="eval: resize to img_size/crop_pct then centre crop")
    interpolation: str = field("bicubic", help="resize interpolation")
    # EMA
    model_ema: bool = field(False, help="keep an EMA of the weights (evaluated too)")
    model_ema_decay: float = field(0.9999, help="EMA decay per optimizer step")
    # run
    output_dir: str = field("output/finetune", help="run folder: config, metrics, checkpoints, results")
    seed: int = field(0, help="seed for init, data order, augmentation")
    mixed_precision: str = field("no", help="no | bf16 | fp16 (fp32 on CPU)")
    eval_every: int = field(1, help="evaluate every N epochs (and always at the end)")
    save_every: int = field(1, help="checkpoint every N epochs (0 = only at the end)")
    keep_last: int = field(2, help="checkpoints to keep")
    log_every: int = field(10, help="log train metrics every N optimizer steps")
    tensorboard: bool = field(True, help="also log to TensorBoard when installed")
    resume: bool = field(True, help="resume from the newest complete checkpoint in output_dir")
    max_bad_fraction: float = field(0.01, help="stop when more than this fraction of samples fail to decode")
    # scaling out (see launch/accelerate/ and the README's "Scaling out")
    data_order: str = field("shards", help="shards: disjoint shards per process (scalable default); global: every "
                                           "process reads one seeded stream and keeps its slice, so any process "
                                           "count sees the same global batches (exact 1-vs-N equivalence)")
    dist_timeout_s: int = field(1800, help="seconds a collective may wait for a hung process before the job fails")
    grad_checkpointing: bool = field(False, help="recompute block activations in backward (less memory, ~1/3 slower)")
    # semantic segmentation (--task segmentation; mixup/cutmix/RandAugment/label smoothing are classification only)
    reduce_zero_label: bool = field(True, help="segmentation: label 0 is 'other' (ignored), v -> v-1 (ADE20K)")
    seg_channels: int = field(512, help="segmentation: UperNet head channels")
    seg_aux_weight: float = field(0.4, help="segmentation: weight of the auxiliary FCN head's loss")
    seg_scale_min: float = field(0.5, help="segmentation: random rescale, short side = img_size x U(min, max)")
    seg_scale_max: float = field(2.0, help="segmentation: random rescale upper bound")
    seg_cat_max_ratio: float = field(0.75, help="segmentation: re-draw a crop where one class covers more than this")
    seg_stride: int = field(0, help="segmentation: sliding-window stride for evaluation (0 = 2/3 of img_size)")

    def validate(self) -> None:
        if self.task not in ("classification", "segmentation"):
            raise ValueError(f"--task must be classification or segmentation, got {self.task!r}")
        if self.task == "segmentation":
            if self.model != "beit" or self.linear_probe:
                raise ValueError("--task segmentation fine-tunes a BEiT encoder (--model beit, no --linear_probe)")
            if self.num_classes < 1:
                raise ValueError("--task segmentation needs --num_classes (ADE20K: 150 with --reduce_zero_label true)")
            if self.batch_size < 2:
                raise ValueError("--task segmentation needs --batch_size >= 2 (the heads use BatchNorm)")
            if not 0 < self.seg_scale_min <= self.seg_scale_max:
                raise ValueError(f"need 0 < --seg_scale_min <= --seg_scale_max, got {self.seg_scale_min}, {self.seg_scale_max}")
            if self.model_ema:
                raise ValueError("--model_ema is for classification (its BatchNorm statistics are not averaged)")
        if not self.train_shards or not self.val_shards:
            raise ValueError("--train_shards and --val_shards are both required (the held-out split is never "
                             "trained on); write them with `python -m beit.data.shards` from your class folders")
        if self.batch_size < 1 or self.grad_accum_steps < 1 or self.epochs < 1:
            raise ValueError("batch_size, grad_accum_steps and epochs must be >= 1")
        if self.task == "classification" and (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0 \
                and self.batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even --batch_size, got {self.batch_size}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"--layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.linear_probe and self.model != "beit":
            raise ValueError("--linear_probe is for BEiT encoders (--model beit)")
        if self.probe_block < 0:
            raise ValueError(f"--probe_block must be >= 0 (0 = last block), got {self.probe_block}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"--mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        from beit.scaling import check_data_order
        check_data_order(self.data_order)
        if self.init and not Path(self.init).exists():
            raise ValueError(f"--init {self.init} does not exist")

    def beit_dims(self, init_dims: dict | None = None) -> dict:
        """embed_dim / depth / num_heads / mlp_ratio: explicit flags > the --init checkpoint's (``init_dims``)
        > model_size."""
        keys = ("embed_dim", "depth", "num_heads", "mlp_ratio")
        dims: dict = {"mlp_ratio": 4.0}
        if init_dims:
            dims.update({k: init_dims[k] for k in keys if k in init_dims})
        if not all(k in dims for k in keys) and not (self.embed_dim and self.depth and self.num_heads):
            from beit.model import BEIT_SIZES
            if self.model_size not in BEIT_SIZES:
                raise ValueError(f"--model_size must be one of {sorted(BEIT_SIZES)}, got {self.model_size!r}")
            dims.update({k: v for k, v in BEIT_SIZES[self.model_size].items() if k in keys and k not in dims})
        dims.update({k: getattr(self, k) for k in keys if getattr(self, k)})
        return dims


RESUME_KEYS = ("model", "model_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "img_size", "num_classes",
               "linear_probe", "probe_block", "init", "epochs")


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


def build_model(cfg: FinetuneConfig, num_classes: int, log=print):
    """The model to train (BEiT classifier or segmenter, timm baseline, or linear probe) with its initial weights."""
    from beit.checkpoint_loading import infer_beit_dims, load_beit_weights, read_state_dict
    from beit.finetune_model import LinearProbe, build_beit_classifier, build_timm_model
    if cfg.task == "segmentation":
        return build_seg_model(cfg, num_classes, log)
    if cfg.model != "beit":
        return build_timm_model(cfg.model, num_classes, weights=cfg.init or None, img_size=cfg.img_size,
                                in_chans=cfg.in_chans, drop_path_rate=cfg.drop_path)
    state = read_state_dict(cfg.init, key=cfg.init_key or None) if cfg.init else None
    model = build_beit_classifier(
        num_classes, img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        init_values=cfg.init_values, drop_path_rate=0.0 if cfg.linear_probe else cfg.drop_path,
        head_init_scale=cfg.head_init_scale, **cfg.beit_dims(infer_beit_dims(state) if state else None))
    if state is not None:
        report = load_beit_weights(model, state)
        report.source = cfg.init
        log(report.summary())
    elif cfg.linear_probe:
        log("warning: linear probe on a randomly initialised encoder (no --init)")
    return LinearProbe(model, num_classes, cfg.probe_block) if cfg.linear_probe else model


def build_seg_model(cfg: FinetuneConfig, num_classes: int, log=print):
    """BEiT encoder + pyramid + UperNet/aux heads; --init's weights go into the encoder (rel-pos tables
    and patch embedding resized to --img_size / --patch_size as for classification)."""
    from beit.checkpoint_loading import infer_beit_dims, load_beit_weights, read_state_dict
    from beit.seg_model import BeitSegmenter
    state = read_state_dict(cfg.init, key=cfg.init_key or None) if cfg.init else None
    model = BeitSegmenter(num_classes, img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                          init_values=cfg.init_values, drop_path_rate=cfg.drop_path, channels=cfg.seg_channels,
                          aux_channels=max(1, cfg.seg_channels // 2),
                          **cfg.beit_dims(infer_beit_dims(state) if state else None))
    if state is not None:
        report = load_beit_weights(model.backbone, state)
        report.source = cfg.init
        log(report.summary())
    return model


def build_optimizer(cfg: FinetuneConfig, model, total_steps: int, warmup_steps: int):
    from beit.finetune_model import layer_decay_param_groups
    from beit.optim import WarmupCosineSchedule, create_adamw, param_groups_weight_decay
    if cfg.linear_probe:
        groups = param_groups_weight_decay(model, cfg.weight_decay)
    elif cfg.task == "segmentation":
        from beit.seg_model import seg_layer_decay_groups
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
        from beit.seg_model import SegLoss
        return SegLoss(cfg.seg_aux_weight), None
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
                      num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing), None
    return torch.nn.CrossEntropyLoss(), None


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Train, evaluate, checkpoint/resume, and write the final results; returns the final metrics."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from beit.checkpointing import (TRAIN_STATE, check_resume_compatible, find_latest_complete,
                                    load_checkpoint, save_checkpoint)
    from beit.engine_finetune import save_confusion_png, train_one_epoch
    from beit.export import export_model
    from beit.finetune_data import build_loaders, check_shards, infer_num_classes
    from beit.pretrain import data_error_metrics
    from beit.run_logging import RunLogger, resolve_trackers
    from beit.scaling import accelerator_kwargs_handlers, describe_scaling, grad_accum_for, refuse_under_fsdp

    out = Path(cfg.output_dir)
    if cfg.global_batch_size:  # keep the global batch for any process count (lr is not rescaled)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = dataclasses.replace(cfg, grad_accum_steps=grad_accum_for(cfg.global_batch_size, cfg.batch_size, world))
    trackers = resolve_trackers(cfg.tensorboard)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum_steps,
                              log_with=trackers or None, project_dir=str(out),
                              kwargs_handlers=accelerator_kwargs_handlers(cfg.dist_timeout_s))
    refuse_under_fsdp(accelerator.distributed_type, "fine-tuning's evaluation and export",
                      "fine-tune with DDP (launch/accelerate/8gpu.yaml, plus --grad_checkpointing true for ViT-L)")
    set_seed(cfg.seed)
    check_shards(cfg)  # missing / empty shard specs fail here, before any model is built
    class_names = None
    if cfg.num_classes:
        num_classes = cfg.num_classes
    else:
        num_classes, class_names = infer_num_classes(cfg.train_shards)
        cfg = dataclasses.replace(cfg, num_classes=num_classes)
    latest = find_latest_complete(out) if cfg.resume else None
    resume_step = json.loads((latest / TRAIN_STATE).read_text())["step"] if latest else None
    logger = RunLogger(accelerator, out, resume_step=resume_step)
    model = build_model(cfg, num_classes, log=logger.info)
    if cfg.grad_checkpointing:
        (model.encoder if cfg.linear_probe else model).set_grad_checkpointing(True)
    if cfg.model == "beit":  # record the dims actually built (they may come from --init)
        enc = model.encoder if cfg.linear_probe else model.backbone if cfg.task == "segmentation" else model
        cfg = dataclasses.replace(cfg, embed_dim=enc.embed_dim, depth=len(enc.blocks),
                                  num_heads=enc.blocks[0].attn.num_heads,
                                  mlp_ratio=enc.blocks[0].mlp.fc1.out_features / enc.embed_dim)
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
    if cfg.task == "segmentation" and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm statistics over all ranks
    set_seed(cfg.seed + accelerator.process_index)  # mixup / drop path differ per rank
    train_loader, val_loader = build_loaders(cfg, accelerator, num_classes)
    steps_per_epoch = len(train_loader) // cfg.grad_accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch has {len(train_loader)} batches, fewer than grad_accum_steps="
                         f"{cfg.grad_accum_steps}: lower --batch_size or --grad_accum_steps")
    total_steps = steps_per_epoch * cfg.epochs
    optimizer, schedule = build_optimizer(cfg, model, total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    criterion, mixup_fn = build_criterion(cfg, num_classes)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.model_ema_decay)
        accelerator.register_for_checkpointing(ema)

    step, start_epoch = 0, 0
    if latest is not None:
        train_state, rank_state = load_checkpoint(accelerator, latest)
        check_resume_compatible(train_state["config"], to_dict(cfg), RESUME_KEYS, where=str(out))
        check_resume_schedule(train_state, cfg, accelerator.num_processes, total_steps, where=str(out))
        schedule.load_state_dict(train_state["schedule"])
        step, start_epoch = int(train_state["step"]), int(train_state["epoch"])
        if rank_state is not None:
            train_loader.load_state_dict(rank_state["loader"])
        logger.info(f"resumed from {latest} (epoch {start_epoch}, step {step})")
    if trackers:
        accelerator.init_trackers("finetune")
    eff_batch = cfg.batch_size * cfg.grad_accum_steps * accelerator.num_processes
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"fine-tune {cfg.model}{' linear probe' if cfg.linear_probe else ''}: {num_classes} classes, "
                f"{n_train / 1e6:.2f}M trainable params, effective batch {eff_batch}, lr {cfg.lr:g}, "
                f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs")
    logger.info(describe_scaling(cfg.batch_size, cfg.grad_accum_steps, accelerator.num_processes, cfg.lr,
                                 "not rescaled; global batch kept by gradient accumulation" if cfg.global_batch_size
                                 else "not rescaled; set global_batch_size to keep the global batch") +
                f"; data order {cfg.data_order}")

    def on_step(s: int, metrics: dict) -> None:
        if s % cfg.log_every == 0 or s == total_steps:
            logger.log(metrics, step=s)

    results: dict = {}
    bar = logger.progress(total=total_steps, initial=step, desc="finetune")
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch)
        step, train_stats = train_one_epoch(
            model, train_loader, optimizer, schedule, accelerator, criterion, epoch=epoch, step=step,
            max_steps=(epoch + 1) * steps_per_epoch, mixup_fn=mixup_fn, ema=ema, clip_grad=cfg.clip_grad,
            on_step=on_step, progress=bar)
        record = {"epoch": epoch + 1, **train_stats, **data_error_metrics(train_loader, accelerator)}
        last = epoch + 1 == cfg.epochs
        if last or (epoch + 1) % cfg.eval_every == 0:
            results = _evaluate_all(model, ema, val_loader, accelerator, num_classes, cfg)
            record.update({f"val_{k}": v for k, v in results.items()
                           if not k.endswith("confusion") and not isinstance(v, list)})
            logger.info(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in record.items()
                                                          if isinstance(v, float)))
        logger.log(record, step=step)
        if last or (cfg.save_every and (epoch + 1) % cfg.save_every == 0):
            save_checkpoint(accelerator, out, step,
                            {"epoch": epoch + 1, "schedule": schedule.state_dict(), "config": to_dict(cfg),
                             "total_steps": total_steps},
                            rank_state={"loader": train_loader.state_dict()}, keep_last=cfg.keep_last)
    bar.close()
    if not results:  # resumed after the last epoch: evaluate the restored weights
        results = _evaluate_all(model, ema, val_loader, accelerator, num_classes, cfg)
    if accelerator.is_main_process:
        final = {k: v for k, v in results.items() if not k.endswith("confusion")}
        final.update(step=step, epochs=cfg.epochs, num_classes=num_classes, class_names=class_names)
        (out / "confusion.json").write_text(json.dumps(results["confusion"]))
        (out / "final.json").write_text(json.dumps(final, indent=1))
        if cfg.task == "segmentation":
            from beit.seg_model import export_seg_model
            export_seg_model(accelerator.unwrap_model(model), out / "model.safetensors", cfg,
                             metrics={k: v for k, v in final.items() if k != "per_class_iou"})
            logger.info(f"final: mIoU {results['mIoU']:.2f}%  mAcc {results['mAcc']:.2f}%  aAcc {results['aAcc']:.2f}% "
                        f" ->  {out}/final.json, {out}/model.safetensors")
        else:
            save_confusion_png(results["confusion"], out / "confusion_matrix.png", class_names,
                               title=f"{cfg.model} on {cfg.val_shards} (top-1 {results['top1']:.1f}%)")
            export_model(accelerator.unwrap_model(model), out / "model.safetensors", cfg, class_names=class_names,
                         metrics=final)
            logger.info(f"final: top-1 {results['top1']:.2f}%  top-5 {results['top5']:.2f}%  ->  {out}/final.json, "
                        f"{out}/confusion_matrix.png, {out}/model.safetensors")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _evaluate_all(model, ema, loader, accelerator, num_classes: int, cfg) -> dict:
    from beit.engine_finetune import evaluate
    if cfg.task == "segmentation":
        from beit.engine_seg import evaluate_seg
        return evaluate_seg(accelerator.unwrap_model(model), loader, accelerator, num_classes, cfg.img_size,
                            cfg.seg_stride or max(1, cfg.img_size * 2 // 3))
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
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:  # bad input (shards, checkpoint shapes): a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
