"""Knowledge distillation: a frozen fine-tuned teacher (our classifier export) and the student's loss."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class Teacher(nn.Module):
    """A frozen classifier in eval mode; resizes the student's (already normalised) batch to its own input size."""

    def __init__(self, model: nn.Module, img_size: int, interpolation: str = "bicubic"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.img_size, self.interpolation = int(img_size), interpolation

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: no dropout, no drop path, fixed statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.img_size or images.shape[-2] != self.img_size:
            images = F.interpolate(images, size=(self.img_size, self.img_size), mode=self.interpolation,
                                   align_corners=False)
        return self.model(images).float()


def load_teacher(path: str | Path, *, num_classes: int, mean, std) -> Teacher:
    """The fine-tuned classifier exported at ``path`` (``model.safetensors`` + JSON) as a frozen ``Teacher``.
    Its classes and input normalisation must be the student's (else a clear error)."""
    from beit.checkpoints.checkpointing import load_weights
    from beit.export.classifier import load_exported
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"--teacher {path}: no fine-tuned model there (a fine-tune run writes "
                                "<output_dir>/model.safetensors)")
    _, config = load_weights(p)
    if config is None or "num_classes" not in config:
        raise FileNotFoundError(f"--teacher {p}: its export config {p.with_suffix('.json')} is missing")
    if int(config["num_classes"]) != num_classes:
        raise ValueError(f"--teacher {p} predicts {config['num_classes']} classes, the student {num_classes}")
    for name, mine in (("mean", mean), ("std", std)):
        theirs = config.get(name)
        if theirs is not None and any(abs(a - b) > 1e-6 for a, b in zip(theirs, mine)):
            raise ValueError(f"--teacher {p} was fine-tuned with {name} {theirs}, the student uses {list(mine)}; "
                             f"pass --{name} {theirs}")
    return Teacher(load_exported(p), img_size=int(config["input_size"][-1]),
                   interpolation=config.get("interpolation") or "bicubic")


class DistillLoss(nn.Module):
    """``alpha`` x cross-entropy on the labelled rows (label >= 0) + ``(1 - alpha)`` x T^2 x KL(teacher_T || student_T)
    on every row (labelled and unlabelled), T the temperature (Hinton et al., 2015)."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5, label_smoothing: float = 0.0):
        super().__init__()
        if temperature <= 0 or not 0 <= alpha <= 1:
            raise ValueError(f"need temperature > 0 and 0 <= alpha <= 1, got {temperature}, {alpha}")
        self.t, self.alpha, self.smoothing = float(temperature), float(alpha), float(label_smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        soft = F.kl_div(F.log_softmax(logits / self.t, -1), F.log_softmax(teacher_logits.float() / self.t, -1),
                        log_target=True, reduction="batchmean") * self.t ** 2
        labelled = targets >= 0
        hard = (F.cross_entropy(logits[labelled], targets[labelled], label_smoothing=self.smoothing)
                if bool(labelled.any()) else logits.sum() * 0.0)
        return self.alpha * hard + (1 - self.alpha) * soft
