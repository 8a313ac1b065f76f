"""Model cards: a ``README.md`` beside every export (timm, Hugging Face, ONNX, a fine-tune run's own weights).

A card says what the model is, the pretraining it started from and its recipe, the fine-tune's data and held-out
scores, the preprocessing, the exact code that loads it in its format (a ``predict(image)`` function; the tests
run it verbatim) and the versions it was made with. It is written from the export's ``provenance`` record
(``beit.export.provenance``). Every card opens with YAML front matter in the Hugging Face model-card format
(library_name, tags, metrics, model-index).

A folder's ``README.md`` is only written when it is absent or is this card's earlier version for the same weights
file; otherwise the card goes to ``README.<weights file name>.md`` (a user's README is never overwritten).
"""
from __future__ import annotations

import inspect
from pathlib import Path

import yaml

MARK = "<!-- beit-pipeline model card for: {} -->"
HF_NOTE = (". The folder's preprocessor_config.json resizes to a square (transformers' BEiT processor takes no "
           "shorter-side size in 4.x) before the same centre crop: on square images that is exactly the preprocessing "
           "above, on others it squashes the image where the fine-tune kept its aspect ratio (`beit predict` and the "
           "timm export apply the exact one)")
FORMATS = {
    "timm": "timm weights: `{weights}` (the timm model's own state dict) and `{meta}` (timm entrypoint, constructor "
            "arguments and `pretrained_cfg`)",
    "hf": "a Hugging Face transformers `BeitForImageClassification` folder (`config.json`, `model.safetensors`, "
          "`preprocessor_config.json`)",
    "onnx": "ONNX: `{weights}` (opset {opset}, input `images` NCHW float32 with a dynamic batch, output `logits`) and "
            "`{meta}` (its preprocessing and class names)",
    "beit": "safetensors + `{meta}`, rebuilt by this project's code (`{loader}`)",
}


def _pct(v) -> str:
    return f"{v:.2f}%" if isinstance(v, (int, float)) else "n/a"


def _listing(v) -> str:
    if not v:
        return "none"
    return ", ".join(f"`{x}`" for x in v) if isinstance(v, (list, tuple)) else f"`{v}`"


def _names(prov: dict) -> str:
    names = (prov.get("classes") or {}).get("names") or []
    n = (prov.get("classes") or {}).get("count")
    return (", ".join(names[:20]) + (", ..." if len(names) > 20 else "")) if names else f"{n} unnamed classes"


# ------------------------------------------------------------------------------------------ loading snippets
def _timm_snippet(weights: str, meta: str, ours: bool) -> str:
    if ours:
        load = (f'model = load_exported("{weights}")   # this project\'s loader: plain timm does not rebuild it\n'
                "transform = eval_preprocessing(conf).transform()\n")
        imports = ("import json\n\nimport torch\n\nfrom beit.export import load_exported\n"
                   "from beit.export.preprocessing import eval_preprocessing\n\n")
    else:
        load = ('model = timm.create_model(conf["timm_entrypoint"], pretrained=True, **conf["model_kwargs"],\n'
                f'                          pretrained_cfg_overlay=dict(conf["pretrained_cfg"], file="{weights}"))\n'
                "model.eval()\n"
                "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))\n")
        imports = "import json\n\nimport timm\nimport torch\n\n"
    return (imports + f'conf = json.load(open("{meta}"))\n' + load +
            'class_names = conf["class_names"] or [str(i) for i in range(conf["num_classes"])]\n\n\n'
            "def predict(image):\n"
            '    """A PIL image -> its 5 most probable (class name, probability)."""\n'
            "    with torch.no_grad():\n"
            '        probs = model(transform(image.convert("RGB"))[None]).softmax(-1)[0]\n'
            "    top = probs.topk(min(5, len(probs)))\n"
            "    return [(class_names[i], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]\n")


def _hf_snippet(transformers_version: str) -> str:
    if int(transformers_version.split(".")[0]) >= 5:
        proc = ("from transformers import AutoImageProcessor, BeitForImageClassification\n\n"
                'path = "."   # this folder\n'
                "model = BeitForImageClassification.from_pretrained(path).eval()\n"
                'processor = AutoImageProcessor.from_pretrained(path, backend="pil")   # PIL resizing, as the '
                "fine-tune's\n")
    else:
        proc = ("from transformers import BeitForImageClassification, BeitImageProcessor\n\n"
                'path = "."   # this folder\n'
                "model = BeitForImageClassification.from_pretrained(path).eval()\n"
                "processor = BeitImageProcessor.from_pretrained(path)\n")
    return ("import torch\n" + proc + "\n\n"
            "def predict(image):\n"
            '    """A PIL image -> its 5 most probable (class name, probability)."""\n'
            "    with torch.no_grad():\n"
            '        logits = model(**processor(image.convert("RGB"), return_tensors="pt")).logits\n'
            "    probs = logits.softmax(-1)[0]\n"
            "    top = probs.topk(min(5, len(probs)))\n"
            "    return [(model.config.id2label[i], float(p)) for p, i in zip(top.values.tolist(), "
            "top.indices.tolist())]\n")


