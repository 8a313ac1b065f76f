"""Per image: the tokenizer's token map, the model's predicted tokens at the masked positions, and
where the two agree."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from beit.viz.figures import cell, grid, hwc, palette, save

VISIBLE_RGB = np.array([0.85, 0.85, 0.85])
RIGHT_RGB, WRONG_RGB = np.array([0.1, 0.7, 0.2]), np.array([0.85, 0.1, 0.1])


def token_map(tokens: np.ndarray, colours: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """[h, w] ids -> [h, w, 3] colours; cells outside ``keep`` are light grey."""
    out = colours[tokens]
    if keep is not None:
        out[~keep] = VISIBLE_RGB
    return out


def agreement_map(target: np.ndarray, predicted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.tile(VISIBLE_RGB, (*target.shape, 1))
    out[mask & (target == predicted)] = RIGHT_RGB
    out[mask & (target != predicted)] = WRONG_RGB
    return out


def draw_tokens(tok_images: torch.Tensor, target: torch.Tensor, predicted: torch.Tensor, mask: torch.Tensor,
                vocab_size: int, path: Path) -> Path:
    """Rows = images; columns: tokenizer view | its tokens | predicted at masked | agreement."""
    t, p, m = target.cpu().numpy(), predicted.cpu().numpy(), mask.cpu().numpy().astype(bool)
    colours = palette(vocab_size)
    hits = int((m & (t == p)).sum())
    fig, axes = grid(len(t), 4, f"tokens: {hits}/{int(m.sum())} masked tokens right "
                                f"({hits / max(1, int(m.sum())):.0%}); green right, red wrong, grey visible")
    for i, im in enumerate(hwc(tok_images)):
        acc = int((m[i] & (t[i] == p[i])).sum())
        cell(axes[i][0], im, "image" if i == 0 else "")
        cell(axes[i][1], token_map(t[i], colours), "tokenizer's tokens" if i == 0 else "")
        cell(axes[i][2], token_map(p[i], colours, m[i]), "predicted (masked)" if i == 0 else "")
        cell(axes[i][3], agreement_map(t[i], p[i], m[i]), f"{acc}/{int(m[i].sum())} right")
    return save(fig, path)
