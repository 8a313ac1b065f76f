"""The fine-tuning confusion matrix of a checkpoint on the held-out images, with class names."""
from __future__ import annotations

from pathlib import Path

import torch

from beit.engines.finetune import save_confusion_png


@torch.no_grad()
def confusion_of(model, batches, num_classes: int, device) -> tuple[list[list[int]], int]:
    """(confusion matrix rows = true class, images scored) of ``model`` over ``batches``."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    n = 0
    for b in batches:
        pred = model(b["image"].to(device)).argmax(1).cpu()
        cm += torch.bincount(b["label"] * num_classes + pred, minlength=num_classes ** 2).view_as(cm)
        n += len(pred)
    return cm.tolist(), n


def draw_confusion(cm: list[list[int]], names: list[str], label: str, path: Path) -> Path:
    total = sum(map(sum, cm))
    top1 = sum(cm[i][i] for i in range(len(cm))) / max(1, total)
    return save_confusion_png(cm, path, names, title=f"{label}: top-1 {top1:.1%} on {total} held-out images")


def confusion_px(n_classes: int) -> tuple[int, int]:
    side = round(min(20.0, 2.0 + 0.45 * n_classes) * 100)
    return side, side
