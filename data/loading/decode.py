"""Robust image decoding: every image mode to 8-bit RGB, every failure to a counted reason.

``open_image`` keeps a plain RGB JPEG *undecoded* (header parsed, pixels not yet read) so a
transform that knows its crop box can ask PIL for reduced-size DCT decoding (``Image.draft``)
before the pixels are decoded; everything else is decoded and converted here (images with an
EXIF orientation are decoded and turned upright).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Reasons a sample is skipped (the keys of the loader's bad-sample counts).
BAD_REASONS = ("empty", "no_image", "not_image", "truncated", "corrupt", "bad_mode", "too_small",
               "too_large", "bad_label", "no_label", "tar_error", "missing_shard",
               "connection_lost")


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is one of BAD_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def is_undecoded(img: Image.Image) -> bool:
    """True for an opened image whose pixel data has not been decoded yet."""
    return bool(getattr(img, "tile", None))


def _alpha_on_white(img: Image.Image) -> Image.Image:
    img = img.convert("RGBA")
    bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, img).convert("RGB")


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL image to 8-bit RGB. Returns (rgb, original mode if converted else None).

    Alpha is composited on white (not dropped, which would expose arbitrary colours), 16/32-bit
    greyscale is scaled to 8 bits (PIL's own convert clips it), palette images keep transparency.
    """
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _alpha_on_white(img), mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode == "F":
            hi = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        else:
            hi = 65535.0 if mode.startswith("I;16") or (a.size and a.max() > 255) else 255.0
        a = np.clip(np.nan_to_num(a) / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB"), mode
    try:
        return img.convert("RGB"), mode
    except (ValueError, OSError) as e:
        raise BadSample("bad_mode", f"cannot convert mode {mode} to RGB: {e}") from None


def load_pixels(img: Image.Image) -> None:
    """Decode pixel data, mapping decoder failures to BadSample('truncated'/'corrupt')."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Image.DecompressionBombError as e:
        raise BadSample("too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        msg = str(e)
        reason = "truncated" if ("truncated" in msg or "broken data stream" in msg) else "corrupt"
        raise BadSample(reason, f"{type(e).__name__}: {msg}") from None


def open_image(data: bytes, *, min_size: int = 1, lazy_jpeg: bool = True) -> tuple[Image.Image, str | None]:
    """Open encoded image bytes robustly. Returns (image, original mode if converted else None).

    The image is RGB. A plain RGB JPEG is returned undecoded when ``lazy_jpeg`` (see module doc);
    call ``load_pixels`` (or any pixel operation) to decode it. Raises BadSample.
    """
    if not data:
        raise BadSample("empty", "zero-byte image member")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise BadSample("not_image", str(e)) from None
    except Image.DecompressionBombError as e:
        raise BadSample("too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadSample("corrupt", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w < min_size or h < min_size:
        raise BadSample("too_small", f"{w}x{h} px is below the minimum side of {min_size} px")
    rotated = _exif_orientation(img) not in (0, 1)
    if lazy_jpeg and img.format == "JPEG" and img.mode == "RGB" and not rotated:
        return img, None
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    load_pixels(img)
    if rotated:  # camera photos: show them upright, as every viewer does
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def _exif_orientation(img: Image.Image) -> int:
    if "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a reason to drop the image
        return 1