def _onnx_snippet(weights: str, meta: str) -> str:
    from beit.export import onnx_export
    preprocess = inspect.getsource(onnx_export.preprocess)
    return ("import json\n\nimport numpy as np\nimport onnxruntime as ort\n\n"
            f'spec = json.load(open("{meta}"))\n'
            f'session = ort.InferenceSession("{weights}", providers=["CPUExecutionProvider"])\n'
            f"_PIL_FILTERS = {onnx_export._PIL_FILTERS!r}\n\n\n"
            + preprocess + "\n\n"
            "def predict(image):\n"
            '    """A PIL image -> its 5 most probable (class name, probability)."""\n'
            '    logits = session.run(None, {spec["input_name"]: preprocess(image, spec)[None]})[0][0]\n'
            "    probs = np.exp(logits - logits.max())\n"
            "    probs /= probs.sum()\n"
            '    names = spec["class_names"] or [str(i) for i in range(len(probs))]\n'
            "    return [(names[i], float(probs[i])) for i in np.argsort(-probs)[:5]]\n")


def _seg_snippet(weights: str, meta: str) -> str:
    return ("import json\n\n"
            "from beit.data.pipelines.segmentation import seg_eval_input\n"
            "from beit.engines.seg import predict_mask\n"
            "from beit.export.preprocessing import seg_preprocessing\n"
            "from beit.export.segmentation import load_seg_model\n\n"
            f'conf = json.load(open("{meta}"))\n'
            f'model = load_seg_model("{weights}")\n'
            "pre = seg_preprocessing(conf)\n\n\n"
            "def predict(image):\n"
            '    """A PIL image -> class ids [H, W] at its own size (sliding windows, as the fine-tune scored)."""\n'
            '    x = seg_eval_input(image.convert("RGB"), pre.image_size, pre.mean, pre.std)\n'
            "    return predict_mask(model, x, (image.height, image.width), pre.image_size, pre.stride,\n"
            '                        conf["model_kwargs"]["num_classes"])\n')


# ------------------------------------------------------------------------------------------ sections
def _pretraining_text(prov: dict) -> str:
    pre = prov.get("pretraining")
    if prov.get("init") is None:
        return "Not recorded (the export predates provenance records)."
    if not prov.get("init"):
        return "None: the encoder was trained from scratch on the fine-tune data."
    if not pre or not pre.get("ours"):
        return (f"Started from `{prov['init']}`, which is not a pretraining run of this pipeline (official, timm or "
                "Hugging Face weights, or a file whose record was not found): its data and recipe are not recorded "
                "here.")
    mask = (f"{pre['num_masking_patches']} masked patches per image" if pre.get("num_masking_patches")
            else f"{pre.get('mask_ratio', 0.4):.0%} of the patches masked (blockwise)")
    lines = [
        f"Self-supervised BEiT masked image modelling (arXiv 2106.08254) with this pipeline: the encoder predicts, at "
        f"the masked patches, the visual tokens of a frozen `{pre.get('tokenizer')}` tokenizer "
        f"(`{pre.get('tokenizer_path')}`).",
        "",
        f"- run: `{pre.get('run')}` (weights `{pre['source']}`)",
        f"- data (unlabelled): {_listing(pre.get('data'))}",
        f"- encoder: `{pre.get('arch')}` at {pre.get('image_size')} px, {pre.get('patch_size')} px patches; {mask}",
        f"- recipe: {pre.get('steps')} optimizer steps (epochs {pre.get('epochs')}, total_steps "
        f"{pre.get('total_steps')}), batch {pre.get('batch_size')} per process (global "
        f"{pre.get('global_batch_size') or 'not set'}), AdamW lr {pre.get('lr')}, weight decay "
        f"{pre.get('weight_decay')}, warmup {pre.get('warmup_epochs')} epochs, drop path {pre.get('drop_path')}, "
        f"seed {pre.get('seed')}",
    ]
    if "val_mim_acc" in pre:
        lines.append(f"- held-out masked-token accuracy {pre['val_mim_acc']:.4f} (always predicting the most frequent "
                     f"token: {pre.get('val_majority_acc', float('nan')):.4f}) on {_listing(pre.get('held_out'))}")
    return "\n".join(lines)


