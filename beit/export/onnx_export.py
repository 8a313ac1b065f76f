"""Export a fine-tuned classifier (BEiT, Swin, MobileViT, any timm model we exported) to ONNX for a device.

Writes ``model.onnx`` and ``model.preprocess.json`` beside it: everything a device needs to turn a
photo into the network's input (RGB, resize of the shorter side with the named interpolation, centre
crop, scale to [0, 1], mean/std, NCHW float32) and to read its output (class names). ``preprocess``
below is that recipe in plain PIL + numpy; it gives the same tensor as the fine-tune stage's timm
evaluation transform. The export is checked at once: onnxruntime and PyTorch run the same inputs
(the held-out shards with ``--val_shards``, else random ones) and their logits must agree.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

PREPROCESS_SUFFIX = ".preprocess.json"
_PIL_FILTERS = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4, "hamming": 5}


def preprocess_spec(config: dict) -> dict:
    """The device-side input recipe of an exported model (from the JSON that ``beit.export`` wrote)."""
    from beit.export.preprocessing import eval_preprocessing
    pre = eval_preprocessing(config, "the export's JSON")
    if pre.interpolation not in _PIL_FILTERS:
        raise ValueError(f"interpolation {pre.interpolation!r} has no PIL equivalent; use one of "
                         f"{sorted(_PIL_FILTERS)}")
    chans, size = pre.input_size[0], pre.image_size
    return {
        "input_name": "images", "output_name": "logits", "layout": "NCHW", "dtype": "float32",
        "color": "RGB" if chans == 3 else "L", "input_size": [chans, size, size],
        "resize_shorter_side": pre.resize_shorter_side, "interpolation": pre.interpolation, "crop_pct": pre.crop_pct,
        "center_crop": [size, size], "center_crop_offset": "round((side - crop) / 2)",
        "scale": 1.0 / 255.0, "mean": list(pre.mean), "std": list(pre.std),
        "num_classes": int(config["num_classes"]), "class_names": config.get("class_names"),
        "architecture": config.get("architecture"),
    }


def preprocess(image, spec: dict) -> np.ndarray:
    """One PIL image -> float32 [C, H, W], the way ``spec`` says (plain PIL + numpy, as a device would)."""
    img = image.convert(spec["color"])
    w, h = img.size
    short = spec["resize_shorter_side"]
    nw, nh = (short, max(1, int(short * h / w))) if w <= h else (max(1, int(short * w / h)), short)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _PIL_FILTERS[spec["interpolation"]])
    ch, cw = spec["center_crop"]
    top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
    img = img.crop((left, top, left + cw, top + ch))
    x = np.asarray(img, dtype=np.float32).reshape(ch, cw, -1) * np.float32(spec["scale"])
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def export_onnx(model: torch.nn.Module, config: dict, out: str | Path, opset: int = 18) -> tuple[Path, Path]:
    """Write ``model`` (eval mode, dynamic batch) to ``out`` and its preprocessing to ``<stem>.preprocess.json``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = preprocess_spec(config)
    model = model.eval()
    dummy = torch.zeros(2, *spec["input_size"])
    tmp = out.with_name(out.name + ".tmp")
    with torch.no_grad():
        torch.onnx.export(model, (dummy,), str(tmp), input_names=[spec["input_name"]],
                          output_names=[spec["output_name"]], opset_version=opset, dynamo=True,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, external_data=False)
    tmp.replace(out)
    spec_path = out.with_name(out.stem + PREPROCESS_SUFFIX)
    spec_path.write_text(json.dumps({**spec, "onnx": out.name, "opset": opset,
                                     "provenance": config.get("provenance")}, indent=1))
    return out, spec_path


def onnx_session(path: str | Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    # idle onnxruntime threads spin by default, starving PyTorch (and anyone else) on a shared CPU
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare(model: torch.nn.Module, session, batches, input_name: str = "images") -> dict:
    """Run PyTorch and onnxruntime on the same float32 batches [B, C, H, W]; top-1 agreement and logit gap."""
    n = same_top1 = 0
    max_diff = 0.0
    torch_top1, onnx_top1 = [], []
    with torch.no_grad():
        for x in batches:
            ref = model.eval()(torch.from_numpy(x)).float().numpy()
            got = session.run(None, {input_name: x})[0]
            max_diff = max(max_diff, float(np.abs(ref - got).max()))
            torch_top1 += ref.argmax(1).tolist()
            onnx_top1 += got.argmax(1).tolist()
            n += len(x)
    same_top1 = sum(a == b for a, b in zip(torch_top1, onnx_top1))
    return {"images": n, "same_top1": same_top1, "max_abs_logit_diff": max_diff,
            "torch_top1": torch_top1, "onnx_top1": onnx_top1}


def shard_batches(spec_json: dict, shards: str, batch_size: int):
    """(float32 batches, labels) of every image of ``shards``, preprocessed by ``preprocess``."""
    import io

    from PIL import Image

    from beit.data.storage.shard_format import iter_tar_samples
    from beit.data.storage.shardspec import expand_shards
    xs, labels = [], []
    for shard in expand_shards(shards):
        with open(shard, "rb") as f:
            for s in iter_tar_samples(f):
                ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in s), None)
                if ext is None:
                    continue
                xs.append(preprocess(Image.open(io.BytesIO(s[ext])), spec_json))
                labels.append(int(s["cls"]) if "cls" in s else -1)
    return [np.stack(xs[i:i + batch_size]) for i in range(0, len(xs), batch_size)], labels


def latency_ms(fn, x, repeats: int = 20) -> float:
    """Median wall time of ``fn(x)`` in ms (after 3 warm-up calls)."""
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))


def check_onnx(model: torch.nn.Module, onnx_path: str | Path, spec_path: str | Path, val_shards: str = "",
               batch_size: int = 16) -> dict:
    """Run onnxruntime beside PyTorch on the held-out shards (else random inputs): top-1 agreement, the
    largest logit gap, batch-1 latency of both, and top-1 accuracy with labels. Recorded in the spec JSON."""
    spec_path = Path(spec_path)
    spec = json.loads(spec_path.read_text())
    if val_shards:
        batches, labels = shard_batches(spec, val_shards, batch_size)
    else:
        rng = np.random.default_rng(0)
        batches, labels = [rng.standard_normal((batch_size, *spec["input_size"]), dtype=np.float32)], []
    session = onnx_session(onnx_path)
    check = compare(model, session, batches, spec["input_name"])
    one = batches[0][:1]
    check["batch1_latency_ms"] = {"onnxruntime": latency_ms(lambda x: session.run(None, {"images": x}), one),
                                  "pytorch": latency_ms(lambda x: model(torch.from_numpy(x)), one)}
    if labels and min(labels) >= 0:
        check["onnx_top1_accuracy"] = 100.0 * float(np.mean(np.array(check["onnx_top1"]) == np.array(labels)))
    summary = {k: v for k, v in check.items() if not k.endswith("_top1")}
    spec["check"] = summary
    spec_path.write_text(json.dumps(spec, indent=1))
    return check
