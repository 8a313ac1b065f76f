"""A run folder as ``beit viz`` sees it: its stage, config, summary and the weights of a checkpoint.

Stages are told apart by their saved ``config.yaml`` (a pretraining run has a ``tokenizer``, a
fine-tuning run a ``task``). ``--checkpoint`` picks the weights: empty = the newest complete
checkpoint (else the run's final weights), a step number, a checkpoint folder or a .safetensors file.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from beit.checkpoints.checkpointing import checkpoint_path, list_complete

FINAL_WEIGHTS = {"pretrain": "pretrained.safetensors", "finetune": "model.safetensors"}
SUMMARY_FILES = {"pretrain": "final_metrics.json", "finetune": "final.json"}


@dataclass
class RunFolder:
    path: Path
    stage: str            # "pretrain" | "finetune"
    cfg: object           # PretrainConfig | FinetuneConfig
    summary: dict

    @property
    def task(self) -> str:
        return getattr(self.cfg, "task", "pretrain")


def open_run(path: str | Path) -> RunFolder:
    """Read ``path``'s config and summary; a folder that is not a run is a clear error."""
    from beit.config import apply_aliases, from_dict

    run = Path(path)
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run} is not a run folder (no config.yaml): pass the --output_dir of a "
                                "`beit pretrain` or `beit finetune` run")
    raw = yaml.safe_load(cfg_file.read_text()) or {}
    if "tokenizer" in raw and "task" not in raw:
        from beit.options.pretrain import PretrainConfig as cls
        stage = "pretrain"
    elif "task" in raw:
        from beit.options.finetune import FinetuneConfig as cls
        stage = "finetune"
    else:
        raise ValueError(f"{cfg_file} is neither a pretraining nor a fine-tuning config")
    known = {f for f in cls.__dataclass_fields__}
    raw = apply_aliases(cls, raw, str(cfg_file))  # a run of an older version: its options' old names
    cfg = from_dict(cls, {k: v for k, v in raw.items() if k in known}, source=str(cfg_file))
    summary_file = run / SUMMARY_FILES[stage]
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return RunFolder(run, stage, cfg, summary)


def resolve_weights(run: RunFolder, checkpoint: str = "") -> tuple[Path, str]:
    """(safetensors file, a label such as 'step 200') of the weights ``checkpoint`` names."""
    done = list_complete(run.path)
    if not checkpoint:
        if done:
            return done[-1][1] / "model.safetensors", f"checkpoint step {done[-1][0]}"
        final = run.path / FINAL_WEIGHTS[run.stage]
        if final.is_file():
            return final, final.name
        raise FileNotFoundError(f"{run.path} has no complete checkpoint and no {final.name} yet")
    if re.fullmatch(r"\d+", checkpoint):
        folder = checkpoint_path(run.path, int(checkpoint))
        if not (folder / "model.safetensors").is_file():
            have = ", ".join(str(s) for s, _ in done) or "none"
            raise FileNotFoundError(f"no complete checkpoint at step {checkpoint} in {run.path} (steps: {have})")
        return folder / "model.safetensors", f"checkpoint step {int(checkpoint)}"
    p = Path(checkpoint)
    if p.is_dir():
        p = p / "model.safetensors"
    if p.suffix != ".safetensors" or not p.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: expected a step number, a checkpoint folder or a "
                                ".safetensors file (pickled .pt/.pth files are not read here)")
    return p, p.parent.name if p.name == "model.safetensors" else p.name


def _state(file: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in load_file(str(file)).items()}


def load_model(run: RunFolder, file: Path, device) -> torch.nn.Module:
    """The run's model in eval mode with the weights of ``file``."""
    state = _state(file)
    if run.stage == "pretrain":
        from beit.modeling.backbones import backbone_for

        if "lm_head.weight" not in state:
            raise ValueError(f"{file} holds no lm_head: not the weights of a pretraining run")
        model = backbone_for(run.cfg.arch, pretraining=True).build_mim(run.cfg, int(state["lm_head.weight"].shape[0]))
    else:
        from beit.tasks import build_model

        cfg = replace(run.cfg, init="", drop_path=0.0)
        model = build_model(cfg, cfg.num_classes, log=lambda m: None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{file} does not fit the model of {run.path / 'config.yaml'}: missing "
                         f"{sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}")
    return model.to(device).eval()


def class_names(run: RunFolder) -> list[str]:
    """Class names of a fine-tuning run (its final.json, else the shards' manifest, else numbers)."""
    names = run.summary.get("class_names")
    if not names:
        try:
            from beit.data.pipelines.labelled import class_names_of, manifest_label_map
            label_map, _ = manifest_label_map(run.cfg.train_shards)
            names = class_names_of(label_map) if label_map else None
        except (ValueError, FileNotFoundError):
            names = None
    n = run.cfg.num_classes
    return list(names) if names and len(names) == n else [str(i) for i in range(n)]
