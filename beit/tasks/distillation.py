"""Knowledge distillation into a small timm student (``beit distill`` = ``beit finetune --task distill``): each
labelled batch goes out with a batch of unlabelled shards that a frozen fine-tuned teacher labels softly; loss
``distill_alpha`` x cross-entropy on the labels + (1 - alpha) x T^2 x KL to the teacher; no layer-wise decay
(the student starts from scratch); scored and exported as a classifier."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from beit.config import Options, field
from beit.tasks.classification import Classification


@dataclass
class DistillOptions(Options):
    """The teacher, the unlabelled stream it labels, and the loss of ``--task distill``."""
    teacher: str = field("", help="distill: the teacher, a fine-tuned classifier export (<run>/model.safetensors)")
    unlabelled_shards: list[str] = field(default_factory=list, help="distill: unlabelled shards (e.g. the "
                                         "pretraining shards; labels ignored) that the teacher labels softly, a batch "
                                         "of them beside each labelled batch")
    unlabelled_batch_size: int = field(0, help="distill: unlabelled images per batch (0 = batch_size)")
    distill_temperature: float = field(4.0, help="distill: softmax temperature of the soft (teacher) loss")
    distill_alpha: float = field(0.5, help="distill: weight of the hard-label loss (labelled rows); 1 - alpha for "
                                           "the soft loss on every row")



class Distillation(Classification):
    def check(self, cfg) -> None:
        if cfg.model == "beit" or cfg.linear_probe:
            raise ValueError("--task distill trains a timm student: pass --model mobilevit_xxs (or _xs, _s, any timm "
                             "name)")
        if not cfg.teacher:
            raise ValueError("--task distill needs --teacher <fine-tuned run>/model.safetensors")
        if not Path(cfg.teacher).exists():
            raise ValueError(f"--teacher {cfg.teacher} does not exist")
        if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0:
            raise ValueError("--task distill uses the teacher's soft labels, not mixup/cutmix: pass --mixup 0 --cutmix "
                             "0")
        if cfg.distill_temperature <= 0 or not 0 <= cfg.distill_alpha <= 1:
            raise ValueError("need --distill_temperature > 0 and 0 <= --distill_alpha <= 1")

    def shard_options(self, cfg) -> tuple[str, ...]:
        if not cfg.unlabelled_shards:
            raise ValueError("--task distill needs --unlabelled_shards (e.g. the pretraining shards)")
        return ("unlabelled_shards",)

    def loaders(self, cfg, accelerator, num_classes: int):
        from beit.data.pipelines.distillation import PairedLoader, build_unlabelled_loader
        from beit.data.pipelines.labelled import build_transforms
        train, val = super().loaders(cfg, accelerator, num_classes)
        return PairedLoader(train, build_unlabelled_loader(cfg, accelerator, build_transforms(cfg, True))), val

    def teacher(self, cfg, num_classes: int, accelerator) -> nn.Module:
        from beit.modeling.distill import load_teacher
        return load_teacher(cfg.teacher, num_classes=num_classes, mean=cfg.mean, std=cfg.std).to(accelerator.device)

    def describe(self, cfg) -> str:
        return (f"distilling {cfg.teacher} into {cfg.model}: temperature {cfg.distill_temperature:g}, hard-label "
                f"weight {cfg.distill_alpha:g}; each batch {cfg.batch_size} labelled + "
                f"{cfg.unlabelled_batch_size or cfg.batch_size} unlabelled images ({', '.join(cfg.unlabelled_shards)})")

    def param_groups(self, cfg, model: nn.Module) -> list[dict]:
        from beit.modeling.classifier import layer_decay_param_groups
        return layer_decay_param_groups(model, cfg.weight_decay, 1.0)

    def criterion(self, cfg, num_classes: int):
        from beit.modeling.distill import DistillLoss
        return DistillLoss(cfg.distill_temperature, cfg.distill_alpha, cfg.label_smoothing), None
