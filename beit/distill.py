"""Distil a fine-tuned classifier (e.g. our BEiT export) into a small timm student such as MobileViT.

    beit distill --teacher runs/ft/model.safetensors --model mobilevit_xxs \
        --train_shards 'labelled/train-*.tar' --val_shards 'labelled/val-*.tar' \
        --unlabelled_shards 'pretrain/train-*.tar' --output_dir runs/distill

The same options and machinery as ``beit finetune`` (this is ``beit finetune --task distill``, beit.tasks.distillation):
AdamW + warmup/cosine without layer-wise decay, EMA, checkpoints and resume, held-out evaluation,
the timm export. Loss: ``distill_alpha`` x cross-entropy on the labelled images + (1 - alpha) x T^2 x
KL to the teacher's softened predictions on the labelled AND unlabelled images.
"""
from __future__ import annotations

import sys

from beit.config import parse_config
from beit.options.finetune import FinetuneConfig
from beit.training.finetuning import run_finetuning


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--task" or a.startswith("--task=") for a in argv):
        raise ValueError("beit distill sets --task distill itself; leave --task out")
    return run_finetuning(parse_config(FinetuneConfig, ["--task", "distill", *argv], description=__doc__))


if __name__ == "__main__":
    from beit.cli import call
    sys.exit(call(main))
