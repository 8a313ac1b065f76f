"""What a fine-tune task provides to the fine-tune run; the defaults are those of image classification."""
from __future__ import annotations

from pathlib import Path

from torch import nn


class Task:
    labelled_folders = True   # --data is a folder with one sub-folder per class
    outputs = ""              # files beside model.safetensors that the final log names
    export_format = "timm-loadable"  # what model.safetensors is, for the final log

    def check(self, cfg) -> None:
        """Option checks of this task that need no files (raise ValueError naming the option)."""

    def shard_options(self, cfg) -> tuple[str, ...]:
        """Options holding shard specs that must expand at start-up (beyond train_shards / val_shards)."""
        return ()

    def build_model(self, cfg, num_classes: int, log=print) -> nn.Module:
        from beit.modeling.backbones import backbone_for
        return backbone_for(cfg.model).build_classifier(cfg, num_classes, log)

    def prepare(self, model: nn.Module, accelerator) -> nn.Module:
        """The model as the processes train it (before ``accelerator.prepare``)."""
        return model

    def loaders(self, cfg, accelerator, num_classes: int):
        """(training loader, held-out loader or None)."""
        from beit.data.pipelines.labelled import build_loaders
        return build_loaders(cfg, accelerator, num_classes)

    def teacher(self, cfg, num_classes: int, accelerator) -> nn.Module | None:
        """A frozen model whose outputs the loss also reads (distillation), else None."""
        return None

    def describe(self, cfg) -> str:
        """A line for the start-up log ("" for none)."""
        return ""

    def param_groups(self, cfg, model: nn.Module) -> list[dict]:
        """AdamW groups: layer-wise lr decay for a fine-tuned encoder, plain weight-decay groups for a probe."""
        from beit.modeling.classifier import layer_decay_param_groups
        from beit.optim import param_groups_weight_decay
        if cfg.linear_probe:
            return param_groups_weight_decay(model, cfg.weight_decay)
        return layer_decay_param_groups(model, cfg.weight_decay, cfg.layer_decay)

    def criterion(self, cfg, num_classes: int):
        """(loss, mixup_fn or None)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, ema, loader, accelerator, num_classes: int, cfg) -> dict:
        raise NotImplementedError

    def finish(self, model: nn.Module, out: Path, cfg, results: dict, final: dict, class_names) -> str:
        """Write the task's outputs (main process); returns the final log line's scores."""
        raise NotImplementedError
