"""``run_predict(cfg)``: the model over every image of ``--data``, in batches with a progress bar.

Writes ``--out`` (CSV: per image the top-k classes with names and probabilities; a segmenter's: its mask PNG and
the classes covering most of it), ``<stem>.errors.csv`` (every file that could not be used, with the reason),
``<stem>.json`` (the summary) and, with labels, ``<stem>.confusion.json`` / ``.png`` (classification: top-1 /
top-5; segmentation: mIoU, as the fine-tune scores them).
"""
from __future__ import annotations

import csv
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from beit.predict.inputs import PredictStream, batches, find_inputs
from beit.predict.models import Predictor, load_predictor


class SegInput:
    """A decoded RGB image as a segmenter is scored on it (picklable, for the loader's workers)."""

    def __init__(self, crop: int, mean, std):
        self.crop, self.mean, self.std = crop, tuple(mean), tuple(std)

    def __call__(self, img):
        from beit.data.pipelines.segmentation import seg_eval_input
        return seg_eval_input(img, self.crop, self.mean, self.std)


def side_path(out: Path, suffix: str) -> Path:
    """``predictions.csv`` -> ``predictions<suffix>`` (``.errors.csv``, ``.json``, ``.confusion.png``, ...)."""
    return out.with_name(out.stem + suffix)


class ClassifierScorer:
    """CSV rows of the top-k classes; with labels the confusion matrix, top-1 and top-5."""

    def __init__(self, predictor: Predictor, top_k: int, labelled: bool):
        self.p, self.k, self.labelled = predictor, min(top_k, predictor.num_classes), labelled
        n = predictor.num_classes
        self.cm = torch.zeros(n, n, dtype=torch.long)
        self.top5 = 0

    def header(self) -> list[str]:
        cols = ["image"] + (["label", "label_name"] if self.labelled else [])
        return cols + [c for i in range(1, self.k + 1) for c in (f"top{i}", f"top{i}_name", f"top{i}_prob")]

    def rows(self, good: list[dict]) -> list[list]:
        probs = self.p.logits(torch.stack([it["image"] for it in good])).softmax(-1)
        prob, idx = probs.topk(self.k, dim=1)
        names = self.p.class_names
        out = []
        for it, pr, ix in zip(good, prob.tolist(), idx.tolist()):
            label = [it["label"], names[it["label"]]] if self.labelled else []
            out.append([it["name"], *label, *[v for c, q in zip(ix, pr) for v in (c, names[c], f"{q:.6f}")]])
        if self.labelled:
            target = torch.tensor([it["label"] for it in good])
            n = self.p.num_classes
            self.cm += torch.bincount(target * n + probs.argmax(1), minlength=n * n).view(n, n)
            self.top5 += int((probs.topk(min(5, n), dim=1).indices == target[:, None]).any(1).sum())
        return out

    def scores(self) -> dict:
        n = int(self.cm.sum())
        if not n:
            return {}
        return {"top1": 100.0 * float(self.cm.trace()) / n, "top5": 100.0 * self.top5 / n, "samples": n,
                "confusion": self.cm.tolist()}


class SegmenterScorer:
    """A mask PNG per image (the annotation's convention: with reduce_zero_label class c is stored as c + 1) and CSV
    rows of the classes covering most of it; with annotations the confusion matrix and mIoU."""

    def __init__(self, predictor: Predictor, top_k: int, labelled: bool, masks_dir: Path):
        self.p, self.k, self.labelled = predictor, min(top_k, predictor.num_classes), labelled
        self.masks_dir = masks_dir
        n = predictor.num_classes
        self.cm = torch.zeros(n, n, dtype=torch.long)

    def header(self) -> list[str]:
        return ["image", "mask", "height", "width"] + [c for i in range(1, self.k + 1)
                                                       for c in (f"class{i}", f"class{i}_name", f"class{i}_share")]

    def _mask_path(self, name: str) -> Path:
        shard, sep, key = name.rpartition(":")
        rel = Path(Path(shard).stem) / key if sep and shard.endswith(".tar") else Path(name)
        return self.masks_dir / rel.with_suffix(".png")

    def rows(self, good: list[dict]) -> list[list]:
        from PIL import Image

        from beit.data.pipelines.segmentation import IGNORE
        from beit.engines.seg import predict_mask
        pre, n, out = self.p.preprocessing, self.p.num_classes, []
        for it in good:
            pred = predict_mask(self.p.module, it["image"].to(self.p.device), tuple(it["size"]), pre.image_size,
                                pre.stride, n).cpu()
            stored = pred.numpy().astype(np.int64) + int(pre.reduce_zero_label)
            path = self._mask_path(it["name"])
            path.parent.mkdir(parents=True, exist_ok=True)
            mode, dtype = ("L", np.uint8) if stored.max() < 256 else ("I;16", np.uint16)
            Image.fromarray(stored.astype(dtype), mode).save(path)
            share = torch.bincount(pred.flatten(), minlength=n).double() / pred.numel()
            top = share.topk(self.k)
            out.append([it["name"], str(path), *it["size"],
                        *[v for c, q in zip(top.indices.tolist(), top.values.tolist())
                          for v in (c, self.p.class_names[c], f"{q:.6f}")]])
            if self.labelled and it["label"] is not None:
                labels = torch.as_tensor(np.asarray(it["label"]), dtype=torch.long)
                keep = labels != IGNORE
                self.cm += torch.bincount(labels[keep] * n + pred[keep], minlength=n * n).view(n, n)
        return out

    def scores(self) -> dict:
        from beit.engines.seg import iou_scores
        if not int(self.cm.sum()):
            return {}
        return {**iou_scores(self.cm), "confusion": self.cm.tolist()}


