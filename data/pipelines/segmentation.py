"""Image + annotation shards (``jpg`` + ``seg.png``, the shard writer's ADE20K layout) for segmentation.

Training (as BEiT's ADE20K recipe): rescale so the short side is ``crop x r`` (r uniform in
``scale``), a random ``crop x crop`` window in which no single class covers more than
``cat_max_ratio`` of the labelled pixels (10 tries), horizontal flip, photometric jitter on the
image, normalise, pad to the crop (image 0, label ``IGNORE``). Held-out: the image rescaled so its
short side is ``crop`` (scored by sliding windows), the annotation at its own resolution.

Labels: the PNG's values; with ``reduce_zero_label`` (ADE20K's convention) 0 ("other") becomes
``IGNORE`` and every other value v becomes v - 1. A value outside [0, num_classes) that is not
``IGNORE`` makes the sample bad ("bad_label").
"""
from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image

from beit.data.loading.decode import BadSample

IGNORE = 255


def decode_labels(sample: dict, num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    """The sample's annotation as an [H, W] uint8 array of class ids (``IGNORE`` = unlabelled)."""
    raw = sample.get("seg.png")
    if raw is None:
        raise BadSample("no_image", "no seg.png annotation member (segmentation needs image + annotation pairs)")
    try:
        ann = Image.open(io.BytesIO(raw))
        ann.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad sample, counted
        raise BadSample("corrupt", f"annotation: {type(e).__name__}: {e}") from None
    if ann.mode not in ("L", "P"):
        raise BadSample("bad_mode", f"annotation mode {ann.mode}: expected 8-bit class ids (L or P)")
    labels = np.array(ann, dtype=np.uint8)
    if reduce_zero_label:
        labels = labels - np.uint8(1)  # 0 -> 255 (IGNORE), v -> v - 1
        labels[labels == 254] = IGNORE  # an IGNORE (255) in the file stays IGNORE
    bad = (labels >= num_classes) & (labels != IGNORE)
    if bad.any():
        raise BadSample("bad_label", f"class id {int(labels[bad].max())} >= num_classes {num_classes}")
    return labels


def image_labels(img: Image.Image, sample: dict, num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    """``decode_labels``, checked to be the image's size (BadSample "corrupt" otherwise)."""
    labels = decode_labels(sample, num_classes, reduce_zero_label)
    if labels.shape != (img.size[1], img.size[0]):
        raise BadSample("corrupt", f"annotation is {labels.shape[1]}x{labels.shape[0]}, image "
                                   f"{img.size[0]}x{img.size[1]}")
    return labels


def _normalised(img: Image.Image, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1).div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _rescale(img: Image.Image, labels: np.ndarray | None, short: int):
    w, h = img.size
    f = short / min(w, h)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    img = img.resize(size, Image.Resampling.BILINEAR)
    if labels is not None:
        labels = np.array(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST))
    return img, labels


class SegTrainMap:
    """``map_fn`` for the training stream: (PIL image, sample) -> {"image": float [3,C,C], "label": long [C,C]}."""

    def __init__(self, num_classes: int, crop: int, *, scale=(0.5, 2.0), cat_max_ratio: float = 0.75,
                 hflip: float = 0.5, reduce_zero_label: bool = True, mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225)):
        from torchvision.transforms import ColorJitter
        self.num_classes, self.crop, self.scale = num_classes, crop, scale
        self.cat_max_ratio, self.hflip, self.reduce_zero_label = cat_max_ratio, hflip, reduce_zero_label
        self.mean, self.std = mean, std
        self.jitter = ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05)

    def _window(self, labels: np.ndarray) -> tuple[int, int]:
        h, w = labels.shape
        c = self.crop
        for _ in range(10):
            y, x = random.randint(0, max(0, h - c)), random.randint(0, max(0, w - c))
            win = labels[y:y + c, x:x + c]
            counts = np.bincount(win[win != IGNORE].ravel(), minlength=1)
            if self.cat_max_ratio >= 1 or counts.sum() == 0 or counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return y, x

    def __call__(self, img: Image.Image, sample: dict) -> dict:
        labels = image_labels(img, sample, self.num_classes, self.reduce_zero_label)
        img, labels = _rescale(img, labels, round(self.crop * random.uniform(*self.scale)))
        y, x = self._window(labels)
        c = self.crop
        img, labels = img.crop((x, y, x + c, y + c)), labels[y:y + c, x:x + c]  # PIL pads with 0 past the edge
        if random.random() < self.hflip:
            img, labels = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), labels[:, ::-1]
        target = np.full((c, c), IGNORE, dtype=np.uint8)
        target[:labels.shape[0], :labels.shape[1]] = labels
        valid = np.zeros((c, c), dtype=bool)
        valid[:labels.shape[0], :labels.shape[1]] = True
        x = _normalised(self.jitter(img), self.mean, self.std) * torch.from_numpy(valid)  # padding stays 0
        return {"image": x, "label": torch.from_numpy(target.astype(np.int64))}


class SegEvalMap:
    """``map_fn`` for held-out data: the image rescaled to short side ``crop`` and the full-size labels."""

    def __init__(self, num_classes: int, crop: int, *, reduce_zero_label: bool = True,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        self.num_classes, self.crop, self.reduce_zero_label = num_classes, crop, reduce_zero_label
        self.mean, self.std = mean, std

    def __call__(self, img: Image.Image, sample: dict) -> dict:
        labels = image_labels(img, sample, self.num_classes, self.reduce_zero_label)
        return {"image": seg_eval_input(img, self.crop, self.mean, self.std),
                "label": torch.from_numpy(labels.astype(np.int64))}


def seg_eval_input(img: Image.Image, crop: int, mean, std) -> torch.Tensor:
    """A held-out RGB image as the segmenter is scored on it: short side rescaled to ``crop``, normalised."""
    img, _ = _rescale(img, None, crop)
    return _normalised(img, mean, std)
