"""The model ``beit predict`` runs, from any of its three forms, with its classes and its own evaluation
preprocessing: a fine-tune run folder, an exported ``.safetensors`` (+ its ``.json``), an ``.onnx`` (+ its
``.preprocess.json``). The preprocessing is read from what the run or the export recorded
(``beit.export.preprocessing``); a model that records none needs ``--preprocessing``."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from beit.export.preprocessing import (
    SOURCES_HINT,
    EvalPreprocessing,
    MissingPreprocessing,
    SegPreprocessing,
    eval_preprocessing,
    seg_preprocessing,
)

FORMATS = "a fine-tune run folder, an exported .safetensors (with its .json) or an .onnx (with its .preprocess.json)"


@dataclass
class Predictor:
    """A loaded model: ``logits(batch)`` for a classifier, ``module`` (scored by sliding windows) for a segmenter."""
    kind: str                                        # "classifier" | "segmenter"
    source: str                                      # what was loaded, for the screen and the summary
    runtime: str                                     # "pytorch" | "onnxruntime"
    preprocessing: EvalPreprocessing | SegPreprocessing
    num_classes: int
    class_names: list[str]
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None   # [B, C, H, W] -> float32 [B, K] on the CPU
    module: torch.nn.Module | None = None
    device: torch.device = torch.device("cpu")
    metrics: dict = field(default_factory=dict)      # the fine-tune's own held-out scores, where recorded


def read_mapping(path: str | Path) -> dict:
    """A YAML / JSON mapping file (a run's config.yaml, a model.json, a .preprocess.json)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist")
    data = yaml.safe_load(p.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{p} is not a mapping of keys to values (expected {SOURCES_HINT})")
    return data


def _preprocessing(reader, own: dict | None, where: str, given: str):
    """The model's own preprocessing; ``given`` (--preprocessing) only where the model records none."""
    if not given:
        return reader(own or {}, where)
    if own is not None:
        try:
            pre = reader(own, where)
        except MissingPreprocessing:
            pass
        else:
            raise ValueError(f"{where} records the model's own preprocessing ({pre.describe()}); leave "
                             "--preprocessing out")
    return reader(read_mapping(given), given)


def _names(config: dict | None, num_classes: int) -> list[str]:
    names = (config or {}).get("class_names") or (config or {}).get("label_names")
    return [str(n) for n in names] if names and len(names) == num_classes else [str(i) for i in range(num_classes)]


def _torch_classifier(model: torch.nn.Module, device: torch.device):
    model = model.to(device).eval()

    @torch.no_grad()
    def logits(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device)).float().cpu()
    return logits


def _from_export(path: Path, given: str, device: torch.device, source: str, metrics: dict | None = None,
                 run_config: dict | None = None) -> Predictor:
    """An exported classifier or segmenter (safetensors + JSON); the preprocessing from ``run_config`` (a run
    folder's config.yaml) or else the export's JSON."""
    from beit.export.segmentation import BEIT_SEG, SWIN_SEG, load_seg_model
    meta = path.with_suffix(".json")
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} (the export's config: the model and its preprocessing) is missing; copy it "
                                f"beside {path.name}")
    config = json.loads(meta.read_text())
    own, where = (run_config, str(path.parent / "config.yaml")) if run_config is not None else (config, str(meta))
    metrics = metrics if metrics is not None else config.get("metrics") or {}
    if config.get("architecture") in (BEIT_SEG, SWIN_SEG):
        pre = _preprocessing(seg_preprocessing, own, where, given)
        module = load_seg_model(path).to(device)
        n = int(config["model_kwargs"]["num_classes"])
        return Predictor("segmenter", source, "pytorch", pre, n, _names(config, n), module=module, device=device,
                         metrics=metrics)
    from beit.export.classifier import load_exported
    pre = _preprocessing(eval_preprocessing, own, where, given)
    model = load_exported(path)
    n = int(config["num_classes"])
    return Predictor("classifier", source, "pytorch", pre, n, _names(config, n),
                     logits=_torch_classifier(model, device), device=device, metrics=metrics)


def _from_run(run: Path, given: str, device: torch.device) -> Predictor:
    """A fine-tune run folder: its final export (model.safetensors), else its newest complete checkpoint; the
    preprocessing of its config.yaml."""
    from beit.config import load_yaml, to_dict
    from beit.options.finetune import FinetuneConfig
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        if (run / "config.json").is_file() and (run / "preprocessor_config.json").is_file():
            raise ValueError(f"{run} is a Hugging Face transformers folder (beit export --format hf): load it with "
                             f"transformers as its README.md shows; beit predict takes {FORMATS}")
        raise ValueError(f"{run} is not a fine-tune run folder (no config.yaml); --model takes {FORMATS}")
    run_config = to_dict(load_yaml(FinetuneConfig, cfg_path))
    final = run / "final.json"
    metrics = json.loads(final.read_text()) if final.is_file() else {}
    if (run / "model.safetensors").is_file():
        return _from_export(run / "model.safetensors", given, device, f"{run} (model.safetensors)", metrics,
                            run_config)
    from beit.export.classifier import model_of_run
    model, cfg, ckpt = model_of_run(run)
    names = _names(metrics, cfg.num_classes)
    source = f"{run} (no model.safetensors yet: the newest complete checkpoint, {ckpt.name})"
    if cfg.task == "segmentation":
        pre = _preprocessing(seg_preprocessing, run_config, str(cfg_path), given)
        return Predictor("segmenter", source, "pytorch", pre, cfg.num_classes, names, module=model.to(device).eval(),
                         device=device, metrics=metrics)
    pre = _preprocessing(eval_preprocessing, run_config, str(cfg_path), given)
    return Predictor("classifier", source, "pytorch", pre, cfg.num_classes, names,
                     logits=_torch_classifier(model, device), device=device, metrics=metrics)


def _from_onnx(path: Path, given: str) -> Predictor:
    from beit.export.onnx_export import PREPROCESS_SUFFIX, onnx_session
    spec_path = path.with_name(path.stem + PREPROCESS_SUFFIX)
    spec = json.loads(spec_path.read_text()) if spec_path.is_file() else None
    if spec is None and not given:
        raise MissingPreprocessing(f"{path}: its preprocessing, {spec_path.name}, is not beside it (beit export-onnx "
                                   f"writes it there); copy it beside the model or pass --preprocessing with "
                                   f"{SOURCES_HINT}")
    pre = _preprocessing(eval_preprocessing, spec, str(spec_path), given)
    session = onnx_session(path)
    input_name = session.get_inputs()[0].name
    n = int(session.get_outputs()[0].shape[-1])
    names = _names(spec if spec is not None else read_mapping(given), n)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: x.numpy()})[0]).float()
    metrics = ((spec or {}).get("provenance") or {}).get("metrics") or {}
    return Predictor("classifier", str(path), "onnxruntime", pre, n, names, logits=logits, metrics=metrics)


def load_predictor(model: str, preprocessing: str = "", device: torch.device | None = None) -> Predictor:
    """The model of ``--model`` (see the module docstring), on ``device`` (ONNX runs on the CPU)."""
    path, device = Path(model), device or torch.device("cpu")
    if not path.exists():
        raise FileNotFoundError(f"--model {model} does not exist; it takes {FORMATS}")
    if path.is_dir():
        return _from_run(path, preprocessing, device)
    if path.suffix == ".onnx":
        return _from_onnx(path, preprocessing)
    if path.suffix == ".safetensors":
        return _from_export(path, preprocessing, device, str(path))
    raise ValueError(f"--model {model}: not a folder, .safetensors or .onnx; it takes {FORMATS}")
