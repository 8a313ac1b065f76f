"""Segmentation: prediction and ground-truth overlays on held-out images, with a legend of the classes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from beit.data.pipelines.segmentation import IGNORE
from beit.viz.figures import CELL_IN, cell, class_palette, grid, plt, save

LEGEND_ROWS_IN = 0.25


@torch.no_grad()
def predict(model, image: torch.Tensor, crop: int, stride: int, num_classes: int, size, device) -> np.ndarray:
    """Class ids [H, W] at the annotation's ``size`` (sliding windows, as the run's own evaluation)."""
    from beit.engines.seg import slide_logits

    logits = slide_logits(model, image.to(device), crop, stride, num_classes)
    return F.interpolate(logits[None], size=tuple(size), mode="bilinear",
                         align_corners=False)[0].argmax(0).cpu().numpy()


def colour_labels(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    out = np.zeros((*labels.shape, 3))
    keep = labels != IGNORE
    out[keep] = colours[labels[keep]]
    return out


def _resize_to(image: np.ndarray, hw) -> np.ndarray:
    t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    return F.interpolate(t, size=tuple(hw), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


def draw_segmentation(images: list[np.ndarray], preds: list[np.ndarray], truths: list[np.ndarray], names: list[str],
                      path: Path) -> Path:
    """Rows = images; columns: image | prediction overlay | ground-truth overlay; class legend below."""
    colours = class_palette(len(names))
    fig, axes = grid(len(images), 3, "segmentation: prediction and ground truth (black: unlabelled)")
    accs = []
    for r, (im, p, t) in enumerate(zip(images, preds, truths)):
        im = _resize_to(im, t.shape)
        keep = t != IGNORE
        acc = float((p[keep] == t[keep]).mean()) if keep.any() else float("nan")
        accs.append(acc)
        cell(axes[r][0], im, "image" if r == 0 else "")
        cell(axes[r][1], 0.45 * im + 0.55 * colour_labels(p, colours), f"prediction ({acc:.0%} pixels right)")
        cell(axes[r][2], 0.45 * im + 0.55 * colour_labels(t, colours), "ground truth" if r == 0 else "")
    handles = [plt().Rectangle((0, 0), 1, 1, color=colours[i]) for i in range(len(names))]
    fig.legend(handles, names, loc="lower center", ncol=min(6, len(names)), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    fig.subplots_adjust(bottom=min(0.4, (LEGEND_ROWS_IN * (1 + (len(names) - 1) // 6)) / (len(images) * CELL_IN)))
    return save(fig, path)
