"""Semantic segmentation (BEiT's ADE20K recipe): image + ``seg.png`` shards, a UperNet head on a BEiT or Swin
encoder, cross-entropy with an auxiliary head, sliding-window mIoU; mixup/cutmix/RandAugment/label smoothing
are classification only."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from beit.config import Options, field
from beit.tasks.base import Task


@dataclass
class SegmentationOptions(Options):
    """Annotation labels, the heads, the crop's rescaling and the sliding-window evaluation of ``--task
    segmentation``."""
    reduce_zero_label: bool = field(True, help="segmentation: label 0 is 'other' (ignored), v -> v-1 (ADE20K)")
    seg_channels: int = field(512, help="segmentation: UperNet head channels")
    seg_aux_weight: float = field(0.4, help="segmentation: weight of the auxiliary FCN head's loss")
    seg_scale_min: float = field(0.5, help="segmentation: random rescale, short side = img_size x U(min, max)")
    seg_scale_max: float = field(2.0, help="segmentation: random rescale upper bound")
    seg_cat_max_ratio: float = field(0.75, help="segmentation: re-draw a crop where one class covers more than this")
    seg_stride: int = field(0, help="segmentation: sliding-window stride for evaluation (0 = 2/3 of img_size)")



class Segmentation(Task):
    labelled_folders = False
    export_format = "beit.export.segmentation.load_seg_model"

    def check(self, cfg) -> None:
        from beit.modeling.backbones import backbone_for
        if cfg.linear_probe:
            raise ValueError("--task segmentation fine-tunes the whole encoder: leave --linear_probe out")
        if not backbone_for(cfg.model).segments:
            raise ValueError(f"--task segmentation fine-tunes a BEiT encoder (--model beit) or a timm Swin "
                             f"(--model swin_tiny_patch4_window7_224, ...), got --model {cfg.model}")
        if cfg.num_classes < 1:
            raise ValueError("--task segmentation needs --num_classes (ADE20K: 150 with --reduce_zero_label true)")
        if cfg.batch_size < 2:
            raise ValueError("--task segmentation needs --batch_size >= 2 (the heads use BatchNorm)")
        if not 0 < cfg.seg_scale_min <= cfg.seg_scale_max:
            raise ValueError(f"need 0 < --seg_scale_min <= --seg_scale_max, got {cfg.seg_scale_min}, "
                             f"{cfg.seg_scale_max}")
        if cfg.model_ema:
            raise ValueError("--model_ema is for classification (its BatchNorm statistics are not averaged)")

    def build_model(self, cfg, num_classes: int, log=print) -> nn.Module:
        from beit.modeling.backbones import backbone_for
        return backbone_for(cfg.model).build_segmenter(cfg, num_classes, log)

    def prepare(self, model: nn.Module, accelerator) -> nn.Module:
        if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm statistics over all ranks
        return model

    def loaders(self, cfg, accelerator, num_classes: int):
        from beit.data.pipelines.labelled import build_loaders
        from beit.data.pipelines.segmentation import SegEvalMap, SegTrainMap
        norm = dict(reduce_zero_label=cfg.reduce_zero_label, mean=tuple(cfg.mean), std=tuple(cfg.std))
        train_map = SegTrainMap(num_classes, cfg.image_size, scale=(cfg.seg_scale_min, cfg.seg_scale_max),
                                cat_max_ratio=cfg.seg_cat_max_ratio, hflip=cfg.hflip, **norm)
        # held-out images keep their own aspect ratio: one at a time
        return build_loaders(cfg, accelerator, num_classes, train_map=train_map,
                             val_map=SegEvalMap(num_classes, cfg.image_size, **norm), val_batch_size=1)

    def param_groups(self, cfg, model: nn.Module) -> list[dict]:
        from beit.modeling.segmenter import seg_layer_decay_groups
        return seg_layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay)

    def criterion(self, cfg, num_classes: int):
        from beit.modeling.segmenter import SegLoss
        return SegLoss(cfg.seg_aux_weight), None

    def evaluate(self, model: nn.Module, ema, loader, accelerator, num_classes: int, cfg) -> dict:
        from beit.engines.seg import evaluate_seg
        return evaluate_seg(accelerator.unwrap_model(model), loader, accelerator, num_classes, cfg.image_size,
                            cfg.seg_stride or max(1, cfg.image_size * 2 // 3))

    def finish(self, model: nn.Module, out: Path, cfg, results: dict, final: dict, class_names) -> str:
        from beit.export.card import card_of_export
        from beit.export.provenance import provenance
        from beit.export.segmentation import export_seg_model
        metrics = {k: v for k, v in final.items() if k != "per_class_iou"}
        card_of_export(export_seg_model(model, out / "model.safetensors", cfg, metrics=metrics,
                                        provenance=provenance(cfg, metrics, class_names, run_dir=out)), model)
        return (f"mIoU {results['mIoU']:.2f}%  mAcc {results['mAcc']:.2f}%  aAcc {results['aAcc']:.2f}%"
                if results else "no held-out data")
