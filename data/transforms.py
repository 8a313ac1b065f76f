"""BEiT's two-view pretraining augmentation, with reduced-size JPEG decoding.

One random-resized-crop box (timm's ``RandomResizedCropAndInterpolation.get_params``) is resized
twice: to ``image_size`` with bicubic for the encoder (normalised) and to ``tokenizer_size`` with
the tokenizer's interpolation (lanczos by default) for the tokenizer, in [0, 1]. Colour jitter
(brightness, contrast, saturation 0.4, no hue) and a horizontal flip apply to both views alike.

Speed: given a still-undecoded JPEG (``beit.data.decode.open_image``), the box is drawn from the
header size and the JPEG is decoded with ``Image.draft`` at the largest 1/2, 1/4 or 1/8 scale that
keeps the box at least as large as the bigger output view, then the box is mapped to the reduced
image. The jitter (same factors, same order for both views) runs on the two small outputs instead
of the whole image, and the flip on the output tensors; the distribution of boxes, flips and
factors is the reference's (flip-then-crop equals crop-then-flip for a uniform box). The one
difference: contrast blends towards the crop's mean grey instead of the whole image's.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import ColorJitter

from beit.data.decode import is_undecoded, load_pixels, to_rgb

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}


def _uint8_tensor(img: Image.Image) -> torch.Tensor:
    w, h = img.size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W] in [0, 1]."""
    return _uint8_tensor(img).float().div_(255.0)


def _apply_lut(img: Image.Image, table: np.ndarray) -> Image.Image:
    """The same 256-entry lookup table on every band (PIL's core call: ``Image.point`` would
    round all 768 entries in Python first, which costs more than the lookup itself)."""
    lut = table.astype(np.int64).tolist() * len(img.getbands())
    try:
        return img._new(img.im.point(lut, None))
    except AttributeError:  # a Pillow without the private API
        return img.point(lut)


def _interp(name: str) -> Image.Resampling:
    if name not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {name!r}; choose one of {sorted(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


def draft_scale(box_w: float, box_h: float, target: int) -> int:
    """Largest JPEG DCT reduction (1, 2, 4, 8) that keeps a box_w x box_h crop >= target px."""
    for r in (8, 4, 2):
        if box_w / r >= target and box_h / r >= target:
            return r
    return 1


class TwoViewTransform:
    """``(PIL image) -> (encoder_view [3,S,S] normalised, tokenizer_view [3,T,T] in [0,1])``.

    Randomness comes from ``random`` (crop box as in timm, flip) and ``torch`` (jitter factors),
    so seeding both per sample makes the output deterministic.
    """

    def __init__(self, image_size: int = 224, tokenizer_size: int = 112,
                 tokenizer_interpolation: str = "lanczos", scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), color_jitter: float = 0.4,
                 hflip: float = 0.5, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                 interpolation: str = "bicubic", draft: bool = True):
        if image_size < 1 or tokenizer_size < 1:
            raise ValueError(f"image_size and tokenizer_size must be positive, got {image_size}, {tokenizer_size}")
        if not (0 < scale[0] <= scale[1] <= 1.0):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip is a probability in [0, 1], got {hflip}")
        self.image_size, self.tokenizer_size = int(image_size), int(tokenizer_size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interp = _interp(interpolation)
        self.tok_interp = _interp(tokenizer_interpolation)
        self.jitter = ColorJitter(color_jitter, color_jitter, color_jitter, 0.0) if color_jitter > 0 else None
        self.hflip = hflip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * self.std), self.mean / self.std
        self.draft = draft

    def __repr__(self) -> str:
        return (f"TwoViewTransform(image_size={self.image_size}, tokenizer_size={self.tokenizer_size}, "
                f"scale={self.scale}, ratio={self.ratio}, jitter={self.jitter is not None}, hflip={self.hflip})")

    def decode_box(self, img: Image.Image) -> tuple[Image.Image, tuple[float, float, float, float]]:
        """Draw the crop box, decode (drafted when possible); return the RGB image and the box in it."""
        full_w, full_h = img.size
        top, left, h, w = RandomResizedCropAndInterpolation.get_params(img, self.scale, self.ratio)
        s = 1.0
        if self.draft and is_undecoded(img) and img.format == "JPEG":
            r = draft_scale(w, h, max(self.image_size, self.tokenizer_size))
            if r > 1:
                img.draft("RGB", (math.ceil(full_w / r), math.ceil(full_h / r)))
                s = 1.0 / round(full_w / img.size[0])
        if is_undecoded(img):
            load_pixels(img)
        img = to_rgb(img)[0]
        box = (left * s, top * s, min((left + w) * s, img.size[0]), min((top + h) * s, img.size[1]))
        return img, box

    @staticmethod
    def _reduced_resize(img: Image.Image, box, size: int, resample) -> Image.Image:
        """Resize ``box`` to size x size; when the box is 2x+ larger than needed, first average
        it down by the largest power of two that keeps it >= size (as JPEG draft decoding would)."""
        r = draft_scale(box[2] - box[0], box[3] - box[1], size)
        if r == 1:
            return img.resize((size, size), resample, box=box)
        x0, y0 = math.floor(box[0]), math.floor(box[1])
        ib = (x0, y0, min(x0 + math.ceil((box[2] - x0) / r) * r, img.size[0]),
              min(y0 + math.ceil((box[3] - y0) / r) * r, img.size[1]))
        small = img.reduce(r, box=ib)
        rel = ((box[0] - ib[0]) / r, (box[1] - ib[1]) / r,
               min((box[2] - ib[0]) / r, small.size[0]), min((box[3] - ib[1]) / r, small.size[1]))
        return small.resize((size, size), resample, box=rel)

    def _jitter(self, views: list[Image.Image]) -> list[Image.Image]:
        """The same random brightness/contrast/saturation change, in the same (random) order, on
        each uint8 view: brightness and contrast as one lookup table, saturation as a blend with
        the grey image (what PIL's ImageEnhance does, without its intermediate images)."""
        order, b, c, s, _ = ColorJitter.get_params(self.jitter.brightness, self.jitter.contrast,
                                                   self.jitter.saturation, None)
        x = np.arange(256, dtype=np.float64)
        for fn in order.tolist():
            if fn == 0 and b is not None:
                views = [_apply_lut(v, np.clip(np.rint(x * b), 0, 255)) for v in views]
            elif fn == 1 and c is not None:
                m = int(np.asarray(views[0].convert("L"), dtype=np.float32).mean() + 0.5)  # shared mean
                views = [_apply_lut(v, np.clip(np.rint(m + (x - m) * c), 0, 255)) for v in views]
            elif fn == 2 and s is not None:
                views = [Image.blend(v.convert("L").convert("RGB"), v, s) for v in views]
        return views

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        img, box = self.decode_box(img)
        enc = img.resize((self.image_size, self.image_size), self.interp, box=box)
        tok = self._reduced_resize(img, box, self.tokenizer_size, self.tok_interp)
        if self.jitter is not None:
            enc, tok = self._jitter([enc, tok])
        if self.hflip > 0 and random.random() < self.hflip:
            enc, tok = enc.transpose(Image.Transpose.FLIP_LEFT_RIGHT), tok.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        enc_t = _uint8_tensor(enc).float().mul_(self._scale).sub_(self._shift)  # (x/255 - mean) / std
        return enc_t, pil_to_tensor(tok)


def seed_everything(seed: int) -> None:
    """Seed ``random``, numpy's global RNG and torch (CPU) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.default_generator.manual_seed(seed)  # CPU generator only: torch.manual_seed costs 30x more
