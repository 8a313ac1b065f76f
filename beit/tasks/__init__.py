"""Fine-tune tasks (``beit finetune --task``): what a task builds, trains against, scores and exports.

Each task is one module here with a ``Task`` subclass (``base.py`` says what one provides), registered in
``_REGISTRY`` below and imported lazily, as ``beit.tokenizers`` does: adding a task is one new module and one
line here. The fine-tune run (beit.training.finetuning) never asks which task it has.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

from beit.tasks.base import Task

# name -> (module, class, what it is)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "classification": ("beit.tasks.classification", "Classification", "image classes: top-1/top-5, confusion matrix"),
    "segmentation": ("beit.tasks.segmentation", "Segmentation", "image + seg.png shards, UperNet head, mIoU"),
    "distill": ("beit.tasks.distillation", "Distillation", "a timm student taught by a fine-tuned --teacher"),
}
TASKS: tuple[str, ...] = tuple(_REGISTRY)


@lru_cache(maxsize=None)
def get_task(name: str) -> Task:
    """The registered task ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; choose one of {list(TASKS)}")
    module, cls, _ = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)()


def describe_tasks() -> str:
    return " | ".join(f"{k} ({v[2]})" for k, v in _REGISTRY.items())


def build_model(cfg, num_classes: int, log=print):
    """The model a fine-tune config trains (its task's, on its backbone) with its initial weights."""
    return get_task(cfg.task).build_model(cfg, num_classes, log)


__all__ = ["Task", "TASKS", "get_task", "describe_tasks", "build_model"]
