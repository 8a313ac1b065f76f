"""Segmentation scoring: sliding-window inference and mIoU over every held-out image."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from beit.data.loading.heldout import good_rows
from beit.data.pipelines.segmentation import IGNORE


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets covering [0, length) with windows of ``crop`` every ``stride`` (the last flush with the end)."""
    if length <= crop:
        return [0]
    n = math.ceil((length - crop) / stride) + 1
    return sorted({min(i * stride, length - crop) for i in range(n)})


@torch.no_grad()
def slide_logits(model, image: torch.Tensor, crop: int, stride: int, num_classes: int) -> torch.Tensor:
    """Logits [C, H, W] for one normalised image [3, H, W] (H, W >= crop): the mean of the model's
    logits over overlapping crop x crop windows."""
    _, h, w = image.shape
    out = image.new_zeros(num_classes, h, w)
    hits = image.new_zeros(1, h, w)
    for y in window_starts(h, crop, stride):
        for x in window_starts(w, crop, stride):
            win = image[:, y:y + crop, x:x + crop]
            ph, pw = crop - win.shape[1], crop - win.shape[2]
            logits = model(F.pad(win, (0, pw, 0, ph))[None])[0].float()
            out[:, y:y + crop, x:x + crop] += logits[:, :crop - ph, :crop - pw]
            hits[:, y:y + crop, x:x + crop] += 1
    return out / hits


@torch.no_grad()
def predict_mask(model, image: torch.Tensor, size: tuple[int, int], crop: int, stride: int,
                 num_classes: int) -> torch.Tensor:
    """Class ids [H, W] at ``size`` (the image's own resolution) for one normalised, rescaled image [3, h, w]:
    the sliding-window logits resized (bilinear) to ``size``, argmax."""
    logits = slide_logits(model, image, crop, stride, num_classes)
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0)


def iou_scores(confusion: torch.Tensor) -> dict:
    """mIoU (mean over classes present in the labels or predictions), mean class accuracy and
    pixel accuracy from a [C, C] confusion matrix (rows = true class)."""
    cm = confusion.double()
    tp, true, pred = cm.diag(), cm.sum(1), cm.sum(0)
    union = true + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(true > 0, tp / true.clamp(min=1), torch.full_like(tp, float("nan")))
    total = float(cm.sum())
    return {"mIoU": 100 * float(iou.nanmean()), "mAcc": 100 * float(acc.nanmean()),
            "aAcc": 100 * float(tp.sum()) / total if total else float("nan"),
            "per_class_iou": [None if math.isnan(v) else round(100 * v, 2) for v in iou.tolist()]}


@torch.no_grad()
def evaluate_seg(model, loader, accelerator, num_classes: int, crop: int, stride: int) -> dict:
    """mIoU / mAcc / aAcc over every held-out image (a ``HeldOutStream`` loader, batch size 1),
    summed across ranks; logits are resized to each annotation's own resolution before scoring."""
    model.eval()
    dev = accelerator.device
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=dev)
    counts = torch.zeros(2, dtype=torch.long, device=dev)  # images scored, bad
    for batch in loader:
        ok = good_rows(batch)
        counts[1] += int((~ok).sum())
        for image, labels in zip(batch["image"][ok], batch["label"][ok]):
            with accelerator.autocast():
                pred = predict_mask(model, image.to(dev), tuple(labels.shape), crop, stride, num_classes)
            labels = labels.to(dev)
            keep = labels != IGNORE
            cm += torch.bincount(labels[keep] * num_classes + pred[keep], minlength=num_classes ** 2).view_as(cm)
            counts[0] += 1
    model.train()
    if accelerator.num_processes > 1:
        cm, counts = accelerator.reduce(cm, reduction="sum"), accelerator.reduce(counts, reduction="sum")
    images, bad = counts.cpu().tolist()
    if images == 0:
        raise RuntimeError(f"the held-out loader gave no usable images ({bad} bad): check --val_shards")
    return {**iou_scores(cm.cpu()), "samples": int(images), "bad_samples": int(bad), "confusion": cm.cpu().tolist()}
