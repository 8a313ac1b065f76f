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


def shift_pairs(tok: VisualTokenizer, images: torch.Tensor, pixels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of the images and of the images moved ``pixels`` to the right, at the same positions.

    The shifted image repeats its first column (no wrap-around), and the token column whose
    receptive field touches the replicated border is excluded.
    """
    shifted = torch.cat([images[..., :1].expand(*images.shape[:-1], pixels), images[..., :-pixels]], -1)
    a, b = tok.tokenize(images), tok.tokenize(shifted)
    return a[..., 1:].flatten(), b[..., 1:].flatten()


def flip_pairs(tok: VisualTokenizer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of the images and tokens of the flipped images flipped back."""
    return tok.tokenize(images).flatten(), tok.tokenize(images.flip(-1)).flip(-1).flatten()


def shift_stability(tok: VisualTokenizer, images: torch.Tensor, pixels: int = 1) -> float:
    """Fraction of tokens unchanged when the image content moves ``pixels`` to the right."""
    a, b = shift_pairs(tok, images, pixels)
    return float((a == b).double().mean())


def flip_stability(tok: VisualTokenizer, images: torch.Tensor) -> float:
    """Fraction of tokens equal between the image and (tokens of the flipped image) flipped back."""
    a, b = flip_pairs(tok, images)
    return float((a == b).double().mean())


def mutual_information_bits(a: torch.Tensor, b: torch.Tensor, vocab_size: int) -> float:
    """Mutual information I(A; B) in bits between paired token ids (plug-in, Miller-Madow corrected).

    Agreement alone rewards a tokenizer that emits one token everywhere (always "stable"); the
    information that survives the perturbation does not: it is 0 for a constant tokenizer and at
    most the token entropy.
    """
    a, b = a.flatten().long().cpu(), b.flatten().long().cpu()
    n = a.numel()
    if n == 0:
        return 0.0
    pair_ids, joint = torch.unique(a * vocab_size + b, return_counts=True)
    pa = torch.bincount(a, minlength=vocab_size).double() / n
    pb = torch.bincount(b, minlength=vocab_size).double() / n
    pj = joint.double() / n
    ia, ib = pair_ids // vocab_size, pair_ids % vocab_size
    plug_in = float((pj * (pj / (pa[ia] * pb[ib])).log2()).sum())
    # Miller-Madow correction of the plug-in estimator's upward bias (occupied cells / 2N).
    bias = (pair_ids.numel() - int((pa > 0).sum()) - int((pb > 0).sum()) + 1) / (2 * n * math.log(2))
    return max(0.0, plug_in - bias)


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [0, 1]."""
    mse = ((reference.float() - reconstruction.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def measure(tok: VisualTokenizer, batches: Iterable[torch.Tensor], max_images: int | None = None) -> dict[str, float]:
    """Usage/perplexity; stability (agreement) and the information kept (MI, bits/token) under a
    1-pixel shift and a flip round trip; PSNR with a decoder."""
    counts = torch.zeros(tok.vocab_size, dtype=torch.float64)
    sums = {"psnr": 0.0}
    pairs: dict[str, list[list[torch.Tensor]]] = {"shift": [[], []], "flip": [[], []]}
    n = 0
    for images in batches:
        if max_images is not None and n >= max_images:
            break
        if max_images is not None:
            images = images[: max_images - n]
        b = images.shape[0]
        tokens = tok.tokenize(images)
        counts += token_histogram(tokens, tok.vocab_size)
        for name, fn in (("shift", shift_pairs), ("flip", flip_pairs)):
            x, y = fn(tok, images)
            pairs[name][0].append(x.cpu())
            pairs[name][1].append(y.cpu())
        if tok.has_decoder:
            sums["psnr"] += psnr(images, tok.decode(tokens).cpu()) * b
        n += b
    if n == 0:
        raise ValueError("no images to measure the tokenizer on")
    out = usage_and_perplexity(counts)
    for name, (xs, ys) in pairs.items():
        x, y = torch.cat(xs), torch.cat(ys)
        out[f"{name}_stability"] = float((x == y).double().mean())
        out[f"{name}_info_bits"] = mutual_information_bits(x, y, tok.vocab_size)
    out["entropy_bits"] = math.log2(out["perplexity"])
    if tok.has_decoder:
        out["psnr"] = sums["psnr"] / n
    out["num_images"] = n
    return out
