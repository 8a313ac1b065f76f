"""BEiT's reconstruction picture: the image decoded from the model's predicted tokens at the masked
patches and the tokenizer's own tokens at the visible ones, beside the tokenizer's plain reconstruction.
Any tokenizer with a decoder (``has_decoder`` / ``decode``) works; one without says so."""
from __future__ import annotations

from pathlib import Path

import torch

from beit.viz.figures import cell, grid, hwc, save
from beit.viz.masks import masked_overlay


def cannot_decode(tokenizer) -> str | None:
    """None when ``tokenizer`` can turn tokens back into pixels, else the sentence the report shows."""
    if tokenizer.has_decoder:
        return None
    return (f"The {tokenizer.kind} tokenizer has no decoder: its tokens cannot be turned back into pixels, so "
            "there is no reconstruction picture for this run (the token maps above show what the model predicts).")


def draw_reconstruction(tokenizer, tok_images: torch.Tensor, target: torch.Tensor, predicted: torch.Tensor,
                        mask: torch.Tensor, path: Path) -> Path:
    """Rows = images; columns: tokenizer view | masked | decode(tokenizer's tokens) | decode(BEiT's tokens)."""
    m = mask.to(target.device).bool()
    mixed = torch.where(m, predicted.to(target.device), target)
    own = tokenizer.decode(target)
    beit = tokenizer.decode(mixed)
    fig, axes = grid(len(target), 4, f"{tokenizer.kind} decoder: masked patches from BEiT's predicted tokens, "
                                     "visible ones from the tokenizer's tokens")
    mnp = m.cpu().numpy()
    titles = ("image", "masked input", "tokenizer's tokens decoded", "BEiT prediction decoded")
    for i, (im, a, b) in enumerate(zip(hwc(tok_images), hwc(own), hwc(beit))):
        for j, x in enumerate((im, masked_overlay(im, mnp[i]), a, b)):
            cell(axes[i][j], x, titles[j] if i == 0 else "")
    return save(fig, path)
