"""Fine-tune a pretrained encoder (or any timm model) on labelled WebDataset shards or class folders.

    beit finetune --data my_labelled/ --init runs/pretrain/pretrained.safetensors   # class folders, 20% held out
    beit finetune --config beit_base_in1k --init runs/pretrain/pretrained.safetensors \
        --train_shards 'in1k/train-{000000..001023}.tar' --val_shards 'in1k/val-{000000..000049}.tar'
    accelerate launch beit/finetune.py ...            # same flags on 1..N GPUs
    python -m beit.finetune ... --linear_probe true --probe_block 9
    python -m beit.finetune ... --model swin_tiny_patch4_window7_224   # a timm baseline
    python -m beit.finetune ... --task segmentation --num_classes 150  # ADE20K-style image + seg.png shards

Recipe (BEiT): AdamW, warmup + per-step cosine, layer-wise lr decay, drop path, Mixup/CutMix with
label smoothing, RandAugment + random erasing, mean pooling + fc_norm, head init scale, optional EMA.
Writes metrics.jsonl, checkpoints (resumed automatically), final.json, confusion_matrix.png and
the fine-tuned weights (``model.safetensors`` + JSON, loadable by timm; see beit.export).

This file parses the options and runs ``beit.training.finetuning.run_finetuning``: hold the run folder,
resolve the data and classes, build the task's model (beit.tasks) on its backbone
(beit.modeling.backbones), resume, run the engine (beit.engines.finetune) with held-out evaluation and
checkpoints, write the results and the export. Bad input ends with exit code 2, a fault during the run
with 1 (one line, no traceback).
"""
from __future__ import annotations

import sys

from beit.config import parse_config
from beit.options.finetune import FinetuneConfig
from beit.training.finetuning import run_finetuning as run_finetune

__all__ = ["main", "run_finetune", "FinetuneConfig"]


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and run (or resume) the fine-tuning; returns the held-out results."""
    return run_finetune(parse_config(FinetuneConfig, argv, description=__doc__))


if __name__ == "__main__":
    from beit.cli import call
    sys.exit(call(main))