def _startup(cfg, p: Predictor, inputs, outputs: list[Path]) -> None:
    names = ", ".join(p.class_names[:10]) + (", ..." if p.num_classes > 10 else "")
    where = "onnxruntime, CPU" if p.runtime == "onnxruntime" else f"PyTorch, {p.device}"
    print(f"model: {p.source}: {p.kind}, {p.num_classes} classes ({names}); {where}", flush=True)
    print(f"preprocessing (the model's own evaluation): {p.preprocessing.describe()}", flush=True)
    print(f"data: {inputs.describe()}", flush=True)
    print(f"outputs: {', '.join(str(o) for o in outputs)}", flush=True)


def _summary_lines(summary: dict, p: Predictor, bad: list[list[str]], errors_path: Path) -> list[str]:
    lines = [f"predicted {summary['images']} images in {summary['seconds']:.1f} s -> {summary['outputs']['csv']}"]
    s = summary.get("scores") or {}
    own = p.metrics
    if "top1" in s:
        lines.append(f"top-1 {s['top1']:.2f}%  top-5 {s['top5']:.2f}% on {s['samples']} labelled images; confusion "
                     f"matrix -> {summary['outputs']['confusion_png']}"
                     + (f" (the fine-tune's own held-out top-1: {own['top1']:.2f}%)" if "top1" in own else ""))
    if "mIoU" in s:
        lines.append(f"mIoU {s['mIoU']:.2f}%  mAcc {s['mAcc']:.2f}%  aAcc {s['aAcc']:.2f}% over the annotated images"
                     + (f" (the fine-tune's own held-out mIoU: {own['mIoU']:.2f}%)" if "mIoU" in own else ""))
    if bad:
        shown = "; ".join(f"{name} ({reason})" for name, reason, _ in bad[:10])
        lines.append(f"could not use {len(bad)} file(s) -> {errors_path}: {shown}{'; ...' if len(bad) > 10 else ''}")
    else:
        lines.append("every file decoded (0 errors)")
    return lines


def run_predict(cfg) -> dict:
    """Predict every image of ``cfg.data`` with ``cfg.model``; write the outputs; return the summary."""
    from tqdm import tqdm

    from beit.export.preprocessing import SegPreprocessing
    p = load_predictor(cfg.model, cfg.preprocessing, cfg.torch_device())
    seg = isinstance(p.preprocessing, SegPreprocessing)
    inputs = find_inputs(cfg.data, p.class_names, segmenter=seg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    errors_path, summary_path = side_path(out, ".errors.csv"), side_path(out, ".json")
    masks_dir = Path(cfg.masks_dir) if cfg.masks_dir else out.with_name(out.stem + "_masks")
    scorer = (SegmenterScorer(p, cfg.top_k, inputs.labelled, masks_dir) if seg
              else ClassifierScorer(p, cfg.top_k, inputs.labelled))
    to_input = SegInput(p.preprocessing.image_size, p.preprocessing.mean, p.preprocessing.std) if seg \
        else p.preprocessing.transform()
    stream = PredictStream(inputs, to_input, 1 if seg else cfg.batch_size, p.num_classes,
                           reduce_zero_label=getattr(p.preprocessing, "reduce_zero_label", True))
    _startup(cfg, p, inputs, [out, errors_path, summary_path] + ([masks_dir] if seg else []))
    bad: list[list[str]] = []
    images, start = 0, time.perf_counter()
    with open(out, "w", newline="") as f, tqdm(total=inputs.total, unit="img", desc="predict", file=sys.stderr,
                                               mininterval=1.0) as bar:
        writer = csv.writer(f)
        writer.writerow(scorer.header())
        for batch in batches(stream, cfg.loader_workers):
            bad += [[it["name"], it["bad"], it["detail"]] for it in batch if it["bad"]]
            good = [it for it in batch if not it["bad"]]
            if good:
                writer.writerows(scorer.rows(good))
                f.flush()
            images += len(good)
            bar.update(len(batch))
    with open(errors_path, "w", newline="") as f:
        csv.writer(f).writerows([["image", "reason", "detail"], *bad])
    scores = scorer.scores() if inputs.labelled else {}
    outputs = {"csv": str(out), "errors": str(errors_path), "summary": str(summary_path)}
    if seg:
        outputs["masks"] = str(masks_dir)
    if scores:
        outputs["confusion"] = str(side_path(out, ".confusion.json"))
        Path(outputs["confusion"]).write_text(json.dumps(scores["confusion"]))
        if not seg:
            from beit.engines.finetune import save_confusion_png
            outputs["confusion_png"] = str(save_confusion_png(
                scores["confusion"], side_path(out, ".confusion.png"), p.class_names,
                title=f"{Path(cfg.model).name} on {cfg.data} (top-1 {scores['top1']:.1f}%)"))
    summary = {"model": p.source, "runtime": p.runtime, "kind": p.kind, "data": inputs.describe(), "images": images,
               "errors": len(bad), "error_reasons": dict(Counter(r for _, r, _ in bad)), "labelled": inputs.labelled,
               "scores": {k: v for k, v in scores.items() if k != "confusion"}, "finetune_metrics": p.metrics,
               "preprocessing": p.preprocessing.as_dict(), "outputs": outputs,
               "seconds": round(time.perf_counter() - start, 2)}
    summary_path.write_text(json.dumps(summary, indent=1))
    for line in _summary_lines(summary, p, bad, errors_path):
        print(line, flush=True)
    return summary
