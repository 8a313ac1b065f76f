"""``beit export`` and ``beit export-onnx``: a fine-tuned run's weights for timm / transformers / ONNX.

    beit export --run_dir runs/ft --out exported/model.safetensors [--ema]     # timm: + model.json
    beit export --run_dir runs/ft --out exported/hf_model --format hf           # a transformers folder
    beit export --run_dir runs/pretrain --out exported/beit_unilm.pth --format unilm   # a pretraining run, unilm
    python -m beit.export ...                                                   # the same as beit export
    beit export-onnx --model runs/ft/model.safetensors --out exported/model.onnx \
        [--val_shards 'digits/test-*.tar'] [--batch_size 1]

``beit export`` rebuilds the run's model from its config.yaml and loads its newest complete checkpoint
(its EMA weights with ``--ema``); ``--format unilm`` writes a BEiT pretraining run (BEiT v2's CLS-pretraining
branch included) in unilm's layout. ``beit export-onnx`` converts an export and checks it at once:
onnxruntime and PyTorch run the same inputs and their logits must agree.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from beit.checkpoints.safe_pickle import TRUST_PICKLE_HELP
from beit.config import field, parse_config


@dataclass
class ExportConfig:
    run_dir: str = field("", help="a beit finetune --output_dir (--format unilm: a beit pretrain --output_dir)")
    out: str = field("", help="output .safetensors path (a .json is written beside it); a folder for --format hf; "
                              "a .pth for --format unilm")
    ema: bool = field(False, help="export the EMA weights of the newest checkpoint")
    format: Literal["timm", "hf", "unilm"] = field(
        "timm", help="timm: OUT.safetensors + OUT.json (timm pretrained_cfg); hf: a transformers folder at OUT; "
                     "unilm: a pretraining run as OUT.pth ({'model': ...}, unilm's layout, BEiT v2's CLS branch "
                     "included) + OUT.json (unilm's class and arguments)")
    trust_pickle: bool = field(False, help=TRUST_PICKLE_HELP)

    def validate(self) -> None:
        if not self.run_dir or not self.out:
            raise ValueError("--run_dir and --out are required")


@dataclass
class OnnxExportConfig:
    model: str = field("", help="a fine-tuned model.safetensors (with its .json) from beit finetune / export")
    out: str = field("", help="output .onnx path (the .preprocess.json goes beside it)")
    val_shards: str = field("", help="held-out shards to check top-1 agreement on (default: random inputs)")
    batch_size: int = field(16, help="batch size of the check")
    opset: int = field(18, help="ONNX opset")
    atol: float = field(1e-3, help="largest logit difference accepted in the check")

    def validate(self) -> None:
        if not self.model or not self.out:
            raise ValueError("--model and --out are required")


def export_main(argv: list[str] | None = None) -> Path:
    """``beit export``: the newest complete checkpoint of a fine-tune run, as timm or transformers weights, with
    its model card (README.md beside the weights)."""
    from beit.config import to_dict
    from beit.export.card import card_of_export, write_model_card
    from beit.export.classifier import export_model, model_of_run
    from beit.export.preprocessing import eval_preprocessing
    from beit.export.provenance import provenance

    cfg = parse_config(ExportConfig, argv, description=__doc__)
    if cfg.format == "unilm":
        from beit.export.unilm import export_pretraining_run
        if cfg.ema:
            raise ValueError("--ema: a pretraining run keeps no EMA weights; leave it out with --format unilm")
        out, what = export_pretraining_run(cfg.run_dir, cfg.out)
        print(f"exported {what} -> {out} (+ {out.with_suffix('.json').name}: unilm's class and arguments)")
        return out
    model, run_cfg, ckpt = model_of_run(cfg.run_dir, ema=cfg.ema, trust_pickle=cfg.trust_pickle)
    final = Path(cfg.run_dir) / "final.json"
    metrics = json.loads(final.read_text()) if final.is_file() else None
    names = (metrics or {}).get("class_names")
    step = int(ckpt.name.rpartition("_")[2])
    prov = provenance(run_cfg, metrics, names, weights="ema" if cfg.ema else "final", step=step, run_dir=cfg.run_dir)
    if cfg.format == "hf":
        from beit.export.classifier import beit_arch_name, beit_kwargs_of, export_hf
        try:
            out = export_hf(model, cfg.out, run_cfg, class_names=names)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        card = write_model_card("hf", out / "model.safetensors", model, prov, eval_preprocessing(to_dict(run_cfg)),
                                architecture=beit_arch_name(beit_kwargs_of(run_cfg, model)), meta="config.json",
                                extra_versions=("transformers",))
        print(f"exported {ckpt} -> {out}/ (transformers BeitForImageClassification.from_pretrained; card {card})")
        return out
    out = export_model(model, cfg.out, run_cfg, class_names=names, metrics=metrics, provenance=prov)
    card = card_of_export(out, model)
    print(f"exported {ckpt} -> {out} (+ {out.with_suffix('.json')}, card {card})")
    return out


def onnx_main(argv: list[str] | None = None) -> dict:
    """``beit export-onnx``: an exported classifier as ONNX + its preprocessing, checked with onnxruntime."""
    from beit.checkpoints.checkpointing import load_weights
    from beit.export.classifier import load_exported
    from beit.export.onnx_export import check_onnx, export_onnx

    cfg = parse_config(OnnxExportConfig, argv, description=__doc__)
    if not Path(cfg.model).is_file():
        raise FileNotFoundError(f"--model {cfg.model} does not exist (a fine-tune run writes "
                                "<output_dir>/model.safetensors)")
    _, config = load_weights(cfg.model)
    if config is None or "input_size" not in config:
        raise FileNotFoundError(f"{Path(cfg.model).with_suffix('.json')} (the export's config) is missing")
    if config.get("linear_probe_block"):
        raise ValueError("a linear probe reads an intermediate block of a frozen encoder; export a fine-tuned "
                         "classifier")
    model = load_exported(cfg.model)
    onnx_path, spec_path = export_onnx(model, config, cfg.out, opset=cfg.opset)
    check = check_onnx(model, onnx_path, spec_path, cfg.val_shards, cfg.batch_size)
    latency = check["batch1_latency_ms"]
    print(f"exported {cfg.model} -> {onnx_path} (+ {spec_path.name}); onnxruntime vs PyTorch on {check['images']} "
          f"{'held-out' if cfg.val_shards else 'random'} inputs: same top-1 {check['same_top1']}/{check['images']}, "
          f"max |logit diff| {check['max_abs_logit_diff']:.2e}; batch-1 CPU latency {latency['onnxruntime']:.2f} ms "
          f"(onnxruntime) vs {latency['pytorch']:.2f} ms (PyTorch)")
    if check["same_top1"] != check["images"] or check["max_abs_logit_diff"] > cfg.atol:
        raise ValueError(f"the ONNX model disagrees with PyTorch (max |logit diff| {check['max_abs_logit_diff']:.3g} "
                         f"> --atol {cfg.atol} or a different top-1); try another --opset")
    print(f"model card: {_onnx_card(onnx_path, spec_path, model, config, cfg, check)}")
    return {k: v for k, v in check.items() if not k.endswith("_top1")}


def _onnx_card(onnx_path: Path, spec_path: Path, model, config: dict, cfg: OnnxExportConfig, check: dict) -> Path:
    from beit.export.card import write_model_card
    from beit.export.preprocessing import eval_preprocessing
    from beit.export.provenance import recorded_provenance
    notes = ""
    if "onnx_top1_accuracy" in check:
        notes = (f". Checked at export: the ONNX model's top-1 on {cfg.val_shards} is "
                 f"{check['onnx_top1_accuracy']:.2f}% ({check['images']} images; the same top-1 as PyTorch on "
                 f"{check['same_top1']}, largest logit difference {check['max_abs_logit_diff']:.2e})")
    return write_model_card("onnx", onnx_path, model, recorded_provenance(config), eval_preprocessing(config),
                            architecture=config["architecture"], meta=spec_path.name,
                            extra_versions=("onnx", "onnxruntime"), opset=cfg.opset, notes=notes)
