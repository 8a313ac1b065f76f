"""BEiT's two-view pretraining augmentation, with reduced-size JPEG decoding.

One random-resized-crop box (timm's ``RandomResizedCropAndInterpolation.get_params``) is resized
twice: to ``image_size`` with bicubic for the encoder and to ``tokenizer_size`` with the
tokenizer's interpolation (lanczos by default) for the tokenizer. Colour jitter (brightness,
contrast, saturation 0.4, no hue) and a horizontal flip apply to both views alike.

Both views leave the transform as uint8 [3, H, W]: a loader worker sends 4x fewer bytes and does
no float work. ``encoder_input`` (normalise with the ImageNet mean/std) and ``tokenizer_input``
(scale to [0, 1]) convert them on the device; the pretraining loop calls them.

Speed: given a still-undecoded JPEG (``beit.data.loading.decode.open_image``), the box is drawn from the
header size and the JPEG is decoded with ``Image.draft`` at the largest 1/2, 1/4 or 1/8 scale that
keeps the box at least as large as the bigger output view, then the box is mapped to the reduced
image (rounded to whole pixels there). Bicubic and bilinear resizes run on torch's antialiased
uint8 kernels (the same filters as PIL to within rounding), lanczos on PIL after a power-of-two
box reduction. The jitter (same factors, same order for both views) runs on the two small outputs
instead of the whole image, and the flip on the outputs; the distribution of boxes, flips and
factors is the reference's (flip-then-crop equals crop-then-flip for a uniform box). The one
difference: contrast blends towards the crop's mean grey instead of the whole image's. Without
jitter the views stay torch tensors from the resize on (no PIL round trip), and when both views
have the same size and filter one resize serves both.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import ColorJitter

from beit.config import Options, field
from beit.data.loading.decode import is_undecoded, load_pixels, to_rgb

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}
_TORCH_MODES = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}


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


def _then(first: np.ndarray | None, second: np.ndarray) -> np.ndarray:
    """The lookup table that applies ``first`` (None: nothing) and then ``second``."""
    return second if first is None else second[first.astype(np.int64)]


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


@dataclass
class CropOptions(Options):
    """The random-resized crop of every training view (pretraining, fine-tuning, tokenizer fitting, token cache)."""
    crop_scale_min: float = field(0.08, help="random-resized-crop minimum area fraction (max is 1)")


@dataclass
class AugmentOptions(CropOptions):
    """The training augmentation's options, shared by pretraining and fine-tuning (their configs inherit this
    section; a new augmentation adds its option here, beside the transform)."""
    color_jitter: float = field(0.4, help="brightness/contrast/saturation jitter (0: off; fine-tuning: timm ignores it "
                                          "when RandAugment is on)")
    hflip: float = field(0.5, help="horizontal flip probability (use 0 for digits/text)")

    def check_augment(self) -> None:
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip is a probability in [0, 1], got {self.hflip}")


class TwoViewTransform:
    """``(PIL image) -> (encoder_view uint8 [3,S,S], tokenizer_view uint8 [3,T,T])``.

    Randomness comes from ``random`` (crop box as in timm, flip) and ``torch`` (jitter factors),
    so seeding both per sample makes the output deterministic.
    """

    def __init__(self, image_size: int = 224, tokenizer_size: int = 112,
                 tokenizer_interpolation: str = "lanczos", scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), color_jitter: float = 0.4,
                 hflip: float = 0.5, interpolation: str = "bicubic", draft: bool = True):
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

    def jitter_views(self, views: list[Image.Image]) -> list[Image.Image]:
        """The same random brightness/contrast/saturation change, in the same (random) order, on
        each uint8 view (``views[-1]`` the smallest). Brightness and contrast are per-value lookup
        tables, so adjacent ones fuse into one exact table; saturation blends with the grey image
        (what PIL's ImageEnhance does, without its intermediate images). Contrast blends towards
        the mean grey of the view at that point, measured on the smallest view."""
        order, b, c, s, _ = ColorJitter.get_params(self.jitter.brightness, self.jitter.contrast,
                                                   self.jitter.saturation, None)
        x = np.arange(256, dtype=np.float64)
        lut = None  # pending brightness/contrast table, applied lazily
        for fn in order.tolist():
            if fn == 0 and b is not None:
                lut = _then(lut, np.clip(np.rint(x * b), 0, 255))
            elif fn == 1 and c is not None:
                small = views[-1] if lut is None else _apply_lut(views[-1], lut)
                m = int(np.asarray(small.convert("L"), dtype=np.float32).mean() + 0.5)
                lut = _then(lut, np.clip(np.rint(m + (x - m) * c), 0, 255))
            elif fn == 2 and s is not None:
                if lut is not None:
                    views, lut = [_apply_lut(v, lut) for v in views], None
                views = [Image.blend(v.convert("L").convert("RGB"), v, s) for v in views]
        return views if lut is None else [_apply_lut(v, lut) for v in views]

    def resize_view(self, img: Image.Image, box: tuple[int, int, int, int], size: int, resample) -> Image.Image:
        """The box resized to size x size: torch's antialiased uint8 kernels for bicubic/bilinear
        (they match PIL's filters to rounding, about 5x faster), PIL otherwise."""
        return self._resized(img, box, size, resample, as_image=True)

    def _resized(self, img: Image.Image, box, size: int, resample, as_image: bool):
        """``resize_view`` as a PIL image, or (``as_image`` False) as a uint8 [3, size, size] tensor."""
        mode = _TORCH_MODES.get(resample)
        if mode is None:
            out = self._reduced_resize(img, box, size, resample)
            return out if as_image else _uint8_tensor(out)
        crop = img.crop(box)
        x = torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8)
        x = x.view(1, crop.size[1], crop.size[0], 3).permute(0, 3, 1, 2)  # NCHW view of HWC bytes
        y = F.interpolate(x, size=(size, size), mode=mode, antialias=True)
        if not as_image:
            return y[0]
        y = y.contiguous(memory_format=torch.channels_last)[0].permute(1, 2, 0)  # HWC, contiguous
        return Image.fromarray(y.numpy(), "RGB")

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        img, box = self.decode_box(img)
        box = _pixel_box(box, img.size)
        flip = self.hflip > 0 and random.random() < self.hflip if self.jitter is None else None
        if flip is not None:  # no jitter: the views stay tensors (no PIL round trip)
            enc = self._resized(img, box, self.image_size, self.interp, as_image=False)
            same = (self.tokenizer_size, self.tok_interp) == (self.image_size, self.interp)
            tok = enc if same else self._resized(img, box, self.tokenizer_size, self.tok_interp, as_image=False)
            if flip:
                enc = enc.flip(-1)
                tok = enc if same else tok.flip(-1)
            return enc, tok
        enc = self.resize_view(img, box, self.image_size, self.interp)
        tok = self.resize_view(img, box, self.tokenizer_size, self.tok_interp)
        enc, tok = self.jitter_views([enc, tok])
        if self.hflip > 0 and random.random() < self.hflip:
            enc, tok = enc.transpose(Image.Transpose.FLIP_LEFT_RIGHT), tok.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _uint8_tensor(enc), _uint8_tensor(tok)


def _pixel_box(box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A float (left, top, right, bottom) box rounded to whole pixels inside an image of ``size``
    (exact for undrafted images, whose boxes are whole pixels already), at least 1 px each way."""
    x0 = min(max(0, round(box[0])), size[0] - 1)
    y0 = min(max(0, round(box[1])), size[1] - 1)
    return x0, y0, min(max(x0 + 1, round(box[2])), size[0]), min(max(y0 + 1, round(box[3])), size[1])


def encoder_input(images: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """uint8 encoder views [..., 3, H, W] -> float32 ``(x / 255 - mean) / std``, on the views' device.
    Float input is taken as already normalised and returned unchanged."""
    if images.is_floating_point():
        return images
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return images.float().mul_(1.0 / 255.0).sub_(m).div_(s)


def tokenizer_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 tokenizer views -> float32 in [0, 1]; float input is returned as float32 unchanged."""
    return images.float() if images.is_floating_point() else images.float().mul_(1.0 / 255.0)


def seed_everything(seed: int) -> None:
    """Seed ``random``, numpy's global RNG and torch (CPU) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.default_generator.manual_seed(seed)  # CPU generator only: torch.manual_seed costs 30x more
