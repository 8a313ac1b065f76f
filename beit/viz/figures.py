"""Shared plotting helpers: a fixed cell size (so every PNG's pixel size follows from its layout),
image conversions and the token colour palette."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch

CELL_IN = 1.6      # one image cell, inches
TITLE_IN = 0.4     # room for the figure title
DPI = 100


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def figure_px(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of a ``grid`` figure: what the PNG will measure."""
    return round(cols * CELL_IN * DPI), round((rows * CELL_IN + TITLE_IN) * DPI)


def grid(rows: int, cols: int, title: str):
    """A figure of rows x cols image cells with a title; returns (figure, axes [rows][cols])."""
    p = plt()
    w, h = cols * CELL_IN, rows * CELL_IN + TITLE_IN
    fig, axes = p.subplots(rows, cols, figsize=(w, h), squeeze=False, dpi=DPI)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - TITLE_IN / h, wspace=0.06, hspace=0.22)
    fig.suptitle(textwrap.fill(title, max(30, int(cols * 21))), fontsize=9 if cols > 2 else 8, y=1 - 0.04 / h, va="top")
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    return fig, axes


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt().close(fig)
    return path


def cell(ax, image: np.ndarray, label: str = "", **kw) -> None:
    """Show an HWC image in [0, 1] (or a palette index map with ``cmap``) with a small label."""
    ax.imshow(image.clip(0, 1) if image.dtype.kind == "f" else image, interpolation="nearest", **kw)
    if label:
        ax.set_title(label, fontsize=7, pad=2)


def hwc(images: torch.Tensor) -> list[np.ndarray]:
    """uint8 or [0, 1] float images [B, 3, H, W] -> list of float HWC arrays in [0, 1]."""
    x = images.detach().cpu().float()
    if not images.is_floating_point():
        x = x / 255.0
    return [im.permute(1, 2, 0).numpy() for im in x.clamp(0, 1)]


def denormalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """ImageNet-style normalised float images -> [0, 1]."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.detach().cpu().float() * s + m).clamp(0, 1)


def palette(n: int, seed: int = 1234) -> np.ndarray:
    """A fixed pseudo-random colour per id [n, 3] in [0.15, 1] (the tokenizer report's colours)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g) * 0.85 + 0.15).numpy()


def class_palette(n: int) -> np.ndarray:
    """Distinct colours for up to 20 classes (tab20), a fixed random one per class beyond."""
    base = np.array(plt().get_cmap("tab20").colors)
    return base[:n] if n <= len(base) else np.concatenate([base, palette(n - len(base), seed=7)])


def columns(n: int, max_cols: int = 4) -> tuple[int, int]:
    """(rows, cols) of a grid for ``n`` equal cells."""
    cols = max(1, min(n, max_cols))
    return math.ceil(n / cols), cols