def _finetune_text(prov: dict) -> str:
    ft = prov.get("finetune") or {}
    recipe = ", ".join(f"{k} {ft[k] if ft[k] not in ('', None, []) else 'none'}" for k in ft
                       if k not in ("run", "train", "held_out"))
    what = "weights of the exponential moving average (EMA)" if prov.get("weights") == "ema" else "final weights"
    return "\n".join([
        f"- run: `{ft.get('run')}` ({what}" + (f", step {prov['step']}" if prov.get("step") is not None else "") + ")",
        f"- training data (labelled): {_listing(ft.get('train'))}",
        f"- held-out data (never trained on): {_listing(ft.get('held_out'))}",
        f"- classes ({(prov.get('classes') or {}).get('count')}): {_names(prov)}",
        f"- recipe: {recipe}",
    ])


def _scores_text(prov: dict) -> str:
    m = prov.get("metrics") or {}
    if prov.get("task") == "segmentation":
        if "mIoU" not in m:
            return "No held-out data: no scores."
        return (f"| metric (held-out, {m.get('samples')} images) | value |\n| --- | --- |\n"
                f"| mIoU | {_pct(m['mIoU'])} |\n| mean class accuracy | {_pct(m.get('mAcc'))} |\n"
                f"| pixel accuracy | {_pct(m.get('aAcc'))} |")
    if "top1" not in m:
        return "No held-out data: no scores."
    rows = [f"| metric (held-out, {m.get('samples')} images) | value |", "| --- | --- |",
            f"| top-1 accuracy | {_pct(m['top1'])} |", f"| top-5 accuracy | {_pct(m.get('top5'))} |"]
    if "ema_top1" in m:
        rows.append(f"| top-1 accuracy of the EMA weights | {_pct(m['ema_top1'])} |")
    ema = prov.get("weights") == "ema"
    note = "\n\nThese weights are the EMA weights: their score is the EMA row." if ema else ""
    return "\n".join(rows) + note


def _versions_text(made_with: dict, prov: dict) -> str:
    rows = ["| package | this export | the fine-tune's record |", "| --- | --- | --- |"]
    trained = prov.get("versions") or {}
    for k in dict.fromkeys([*made_with, *trained]):
        rows.append(f"| {k} | {made_with.get(k) or 'n/a'} | {trained.get(k) or 'n/a'} |")
    return "\n".join(rows)


def _front_matter(fmt: str, prov: dict, name: str) -> str:
    task = prov.get("task")
    seg = task == "segmentation"
    tags = ["image-segmentation" if seg else "image-classification", "vision", "beit", "beit-pipeline"]
    if (prov.get("pretraining") or {}).get("ours"):
        tags.append("masked-image-modeling")
    meta: dict = {}
    library = {"timm": "timm", "hf": "transformers", "onnx": "onnx"}.get(fmt)
    if library:
        meta["library_name"] = library
    meta["pipeline_tag"] = "image-segmentation" if seg else "image-classification"
    meta["tags"] = tags + ([library] if library else [])
    m = prov.get("metrics") or {}
    held = (prov.get("finetune") or {}).get("held_out")
    dataset = ", ".join(held) if isinstance(held, list) else str(held or "")
    if seg and "mIoU" in m:
        metrics = [{"type": "mean_iou", "value": round(m["mIoU"] / 100, 6), "name": "mIoU"}]
    elif not seg and "top1" in m:
        metrics = [{"type": "accuracy", "value": round(m["top1"] / 100, 6), "name": "top-1 accuracy"}]
        if "top5" in m:
            metrics.append({"type": "top-5-accuracy", "value": round(m["top5"] / 100, 6), "name": "top-5 accuracy"})
    else:
        metrics = []
    if metrics:
        meta["metrics"] = [x["type"] for x in metrics]
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": meta["pipeline_tag"], "name": "Image Segmentation" if seg else "Image Classification"},
            "dataset": {"name": f"held-out: {dataset} ({m.get('samples')} images)", "type": "local"},
            "metrics": metrics}]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def render_card(fmt: str, prov: dict, preprocessing_text: str, *, weights: str, meta: str, made_with: dict,
                architecture: str, params: int, input_size, opset: int | None = None, plain_timm: bool = True) -> str:
    """The card's markdown. ``fmt``: timm | hf | onnx; a segmenter, a linear probe or a model that plain timm does
    not rebuild exactly (``plain_timm`` False, e.g. another LayerNorm eps) is loaded by our code instead."""
    seg, probe = prov.get("task") == "segmentation", bool(prov.get("linear_probe"))
    if fmt == "hf":
        snippet = _hf_snippet(made_with.get("transformers") or "5")
    elif fmt == "onnx":
        snippet = _onnx_snippet(weights, meta)
    elif seg:
        fmt, snippet = "beit", _seg_snippet(weights, meta)
    else:
        ours = probe or not plain_timm
        snippet = _timm_snippet(weights, meta, ours)
        fmt = "beit" if ours else fmt
    loader = "beit.export.segmentation.load_seg_model" if seg else "beit.export.load_exported"
    what = "semantic segmentation" if seg else "image classification"
    pretrained = (prov.get("pretraining") or {}).get("ours")
    origin = ("BEiT-pretrained on unlabelled images with this pipeline, then fine-tuned" if pretrained else
              "fine-tuned from given weights" if prov.get("init") else "trained from scratch")
    block = prov.get("probe_block") or "last"
    probe_note = (f" A linear probe: the frozen encoder's patch tokens after block {block}, mean-pooled, normalised, "
                  "and a linear head." if probe else "")
    title = f"{architecture}: {what}, {(prov.get('classes') or {}).get('count')} classes"
    usage = [] if fmt == "hf" else [
        f"\nWith this project installed, `beit predict --model {weights} --data <folder or shards> --out "
        "predictions.csv` applies the same preprocessing and writes the top-k classes per image (masks for a "
        "segmenter), the files it could not read, and top-1 and a confusion matrix when the folder has class "
        "sub-folders."]
    body = [
        _front_matter(fmt, prov, architecture) + MARK.format(weights),
        f"# {title}", "",
        f"A `{prov.get('model')}` encoder ({architecture}, {params / 1e6:.2f}M parameters, input "
        f"{'x'.join(str(v) for v in input_size)} RGB) for {what} ({_names(prov)}), {origin} with the BEiT pipeline "
        f"(beit-pipeline, task `{prov.get('task')}`).{probe_note}", "",
        f"Format: {FORMATS[fmt].format(weights=weights, meta=meta, opset=opset, loader=loader)}.", "",
        "## Pretraining", "", _pretraining_text(prov), "",
        "## Fine-tuning", "", _finetune_text(prov), "",
        "## Held-out scores", "", _scores_text(prov), "",
        "## Preprocessing", "", preprocessing_text.rstrip(".") + ".", "",
        "## How to load", "",
        "Run from this folder (the file names are relative to it):", "",
        "```python", snippet.rstrip("\n"), "```", *usage, "",
        "## Versions", "", _versions_text(made_with, prov), "",
        "## Limitations", "",
        "The scores above are on the held-out data named there only, with this preprocessing; on images unlike the "
        "training data (other sensors, scales, classes) the model has not been measured.", "",
    ]
    return "\n".join(body)


