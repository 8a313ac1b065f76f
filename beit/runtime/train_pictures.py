"""Pretraining pictures for the trackers (--report_to) every N optimizer steps: masks, tokens, reconstructions.

Drawn from the step's last micro-batch (its images, masks, target tokens and the logits the model
already produced), so there is no extra forward pass: the cost is a few tensor ops on ``count``
images, the tokenizer's decoder on them (when it has one) and TensorBoard's PNG encoding. Only the
main process draws. The loop hands over tensors; the tokenizer is reached only through its
interface (``has_decoder`` / ``decode``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

MASK_RGB = (0.9, 0.15, 0.1)
GREY, RIGHT, WRONG = (0.85, 0.85, 0.85), (0.1, 0.7, 0.2), (0.85, 0.1, 0.1)


def _rgb(c, ref: torch.Tensor) -> torch.Tensor:
    return torch.tensor(c, dtype=torch.float32, device=ref.device).view(1, 3, 1, 1)


def _row(images: torch.Tensor) -> torch.Tensor:
    """[k, 3, S, S] in [0, 1] -> one [3, S, k*S] strip with a 2 px white gap between images."""
    pad = F.pad(images, (0, 2, 0, 2), value=1.0)
    return torch.cat(list(pad), dim=2)


def _hwc_uint8(strips: list[torch.Tensor]):
    return (torch.cat(strips, dim=1).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


class TrainingPictures:
    """``pictures(step, images, mask, tokens, logits)`` when ``pictures.due(step)``: logs three pictures
    of the first ``count`` images of the batch (``images`` normalised encoder views, ``mask`` bool
    [B, h, w], ``tokens`` [B, h, w] targets, ``logits`` [masked, vocab] in mask order)."""

    def __init__(self, logger, tokenizer, every: int, count: int = 4, vocab_size: int | None = None):
        from beit.viz.figures import palette

        self.logger, self.tokenizer, self.every, self.count = logger, tokenizer, int(every), int(count)
        n = vocab_size or getattr(tokenizer, "vocab_size", None)
        self.palette = torch.from_numpy(palette(n)).float()

    def due(self, step: int) -> bool:
        return self.every > 0 and self.logger.main and step % self.every == 0

    @torch.no_grad()
    def __call__(self, step: int, images: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor,
                 logits: torch.Tensor) -> dict:
        k = min(self.count, images.shape[0])
        h, w = mask.shape[1:]
        m = mask[:k].reshape(k, -1).bool()
        target = tokens[:k].reshape(k, -1)
        pred = target.clone()
        pred[m] = logits[:int(m.sum())].float().argmax(-1).to(pred.dtype)
        size = images.shape[-2:]
        mean, std = _rgb(IMAGENET_DEFAULT_MEAN, images), _rgb(IMAGENET_DEFAULT_STD, images)
        view = (images[:k].float() * std + mean).clamp(0, 1)
        up = lambda x: F.interpolate(x, size=size, mode="nearest")  # noqa: E731
        mask_up = up(m.view(k, 1, h, w).float())
        masked = view * (1 - 0.55 * mask_up) + 0.55 * mask_up * _rgb(MASK_RGB, view)
        pal = self.palette.to(images.device)
        grid = lambda ids: pal[ids].view(k, h, w, 3).permute(0, 3, 1, 2)  # noqa: E731
        mk = m.view(k, 1, h, w)
        predicted = torch.where(mk, grid(pred), _rgb(GREY, view))
        right = (pred == target).view(k, 1, h, w)
        agree = torch.where(mk, torch.where(right, _rgb(RIGHT, view), _rgb(WRONG, view)), _rgb(GREY, view))
        out = {"pictures/masks": _hwc_uint8([_row(view), _row(masked)]),
               "pictures/tokens": _hwc_uint8([_row(up(grid(target))), _row(up(predicted)), _row(up(agree))])}
        tok = self.tokenizer
        if tok is not None and tok.has_decoder:
            ids = torch.stack([target, torch.where(m, pred, target)]).view(2 * k, h, w)
            rec = F.interpolate(tok.decode(ids.to(tok.device)).to(images.device).float(), size=size,
                                mode="bilinear", align_corners=False)
            out["pictures/reconstruction"] = _hwc_uint8([_row(view), _row(rec[:k]), _row(rec[k:])])
        self.logger.log_images(out, step)
        return out
