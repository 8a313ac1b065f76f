"""A fine-tuned model's own evaluation preprocessing, read from what the run or its export wrote: one reader for
every file that records it (a run's ``config.yaml``, an export's ``model.json``, an ONNX ``.preprocess.json``).

Nothing is guessed: a key the file lacks is an error naming the keys and the file that has them
(``MissingPreprocessing``), so a model is never scored with a preprocessing it was not evaluated with.

* ``eval_preprocessing(config)``: a classifier's (timm's eval transform: resize the shorter side to
  ``floor(size / crop_pct)`` with the named interpolation, centre crop, [0, 1], mean / std);
* ``seg_preprocessing(config)``: a segmenter's (short side rescaled to the crop, sliding crop windows at a stride,
  mean / std; the annotation convention ``reduce_zero_label``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

SOURCES_HINT = ("the fine-tune run's config.yaml, the export's model.json (beit export / the run's model.json) or "
                "the ONNX model's .preprocess.json")


class MissingPreprocessing(ValueError):
    """The file does not record the model's evaluation preprocessing (or part of it)."""


@dataclass(frozen=True)
class EvalPreprocessing:
    """A classifier's evaluation preprocessing (what the fine-tune's held-out score was computed with)."""
    input_size: tuple[int, int, int]   # C, H, W
    interpolation: str
    crop_pct: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_size(self) -> int:
        return self.input_size[-1]

    @property
    def resize_shorter_side(self) -> int:
        return int(math.floor(self.image_size / self.crop_pct))

    def transform(self):
        """PIL RGB image -> float tensor [C, H, W]: the fine-tune stage's own evaluation transform."""
        from beit.data.pipelines.labelled import eval_transform
        return eval_transform(self.image_size, self.interpolation, self.crop_pct, self.mean, self.std)

    def describe(self) -> str:
        return (f"RGB; shorter side resized to {self.resize_shorter_side} px ({self.interpolation}; "
                f"{self.image_size} / crop_pct {self.crop_pct:g}), centre crop {self.image_size}x{self.image_size}, "
                f"scaled to [0, 1], normalised with mean {_fmt(self.mean)} and std {_fmt(self.std)}")

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class SegPreprocessing:
    """A segmenter's evaluation preprocessing: the image rescaled (bilinear) so its short side is ``image_size``,
    normalised, scored by ``image_size`` windows every ``stride`` px; predictions at the image's own size."""
    image_size: int
    stride: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    reduce_zero_label: bool

    def describe(self) -> str:
        return (f"RGB; shorter side rescaled to {self.image_size} px (bilinear), scaled to [0, 1], normalised with "
                f"mean {_fmt(self.mean)} and std {_fmt(self.std)}; scored by sliding {self.image_size} px windows "
                f"every {self.stride} px, the logits resized (bilinear) to the image's own size")

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def _need(config: dict, keys: list[str], where: str | Path, what: str) -> None:
    missing = [k for k in keys if config.get(k) in (None, "", [])]   # 0 and False are values
    if missing:
        raise MissingPreprocessing(
            f"{where} does not record the model's {what} preprocessing (no {', '.join(missing)}); nothing is guessed: "
            f"pass --preprocessing with {SOURCES_HINT}")


def _image_size(config: dict) -> tuple[int, int]:
    """(channels, size) from ``input_size`` [C, H, W] (exports) or ``image_size`` + ``in_chans`` (a run's config)."""
    if config.get("input_size"):
        size = config["input_size"]
        return int(size[0]), int(size[-1])
    return int(config.get("in_chans") or 3), int(config["image_size"])


def eval_preprocessing(config: dict, where: str | Path = "the model's config") -> EvalPreprocessing:
    """A classifier's evaluation preprocessing from a fine-tune run's ``config.yaml``, an export's ``model.json``
    or an ONNX ``.preprocess.json`` (as dicts); ``MissingPreprocessing`` names what ``where`` lacks."""
    size_key = "input_size" if config.get("input_size") else "image_size"
    _need(config, [size_key, "interpolation", "crop_pct", "mean", "std"], where, "evaluation")
    chans, size = _image_size(config)
    return EvalPreprocessing(input_size=(chans, size, size), interpolation=str(config["interpolation"]),
                             crop_pct=float(config["crop_pct"]), mean=tuple(float(v) for v in config["mean"]),
                             std=tuple(float(v) for v in config["std"]))


def seg_preprocessing(config: dict, where: str | Path = "the model's config") -> SegPreprocessing:
    """A segmenter's evaluation preprocessing from a segmentation run's ``config.yaml`` or its export's JSON."""
    _need(config, ["image_size", "seg_stride", "mean", "std", "reduce_zero_label"], where, "segmentation")
    size = int(config["image_size"])
    return SegPreprocessing(image_size=size, stride=int(config["seg_stride"]) or max(1, size * 2 // 3),
                            mean=tuple(float(v) for v in config["mean"]), std=tuple(float(v) for v in config["std"]),
                            reduce_zero_label=bool(config["reduce_zero_label"]))
