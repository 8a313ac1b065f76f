"""One fine-tuning epoch, evaluation (top-1 / top-5, confusion matrix) and its PNG."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from beit.data.loading.heldout import good_rows
from beit.runtime.data_wait import DataWait


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Iterable[int] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at #classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(target[:, None])
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


def new_epoch_sums() -> dict:
    """The running sums ``train_one_epoch`` reports its epoch means from."""
    return {"loss": 0.0, "n": 0, "skipped": 0}


def train_one_epoch(model: nn.Module, loader, optimizer, schedule, accelerator, criterion: Callable, *,
                    epoch: int, step: int, max_steps: int, mixup_fn=None, ema=None, clip_grad: float = 0.0,
                    on_step: Callable[[int, dict], None] | None = None, progress=None,
                    teacher: nn.Module | None = None, sums: dict | None = None) -> tuple[int, dict]:
    """Train over one epoch of ``loader``; returns (optimizer steps done so far, epoch means).

    ``step`` counts optimizer steps (one per ``grad_accum_steps`` micro-batches); the lr/wd schedule
    advances once per optimizer step. ``on_step(step, metrics)`` runs after each optimizer step
    (logging, checkpoints). A non-finite loss skips the update instead of corrupting the weights.
    With a ``teacher`` (distillation) the loss is ``criterion(logits, targets, teacher_logits)``.
    ``sums`` (updated in place) holds the epoch's running loss sum and step counts, so a checkpoint taken
    mid-epoch can record them and a resumed epoch reports the same means as an uninterrupted one.
    """
    from beit.optim.step_work import OptimizerStep
    model.train()
    dev = accelerator.device
    opt = OptimizerStep(accelerator, model, optimizer)
    sums = new_epoch_sums() if sums is None else sums
    if step >= max_steps:  # resumed from a stop at this epoch's last step: nothing left to train (nor to read)
        return step, {"train_loss": sums["loss"] / max(1, sums["n"]), "skipped_steps": sums["skipped"],
                      "data_wait_fraction": 0.0}
    window = torch.zeros(2, device=dev)  # over the current accumulation window: sum of losses, non-finite count
    n_micro = 0
    waiting = DataWait(loader)
    for batch in waiting:
        if step >= max_steps:
            break
        images = batch["image"].to(dev, non_blocking=True)
        targets = batch["label"].to(dev, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                if teacher is None:
                    loss = criterion(model(images), targets)
                else:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
                    loss = criterion(model(images), targets, teacher_logits)
            # finiteness stays on the device: no host sync and no collective per micro-step; a
            # non-finite loss makes the window's gradients non-finite, and the step is dropped
            accelerator.backward(loss)
            finite = torch.isfinite(loss.detach())
            window += torch.stack([torch.where(finite, loss.detach().float(), 0.0), (~finite).float()])
            n_micro += 1
            if accelerator.sync_gradients:
                lr, wd = schedule.step()
                # the norm is logged as in pretraining (train/grad_norm); clipped only if asked
                norm = opt.clip(clip_grad if clip_grad > 0 else float("inf"))
                norm = norm.detach().float() if torch.is_tensor(norm) else torch.tensor(float("nan"), device=dev)
                if accelerator.scaler is None:
                    window[1] += (~torch.isfinite(norm)).float()
                # one collective and one host sync per optimizer step: [mean loss, ranks with a bad window, norm]
                mean_loss, bad, grad_norm = accelerator.reduce(
                    torch.stack([window[0] / n_micro, (window[1] > 0).float(), norm]), reduction="sum").tolist()
                grad_norm /= accelerator.num_processes  # the same all-reduced gradients on every rank
                finite = bad == 0
                if finite:
                    opt.step()
                else:
                    sums["skipped"] += 1
                opt.zero_grad()
                window, n_micro = torch.zeros(2, device=dev), 0
                step += 1
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model), step=step)
                # the optimizer step's loss: mean over its micro-batches and over the ranks
                value = mean_loss / accelerator.num_processes if finite else float("nan")
                if finite:
                    sums["loss"] += value
                    sums["n"] += 1
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", refresh=False)  # drawn by update
                if on_step is not None:
                    on_step(step, {"epoch": epoch, "step": step, "loss": value, "lr": lr, "wd": wd,
                                   # of the epoch so far
                                   "grad_norm": grad_norm, "data_wait_fraction": waiting.fraction()})
    return step, {"train_loss": sums["loss"] / max(1, sums["n"]), "skipped_steps": sums["skipped"],
                  "data_wait_fraction": waiting.fraction()}


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator, num_classes: int) -> dict:
    """Top-1 / top-5 accuracy, mean cross-entropy and the confusion matrix over every held-out
    sample, summed across ranks (ranks may hold different numbers of samples). Samples the loader
    could not decode (``bad`` set) are counted in ``bad_samples`` and left out of the scores."""
    model.eval()
    dev = accelerator.device
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=dev)
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # top5 hits, loss, samples, bad
    for batch in loader:
        ok = good_rows(batch).to(dev)
        sums[3] += int((~ok).sum())
        if not ok.any():
            continue
        images, target = batch["image"].to(dev, non_blocking=True)[ok], batch["label"].to(dev)[ok]
        with accelerator.autocast():
            logits = model(images).float()
        sums[1] += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        sums[0] += topk_correct(logits, target, ks=(5,))[0]
        sums[2] += len(target)
        cm += torch.bincount(target * num_classes + logits.argmax(1), minlength=num_classes ** 2).view_as(cm)
    cm = accelerator.reduce(cm, reduction="sum").cpu()
    top5, loss, n, bad = accelerator.reduce(sums, reduction="sum").cpu().tolist()
    if n == 0:
        raise RuntimeError(f"the held-out loader gave no usable samples ({int(bad)} bad): check --val_shards")
    return {"top1": 100.0 * float(cm.trace()) / n, "top5": 100.0 * top5 / n, "loss": loss / n,
            "samples": int(n), "bad_samples": int(bad), "confusion": cm.tolist()}


def title_lines(title: str, inches: float) -> str:
    """``title`` wrapped to a figure ``inches`` wide (about 9 characters of the 10 pt title per inch)."""
    return textwrap.fill(title, width=max(30, int(inches * 9)), break_on_hyphens=False)


def save_confusion_png(matrix: list[list[int]], path: str | Path, class_names: list[str] | None = None,
                       title: str = "") -> Path:
    """Row-normalised confusion matrix (true class = row) with the counts written in each cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cm = np.asarray(matrix, dtype=np.int64)
    n = cm.shape[0]
    names = class_names or [str(i) for i in range(n)]
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = min(20.0, 2.0 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    title = title or f"confusion matrix ({int(cm.sum())} samples, top-1 {np.trace(cm) / max(1, cm.sum()):.1%})"
    ax.set_title(title_lines(title, size), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
