"""The trained stages of a comparison, each an ordinary run of an existing entry point in its own folder.

A stage that finished with the same inputs before (``stage.json`` in its folder) is reused, and one that was
stopped or cut short with the same inputs resumes from its checkpoint, so an interrupted comparison reruns only
what is missing. Accelerate's process-wide state is reset around every in-process run, as a fresh process would
have it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

STAGE_FILE = "stage.json"
LOSS_TAIL_EPOCHS = 10


def cached_stage(out: Path, inputs: dict, run: Callable[[], dict]) -> dict:
    """``run()``'s result, or the saved one when ``out`` finished with the same ``inputs``. A stage started with the
    same inputs but not finished (stopped on a signal, killed) is run again in its folder, where its run resumes
    from the newest checkpoint; a folder of other inputs (or an unmarked one) is started afresh. A stop requested
    before the stage (``beit.runtime.stopping``) stops here."""
    from beit.runtime.stopping import STOP

    marker = out / STAGE_FILE
    key = json.loads(json.dumps(inputs, default=str))
    saved = json.loads(marker.read_text()) if marker.is_file() else {}
    if saved.get("inputs") == key and "result" in saved:
        return saved["result"]
    STOP.raise_if_requested(f"the stage {out}")
    if out.exists() and saved.get("inputs") != key:  # other inputs, or a stage from before the marker
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"inputs": key}, indent=1, default=str))  # started: a rerun resumes it
    result = run()
    marker.write_text(json.dumps({"inputs": key, "result": result}, indent=1, default=str))
    return result


def _fresh_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def stage_tracking(tracking: dict | None, out: Path) -> dict:
    """The tracker options of the stage in ``out``: the comparison's --report_to, and its run name joined with the
    stage's folder (``compare/seed0/pretrain``). Never part of a stage's inputs: another tracker reruns nothing."""
    if not tracking:
        return {"report_to": []}
    return {"report_to": tracking["report_to"],
            "run_name": f"{tracking['run_name']}/{Path(out).resolve().relative_to(Path(tracking['root']).resolve())}"}


def fit_tokenizer(shards: str, out: Path, seed: int, model: dict, overrides: dict,
                  tracking: dict | None = None) -> dict:
    """Fit the k-means visual-word tokenizer on the unlabelled shards (as ``beit tokenizer train kmeans``);
    returns its path and token statistics on up to 512 of those images."""
    from beit.compare import recipe
    from beit.config import from_dict
    from beit.tokenizers.fitting import KMeansTrainConfig, train_kmeans

    def run() -> dict:
        path = out / "kmeans"
        grid = model["image_size"] // model["patch_size"]
        cfg = from_dict(KMeansTrainConfig, {"shards": shards, "out": str(path), "patch_size": model["patch_size"],
                                            "input_size": model["image_size"], "model_grid": grid, "seed": seed,
                                            **recipe.TOKENIZER, **stage_tracking(tracking, out), **overrides},
                        source="--tokenizer_fit")
        cfg.validate()
        train_kmeans(cfg)
        return {"path": str(path), **token_stats("kmeans", str(path), shards, model["image_size"])}
    return cached_stage(out, {"shards": shards, "seed": seed, "model": model, "overrides": overrides}, run)


def token_stats(kind: str, path: str, shards: str, size: int, max_images: int = 512) -> dict:
    """Codebook usage, perplexity and the share of the most frequent token on up to ``max_images`` images."""
    import torch

    from beit.tokenizers import load_tokenizer
    from beit.tokenizers.images import shard_image_batches
    tok = load_tokenizer(kind, path)
    counts = torch.zeros(tok.vocab_size, dtype=torch.float64)
    for batch in shard_image_batches(shards, size, 64, tok.interpolation, max_images=max_images):
        counts += torch.bincount(tok.tokenize(batch).flatten(), minlength=tok.vocab_size).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"used_codes": int((counts > 0).sum()), "vocab": tok.vocab_size, "top_token_share": float(p.max()),
            "perplexity": float(torch.exp(-(nz * nz.log()).sum()))}


def pretrain(shards: str, tokenizer: str, tokenizer_path: str, out: Path, seed: int, model: dict, overrides: dict,
             knn: tuple[str, str] | None, knn_k: int, val_shards: str, tracking: dict | None = None) -> dict:
    """``beit pretrain`` on the unlabelled shards; returns its final summary (weights path, held-out
    masked-token accuracy beside the majority token, the kNN health metric when ``knn`` is set)."""
    from beit.compare import recipe
    from beit.config import parse_config
    from beit.options.pretrain import PretrainConfig
    from beit.training.pretraining import run_pretraining

    args = {**recipe.PRETRAIN, **overrides}
    argv = ["--train_shards", shards, "--tokenizer", tokenizer, "--tokenizer_path", tokenizer_path,
            "--output_dir", str(out), "--seed", str(seed)]
    if val_shards:
        argv += ["--val_shards", val_shards]
    if knn:
        argv += ["--knn_train_shards", knn[0], "--knn_val_shards", knn[1], "--knn_k", str(knn_k)]
    for k, v in {**model, **args}.items():
        argv += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]

    def run() -> dict:
        _fresh_accelerate()
        try:
            return run_pretraining(dataclasses.replace(parse_config(PretrainConfig, argv),
                                                       **stage_tracking(tracking, out)))
        finally:
            _fresh_accelerate()
    return cached_stage(out, {"argv": argv, "tokenizer_fingerprint": _file_digest(tokenizer_path)}, run)


def finetune(train: str, test: str, out: Path, seed: int, model: dict, recipe_args: dict, init: str = "",
             tracking: dict | None = None) -> dict:
    """``beit finetune`` (classification) on the labelled ``train`` shards, scored on ``test``; returns
    top-1/top-5, the final epoch's training loss and the last ``LOSS_TAIL_EPOCHS`` epochs' (its noise)."""
    from beit.options.finetune import FinetuneConfig
    from beit.runtime.run_logging import read_metrics
    from beit.training.finetuning import run_finetuning

    kw = dict(train_shards=train, val_shards=test, output_dir=str(out), seed=seed, init=init,
              **finetune_model_args(model), **recipe_args)

    def run() -> dict:
        cfg = FinetuneConfig(**kw, **stage_tracking(tracking, out))
        cfg.validate()
        _fresh_accelerate()
        try:
            res = run_finetuning(cfg)
        finally:
            _fresh_accelerate()
        losses = [r["train_loss"] for r in read_metrics(out) if "train_loss" in r]
        return {"top1": res["top1"], "top5": res["top5"], "train_loss": losses[-1] if losses else None,
                "train_loss_tail": losses[-LOSS_TAIL_EPOCHS:], "epochs": cfg.epochs}
    key = {**kw, "init_digest": _file_digest(init)}
    if kw.get("teacher"):
        key["teacher_digest"] = _file_digest(kw["teacher"])
    return cached_stage(out, key, run)


def finetune_model_args(model: dict) -> dict:
    """``beit finetune`` options that build the encoder of ``model`` (a ``CompareConfig.model`` dict): the
    backbone's own (the BEiT ViT's dims, a timm Swin with the sizes of its pretraining), or a timm model by
    name alone (``{"arch": "mobilevit_xxs", "image_size": 32}``, the distillation student)."""
    from beit.modeling.backbones import backbone_for
    name = model.get("arch", "beit")
    return backbone_for(name).finetune_options(name, model)


def _file_digest(path: str) -> str | None:
    """sha256 of a weights file (or of ``<path>.safetensors``), so a reused stage saw the same weights."""
    import hashlib
    if not path:
        return None
    for p in (Path(path), Path(str(path) + ".safetensors")):
        if p.is_file():
            return hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return None
