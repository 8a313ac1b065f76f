"""Image classification: cross-entropy with Mixup/CutMix and label smoothing, top-1/top-5 and a confusion matrix
on the held-out shards (also of the EMA weights), the timm export."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from beit.config import Options, field
from beit.tasks.base import Task


@dataclass
class MixupOptions(Options):
    """Classification's label mixing (mixup / cutmix) and smoothing."""
    label_smoothing: float = field(0.1, help="label smoothing")
    mixup: float = field(0.8, help="mixup alpha (0 = off)")
    cutmix: float = field(1.0, help="cutmix alpha (0 = off)")
    mixup_prob: float = field(1.0, help="probability of applying mixup or cutmix to a batch")
    mixup_switch_prob: float = field(0.5, help="probability of cutmix instead of mixup when both are on")



class Classification(Task):
    outputs = "confusion_matrix.png"

    def check(self, cfg) -> None:
        if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0 and cfg.batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even --batch_size, got {cfg.batch_size}")

    def criterion(self, cfg, num_classes: int):
        """SoftTargetCrossEntropy with Mixup/CutMix (which smooths the labels itself), else label-smoothed
        cross-entropy."""
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0:
            mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                          switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
                          num_classes=num_classes)
            return SoftTargetCrossEntropy(), mixup
        if cfg.label_smoothing > 0:
            return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing), None
        return torch.nn.CrossEntropyLoss(), None

    def evaluate(self, model: nn.Module, ema, loader, accelerator, num_classes: int, cfg) -> dict:
        from beit.engines.finetune import evaluate
        # The unwrapped module: a DDP forward broadcasts buffers, a collective that ranks with fewer
        # held-out batches would not join (the job would hang).
        res = evaluate(accelerator.unwrap_model(model), loader, accelerator, num_classes)
        if ema is not None:
            res.update({f"ema_{k}": v for k, v in evaluate(ema.module, loader, accelerator, num_classes).items()})
        return res

    def finish(self, model: nn.Module, out: Path, cfg, results: dict, final: dict, class_names) -> str:
        from beit.engines.finetune import save_confusion_png
        from beit.export.card import card_of_export
        from beit.export.classifier import export_model
        from beit.export.provenance import provenance
        if results:
            save_confusion_png(results["confusion"], out / "confusion_matrix.png", class_names,
                               title=f"{cfg.model}: top-1 {results['top1']:.1f}% on {results['samples']} held-out "
                                     f"images ({final.get('held_out_set') or 'held-out shards'})")
        prov = provenance(cfg, final, class_names, run_dir=out)
        card_of_export(export_model(model, out / "model.safetensors", cfg, class_names=class_names, metrics=final,
                                    provenance=prov), model)
        return (f"top-1 {results['top1']:.2f}%  top-5 {results['top5']:.2f}% on {results['samples']} held-out images"
                if results else "no held-out data (no top-1)")
