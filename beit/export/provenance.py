"""Where a fine-tuned model comes from, as a plain dict the model cards are written from: the fine-tune's data,
recipe and held-out scores (its config and final.json), the pretraining it started from (``--init`` ->
``pretrained.json`` / the pretraining run's config.yaml and final_metrics.json) and the versions it was made
with. Recorded in the export's JSON (``provenance``) so a later export of that export (ONNX) still knows it."""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

import yaml

FINETUNE_KEYS = ("image_size", "epochs", "batch_size", "grad_accum_steps", "global_batch_size", "lr", "min_lr",
                 "warmup_epochs", "layer_decay", "weight_decay", "drop_path", "label_smoothing", "mixup", "cutmix",
                 "auto_augment", "reprob", "model_ema", "seed")
SEGMENTATION_KEYS = ("seg_channels", "seg_aux_weight", "seg_scale_min", "seg_scale_max", "reduce_zero_label")
DISTILL_KEYS = ("teacher", "unlabelled_shards", "distill_temperature", "distill_alpha")
PRETRAIN_KEYS = ("arch", "image_size", "patch_size", "model_size", "tokenizer", "tokenizer_path", "num_masking_patches",
                 "mask_ratio", "epochs", "total_steps", "batch_size", "global_batch_size", "lr", "weight_decay",
                 "warmup_epochs", "drop_path", "seed")


def versions(*extra: str) -> dict:
    """Python, this project (version and git commit), torch, timm and ``extra`` packages, as installed now."""
    from beit.compare.report import code_version
    out = {"python": platform.python_version()}
    for dist in ("beit-pipeline", "torch", "timm", *extra):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    code = code_version()
    out["beit-pipeline commit"] = (code["commit"][:12] + (" (with uncommitted changes)" if code["dirty"] else "")
                                   if code.get("commit") else None)
    return out


def _data_of(config: dict) -> list[str] | str:
    return config.get("data") or config.get("train_shards") or config.get("data_shards") or []


def pretraining_record(init: str) -> dict | None:
    """What ``--init`` was: our pretraining run (its data, tokenizer, recipe, steps and held-out masked-token
    accuracy, read from pretrained.json or the run's config.yaml) or another file (nothing known about it)."""
    if not init:
        return None
    p = Path(init)
    meta = p / "pretrained.json" if p.is_dir() else p.with_suffix(".json")
    config, run_dir, step = None, None, None
    if meta.is_file():
        saved = json.loads(meta.read_text())
        config, run_dir, step = saved.get("pretrain_config"), meta.parent, saved.get("step")
    elif p.is_dir() and p.parent.name == "checkpoints" and (p.parent.parent / "config.yaml").is_file():
        run_dir = p.parent.parent
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        step = int(p.name.rpartition("_")[2]) if p.name.rpartition("_")[2].isdigit() else None
    if not isinstance(config, dict) or "tokenizer" not in config:
        return {"source": init, "ours": False}
    record = {"source": init, "ours": True, "run": str(run_dir), "data": _data_of(config),
              "held_out": config.get("val_shards") or [], "steps": step,
              **{k: config.get(k) for k in PRETRAIN_KEYS}}
    final = run_dir / "final_metrics.json"
    if final.is_file():
        scores = json.loads(final.read_text())
        record.update({k.replace("/", "_"): scores[k] for k in ("val/mim_acc", "val/majority_acc", "val/images")
                       if k in scores})
    return record


def provenance(cfg, metrics: dict | None, class_names: list[str] | None, *, weights: str = "final",
               step: int | None = None, run_dir: str | Path | None = None) -> dict:
    """The record of a fine-tuned model (``cfg``: its run's FinetuneConfig; ``metrics``: its final.json)."""
    from beit.config import to_dict
    c = to_dict(cfg)
    run = Path(run_dir) if run_dir is not None else Path(c["output_dir"])
    own = _recorded(run)    # the record the run wrote at its end, made where it trained (its relative paths resolve)
    if c.get("data"):
        held = c.get("val_data") or c.get("val_shards") or (f"{c['val_fraction']:.0%} of each class of {c['data']}"
                                                             if c.get("val_fraction") else [])
    else:
        held = c.get("val_shards") or []
    keys = FINETUNE_KEYS + (SEGMENTATION_KEYS if c["task"] == "segmentation" else ()) + \
        (DISTILL_KEYS if c["task"] == "distill" else ())
    scores = {k: v for k, v in (metrics or {}).items() if not isinstance(v, (list, dict)) and k != "class_names"}
    return {
        "task": c["task"], "model": c["model"], "linear_probe": bool(c.get("linear_probe")),
        "probe_block": c.get("probe_block"), "weights": weights, "step": step if step is not None
        else (metrics or {}).get("step"),
        "classes": {"count": c["num_classes"], "names": list(class_names) if class_names else None},
        "finetune": {"run": str(run), "train": _data_of(c), "held_out": held, **{k: c.get(k) for k in keys}},
        "init": c.get("init") or "",
        "pretraining": own.get("pretraining") if own.get("pretraining") else pretraining_record(c.get("init") or ""),
        "metrics": scores,
        "versions": versions(),
    }


def _recorded(run: Path) -> dict:
    """The provenance a run's own export recorded (``<run>/model.json``), or {}."""
    meta = run / "model.json"
    try:
        return json.loads(meta.read_text()).get("provenance") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def recorded_provenance(config: dict) -> dict:
    """An export JSON's provenance; for an export that predates the record, what its JSON itself says (the
    pretraining and the fine-tune's data then read "not recorded")."""
    if config.get("provenance"):
        return config["provenance"]
    from beit.export.segmentation import BEIT_SEG, SWIN_SEG
    seg = config.get("architecture") in (BEIT_SEG, SWIN_SEG)
    n = config.get("num_classes") or (config.get("model_kwargs") or {}).get("num_classes")
    return {"task": "segmentation" if seg else "classification", "model": config.get("architecture"),
            "linear_probe": bool(config.get("linear_probe_block")), "probe_block": config.get("linear_probe_block"),
            "classes": {"count": n, "names": config.get("class_names")}, "init": None, "finetune": {},
            "metrics": {k: v for k, v in (config.get("metrics") or {}).items() if not isinstance(v, (list, dict))}}
