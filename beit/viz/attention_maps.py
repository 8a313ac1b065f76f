"""Attention of the CLS token and of a chosen patch, for chosen blocks, upsampled over the image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from beit.viz.attention import AttentionRecorder, prefix_tokens
from beit.viz.figures import cell, grid, plt, save


def parse_blocks(spec: str, depth: int) -> list[int]:
    """'1,6,12' (1-based) -> 0-based ids; empty = first, middle and last block."""
    if not spec:
        return sorted({0, depth // 2, depth - 1})
    try:
        ids = [int(s) - 1 for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--blocks {spec!r}: give 1-based block numbers separated by commas, e.g. 1,6,12") from None
    bad = [i + 1 for i in ids if not 0 <= i < depth]
    if bad or not ids:
        raise ValueError(f"--blocks {spec!r}: the model has blocks 1..{depth}")
    return ids


def parse_patch(spec: str, grid_hw: tuple[int, int]) -> tuple[int, int]:
    """'row,col' (0-based) -> (row, col); empty = the centre patch."""
    if not spec:
        return grid_hw[0] // 2, grid_hw[1] // 2
    try:
        r, c = (int(s) for s in spec.split(","))
    except ValueError:
        raise ValueError(f"--patch {spec!r}: give row,col of a patch, e.g. 3,4") from None
    if not (0 <= r < grid_hw[0] and 0 <= c < grid_hw[1]):
        raise ValueError(f"--patch {spec!r}: the patch grid is {grid_hw[0]}x{grid_hw[1]} (rows/cols from 0)")
    return r, c


@torch.no_grad()
def record_attention(model, forward, block_ids: list[int]) -> dict[int, torch.Tensor]:
    """Run ``forward()`` with the recorder on; returns {block id: head-mean attention [B, N, N]}."""
    with AttentionRecorder(model, block_ids) as rec:
        forward()
    return rec.maps


def _heat(att: torch.Tensor, grid_hw: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    a = att.reshape(1, 1, *grid_hw)
    a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)[0, 0]
    a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
    return a.numpy()


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    colours = plt().get_cmap("inferno")(heat)[..., :3]
    return (1 - alpha) * image + alpha * colours


def draw_attention(images: list[np.ndarray], maps: dict[int, torch.Tensor], grid_hw: tuple[int, int],
                   patch: tuple[int, int], path: Path) -> Path:
    """Rows = images; columns: image | CLS attention per block | the chosen patch's attention per block."""
    ids = sorted(maps)
    n_tokens = next(iter(maps.values())).shape[-1]
    pre = prefix_tokens(n_tokens, grid_hw)
    q_patch = pre + patch[0] * grid_hw[1] + patch[1]
    cols = 1 + (len(ids) * 2 if pre else len(ids))
    fig, axes = grid(len(images), cols, f"attention (mean over heads), blocks {', '.join(str(i + 1) for i in ids)}: "
                                        + ("of the CLS token, then " if pre else "")
                                        + f"of patch (row {patch[0]}, col {patch[1]}) (white box)")
    ph, pw = images[0].shape[0] / grid_hw[0], images[0].shape[1] / grid_hw[1]
    for r, im in enumerate(images):
        cell(axes[r][0], im, "image" if r == 0 else "")
        c = 1
        queries = ([("CLS", 0)] if pre else []) + [("patch", q_patch)]
        for name, q in queries:
            for i in ids:
                ax = axes[r][c]
                cell(ax, overlay(im, _heat(maps[i][r, q, pre:], grid_hw, im.shape[:2])),
                     f"{name}, block {i + 1}" if r == 0 else "")
                if name == "patch":
                    ax.add_patch(plt().Rectangle((patch[1] * pw - 0.5, patch[0] * ph - 0.5), pw, ph, fill=False,
                                                 edgecolor="white", linewidth=1.2))
                c += 1
    return save(fig, path)