def card_path(weights: Path) -> Path:
    """``README.md`` beside ``weights``, unless that holds something else (see the module docstring)."""
    readme = weights.parent / "README.md"
    if not readme.exists() or MARK.format(weights.name) in readme.read_text(errors="replace")[:4000]:
        return readme
    return weights.parent / f"README.{weights.name}.md"


def write_card(text: str, weights: str | Path) -> Path:
    path = card_path(Path(weights))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_model_card(fmt: str, weights: str | Path, model, prov: dict, pre, *, architecture: str, meta: str,
                     extra_versions: tuple[str, ...] = (), opset: int | None = None, notes: str = "",
                     plain_timm: bool = True) -> Path:
    """Render and write the card of the export ``weights`` (``pre``: its Eval/SegPreprocessing)."""
    from beit.export.provenance import versions
    weights = Path(weights)
    input_size = getattr(pre, "input_size", None) or (3, pre.image_size, pre.image_size)
    text = render_card(fmt, prov, pre.describe() + (HF_NOTE if fmt == "hf" else "") + notes, weights=weights.name,
                       meta=meta, made_with=versions(*extra_versions), architecture=architecture,
                       params=sum(p.numel() for p in model.parameters()), input_size=input_size, opset=opset,
                       plain_timm=plain_timm)
    return write_card(text, weights)


def card_of_export(path: str | Path, model) -> Path:
    """The card of a safetensors + JSON export (a timm classifier, a linear probe or a segmenter), from its JSON."""
    import json

    from beit.export.preprocessing import eval_preprocessing, seg_preprocessing
    from beit.export.provenance import recorded_provenance
    path = Path(path)
    meta = path.with_suffix(".json")
    config = json.loads(meta.read_text())
    prov = recorded_provenance(config)
    if prov.get("task") == "segmentation":
        pre = seg_preprocessing(config, meta)
        arch = f"UperNet on {prov.get('model')} ({config['architecture'].rpartition('.')[2]})"
    else:
        pre, arch = eval_preprocessing(config, meta), config["architecture"]
    # an export that records a LayerNorm eps other than timm's 1e-6 is rebuilt by load_exported, not timm alone
    plain = float(config.get("layer_norm_eps") or 1e-6) == 1e-6
    return write_model_card("timm", path, model, prov, pre, architecture=arch, meta=meta.name, plain_timm=plain)
