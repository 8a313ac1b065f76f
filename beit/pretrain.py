"""BEiT masked-image-modelling pretraining on sharded WebDataset streams (or a folder of images).

    accelerate launch beit/pretrain.py --config launch/pretrain_beit_base_in1k.yaml --output_dir runs/x
    python -m beit.pretrain --config launch/demo_pretrain.yaml --lr 1e-3
    beit pretrain --data my_photos/ --tokenizer_path runs/tok --output_dir runs/x

Options: dataclass defaults < --config YAML < --flag value (``--help`` lists every option). The run
resumes automatically from the newest complete checkpoint in --output_dir.

This file parses the options and runs ``beit.training.pretraining.run_pretraining``: check every input
(before any compute), hold the run folder, build (model, tokenizer, optimizer, schedule, loader), resume,
run the engine (beit.engines.pretrain) epoch after epoch with checkpoints, write the weights and the
held-out score. Bad input ends with exit code 2, a fault during the run with 1 (one line, no traceback).
"""
from __future__ import annotations

import sys

from beit.config import parse_config
from beit.options.pretrain import PretrainConfig
from beit.runtime.faults import SetupError
from beit.training.pretraining import run_pretraining

__all__ = ["main", "PretrainConfig", "SetupError"]


def main(argv: list[str] | None = None, cfg: PretrainConfig | None = None) -> dict:
    """Parse ``argv`` (or take ``cfg``) and run (or resume) the pretraining; returns the final summary."""
    cfg = cfg or parse_config(PretrainConfig, argv, description=__doc__)
    return run_pretraining(cfg)


if __name__ == "__main__":
    from beit.cli import call
    sys.exit(call(main))
