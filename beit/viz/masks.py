"""Held-out images with their block masks drawn over them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from beit.viz.figures import cell, columns, grid, hwc, save

MASK_RGB = np.array([0.9, 0.15, 0.1])


def masked_overlay(image: np.ndarray, mask: np.ndarray, strength: float = 0.55) -> np.ndarray:
    """HWC image in [0, 1] with the patches of ``mask`` [h, w] tinted and outlined."""
    hh, ww = image.shape[:2]
    gh, gw = mask.shape
    up = np.kron(mask.astype(np.float32), np.ones((hh // gh, ww // gw), np.float32))[..., None]
    out = image * (1 - strength * up) + strength * up * MASK_RGB
    py, px = hh // gh, ww // gw
    edge = np.zeros((hh, ww), bool)
    edge[::py, :] = edge[:, ::px] = True
    out[edge & (up[..., 0] > 0)] = MASK_RGB
    return out


def draw_masks(images: torch.Tensor, mask: torch.Tensor, path: Path) -> Path:
    """One cell per image (uint8 encoder views [B,3,S,S], bool mask [B,h,w])."""
    n = len(images)
    rows, cols = columns(n)
    m = mask.cpu().numpy().astype(bool)
    fig, axes = grid(rows, cols, f"held-out images with their block masks (red: the {int(m[0].sum())} of "
                                 f"{m[0].size} patches the model must predict)")
    for i, im in enumerate(hwc(images)):
        cell(axes[i // cols][i % cols], masked_overlay(im, m[i]), f"image {i + 1}: {int(m[i].sum())} masked")
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    return save(fig, path)
