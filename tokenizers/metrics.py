"""Does a tokenizer carry information? Codebook usage, perplexity, stability, reconstruction PSNR."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from beit.tokenizers.base import VisualTokenizer


def token_histogram(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Counts per code (float64 [vocab_size]) of a token tensor of any shape."""
    return torch.bincount(tokens.flatten().cpu(), minlength=vocab_size).double()


def usage_and_perplexity(counts: torch.Tensor) -> dict[str, float]:
    """Fraction of codes used, perplexity exp(H), and the majority token's share (the MIM baseline)."""
    total = float(counts.sum())
    if total == 0:
        raise ValueError("no tokens counted")
    p = counts / total
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    return {"usage": float((counts > 0).double().mean()), "perplexity": math.exp(entropy),
            "normalised_entropy": entropy / math.log(len(counts)) if len(counts) > 1 else 0.0,
            "majority_share": float(p.max()), "num_tokens": int(total)}


def shift_stability(tok: VisualTokenizer, images: torch.Tensor, pixels: int = 1) -> float:
    """Fraction of tokens unchanged when the image content moves ``pixels`` to the right.

    The shifted image repeats its first column (no wrap-around), and the token column whose
    receptive field touches the replicated border is excluded.
    """
    shifted = torch.cat([images[..., :1].expand(*images.shape[:-1], pixels), images[..., :-pixels]], -1)
    a, b = tok.tokenize(images), tok.tokenize(shifted)
    return float((a[..., 1:] == b[..., 1:]).double().mean())


def flip_stability(tok: VisualTokenizer, images: torch.Tensor) -> float:
    """Fraction of tokens equal between the image and (tokens of the flipped image) flipped back."""
    a = tok.tokenize(images)
    b = tok.tokenize(images.flip(-1)).flip(-1)
    return float((a == b).double().mean())


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [0, 1]."""
    mse = ((reference.float() - reconstruction.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def measure(tok: VisualTokenizer, batches: Iterable[torch.Tensor], max_images: int | None = None) -> dict[str, float]:
    """Usage/perplexity over all images; stabilities (and PSNR with a decoder) averaged per image."""
    counts = torch.zeros(tok.vocab_size, dtype=torch.float64)
    sums = {"shift_stability": 0.0, "flip_stability": 0.0, "psnr": 0.0}
    n = 0
    for images in batches:
        if max_images is not None and n >= max_images:
            break
        if max_images is not None:
            images = images[: max_images - n]
        b = images.shape[0]
        tokens = tok.tokenize(images)
        counts += token_histogram(tokens, tok.vocab_size)
        sums["shift_stability"] += shift_stability(tok, images) * b
        sums["flip_stability"] += flip_stability(tok, images) * b
        if tok.has_decoder:
            sums["psnr"] += psnr(images, tok.decode(tokens).cpu()) * b
        n += b
    if n == 0:
        raise ValueError("no images to measure the tokenizer on")
    out = usage_and_perplexity(counts)
    out.update({k: v / n for k, v in sums.items() if k != "psnr" or tok.has_decoder})
    out["num_images"] = n
    return out
