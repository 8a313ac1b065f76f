"""The training augmentations on a whole batch of decoded uint8 images at once, on their device.

Used by the memory cache (``beit.data.loading.memory_loader``); the per-image transforms
(``TwoViewTransform``, timm's classification transform) stay the reference.

* **Random resized crop** as timm's ``RandomResizedCropAndInterpolation.get_params`` draws it (10 tries of
  area and log-ratio, then the centre-crop fallback), for every image of the batch in one go.
* **Crop + resize + flip as two matrix products.** PIL's antialiased resampling of a box is separable:
  ``out = Wy @ img @ Wx^T`` with per-image weight matrices built exactly as Pillow builds its coefficients
  (``precompute_coeffs``: filter support widened by the down-scale factor, weights normalised per output
  pixel, clipped to the image). A flip reverses the rows of ``Wx``. Like Pillow's uint8 path, the horizontal
  pass is rounded to uint8 before the vertical one, so the output matches ``Image.resize(box=...)`` to
  within one level (Pillow's fixed-point coefficients) when the box is scaled down or by little up (the
  crops of the recipes); on a strong up-scale (e.g. a 50 px box to 90 px) Pillow 13 may run its vertical pass
  first, and single values then differ by up to a few percent. Bicubic, bilinear, lanczos, box, hamming and
  nearest are supported.
* **Colour jitter** (brightness, contrast, saturation; hue 0) with torchvision's factor ranges and a
  random order per image, rounded to uint8 after every operation as PIL does; contrast blends towards
  the mean grey of the smallest view, as ``TwoViewTransform.jitter_views``.
"""
from __future__ import annotations

import math

import torch

BOX_TRIES = 10
FILTER_SUPPORT = {"nearest": 0.5, "box": 0.5, "bilinear": 1.0, "hamming": 1.0, "bicubic": 2.0, "lanczos": 3.0}


def _filter(name: str, x: torch.Tensor) -> torch.Tensor:
    """Pillow's resampling filters (src/libImaging/Resample.c)."""
    a = x.abs()
    if name == "bilinear":
        return (1 - a).clamp_(min=0)
    if name == "bicubic":  # a = -0.5: two cubic pieces, zero from |x| = 2 on
        near = (1.5 * a - 2.5) * a * a + 1
        far = (((a - 5) * a + 8) * a - 4) * -0.5
        return torch.where(a < 1, near, far * (a < 2))
    if name == "lanczos":
        return torch.sinc(x) * torch.sinc(x / 3) * (a < 3)
    if name == "box":
        return ((x > -0.5) & (x <= 0.5)).to(x.dtype)
    if name == "hamming":
        return torch.sinc(x) * (0.54 + 0.46 * torch.cos(math.pi * x)) * (a < 1)
    raise ValueError(f"no batched resampling filter {name!r}; choose one of {sorted(FILTER_SUPPORT)}")


def resample_weights(start: torch.Tensor, end: torch.Tensor, in_size: torch.Tensor, out_size: int, in_max: int,
                     filt: str, flip: torch.Tensor | None = None) -> torch.Tensor:
    """[B, out_size, in_max] weights that resample the span [start, end) of each image (``in_size`` pixels
    along this axis) to ``out_size`` pixels with Pillow's filter ``filt``; ``flip`` (bool [B]) mirrors the
    output. float64 arguments [B]."""
    dev = start.device
    scale = ((end - start) / out_size)[:, None]                                   # [B, 1]
    centre = start[:, None] + (torch.arange(out_size, device=dev, dtype=torch.float64) + 0.5) * scale
    if filt == "nearest":
        idx = centre.floor().clamp(max=(in_size[:, None] - 1)).long()
        w = torch.zeros(len(start), out_size, in_max, device=dev).scatter_(2, idx[..., None], 1.0)
    else:
        fscale = scale.clamp(min=1.0)
        support = FILTER_SUPPORT[filt] * fscale
        lo = (centre - support + 0.5).trunc().clamp(min=0)
        hi = torch.minimum((centre + support + 0.5).trunc(), in_size[:, None].to(torch.float64))
        taps = lo[..., None] + torch.arange(int(math.ceil(2 * float(support.max()))) + 1, device=dev)  # [B, S, K]
        tw = _filter(filt, ((taps - centre[..., None] + 0.5) / fscale[..., None]).float()) * (taps < hi[..., None])
        total = tw.sum(-1, keepdim=True)
        tw = tw / total.masked_fill_(total == 0, 1.0)
        w = torch.zeros(len(start), out_size, in_max, device=dev)
        w.scatter_add_(2, taps.clamp(max=in_max - 1).long(), tw)
    if flip is not None:
        w = torch.where(flip[:, None, None], w.flip(1), w)
    return w.float()


def resize_boxes(images: torch.Tensor, sizes: torch.Tensor, boxes: torch.Tensor, out_size: int, filt: str,
                 flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, C, H, W] images (each valid in its top-left ``sizes`` [B, 2] = (h, w)), float boxes [B, 4]
    (left, top, right, bottom) -> uint8 [B, C, out, out]: each box resized as Pillow's
    ``Image.resize((out, out), filt, box=box)`` would (within one level), mirrored where ``flip``."""
    n, c, hmax, wmax = images.shape
    boxes, sizes = boxes.to(torch.float64), sizes.to(torch.float64)
    wx = resample_weights(boxes[:, 0], boxes[:, 2], sizes[:, 1], out_size, wmax, filt, flip)   # [B, S, W]
    wy = resample_weights(boxes[:, 1], boxes[:, 3], sizes[:, 0], out_size, hmax, filt)         # [B, S, H]
    rows = torch.bmm(images.reshape(n, c * hmax, wmax).float(), wx.transpose(1, 2))             # [B, C*H, S]
    rows = rows.add_(0.5).floor_().clamp_(0, 255)                                               # Pillow's uint8 pass
    rows = rows.view(n, c, hmax, out_size).transpose(1, 2).reshape(n, hmax, c * out_size)       # [B, H, C*S]
    out = torch.bmm(wy, rows).view(n, out_size, c, out_size).transpose(1, 2)                    # [B, C, S, S]
    return out.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8).contiguous()


def random_resized_boxes(sizes: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                         u: torch.Tensor) -> torch.Tensor:
    """timm's ``RandomResizedCropAndInterpolation.get_params`` for every image of a batch: float64 boxes
    [B, 4] (left, top, right, bottom) in whole pixels. ``sizes``: [B, 2] (h, w); ``u``: float64 uniforms
    [B, tries, 4] (area, log-ratio, top, left of each try; ``BOX_UNIFORMS`` per image)."""
    h_img, w_img = sizes[:, 0].double().cpu(), sizes[:, 1].double().cpu()
    n = len(sizes)
    u = u.to(torch.float64).cpu()
    area = (h_img * w_img)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * u[..., 1])
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    ok = (w <= w_img[:, None]) & (h <= h_img[:, None])
    first = torch.where(ok.any(1), ok.double().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0)[:, None]
    w, h = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]
    top = ((h_img - h + 1) * u[..., 2].gather(1, pick)[:, 0]).floor()
    left = ((w_img - w + 1) * u[..., 3].gather(1, pick)[:, 0]).floor()
    # fallback: the centre crop of timm (whole image, or trimmed to the ratio range)
    in_ratio = w_img / h_img
    fw = torch.where(in_ratio > max(ratio), (h_img * max(ratio)).round(), w_img)
    fh = torch.where(in_ratio < min(ratio), (w_img / min(ratio)).round(), h_img)
    miss = first < 0
    w, h = torch.where(miss, fw, w), torch.where(miss, fh, h)
    top = torch.where(miss, torch.div(h_img - h, 2, rounding_mode="floor"), top)
    left = torch.where(miss, torch.div(w_img - w, 2, rounding_mode="floor"), left)
    return torch.stack([left, top, left + w, top + h], 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L (ITU-R 601-2 luma), rounded, as float [B, 1, H, W]."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (r * 0.299 + g * 0.587 + b * 0.114).add_(0.5).floor_()


def _put(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255)


class BatchedJitter:
    """Brightness, contrast and saturation jitter (torchvision's ``ColorJitter(s, s, s, 0)`` ranges) with a
    random order per image, the same factors on every view of an image."""

    def __init__(self, strength: float):
        self.strength = float(strength)

    @staticmethod
    def draw(gen: torch.Generator, n: int) -> torch.Tensor:
        """The uniforms of ``n`` images: [n, 6] (three factors, three order keys)."""
        return torch.rand(n, 6, generator=gen, dtype=torch.float64)

    def __call__(self, views: list[torch.Tensor], u: torch.Tensor) -> list[torch.Tensor]:
        s = self.strength
        lo = max(0.0, 1 - s)
        factors = (lo + (1 + s - lo) * u[:, :3]).float()
        order = u[:, 3:].argsort(1)                                            # per image: a permutation of 3 ops
        dev = views[0].device
        factors, order = factors.to(dev), order.to(dev)
        xs = [v.float() for v in views]
        for k in range(3):
            op = order[:, k]
            f = factors.gather(1, op[:, None])[:, 0].view(-1, 1, 1, 1)
            m = _grey(xs[-1]).mean((1, 2, 3), keepdim=True).add_(0.5).floor_()  # the smallest view's mean grey
            out = []
            for x in xs:
                bright = _put(x * f)
                contrast = _put(m + (x - m) * f)
                g = _grey(x)
                sat = _put(g + (x - g) * f)
                sel = op.view(-1, 1, 1, 1)
                out.append(torch.where(sel == 0, bright, torch.where(sel == 1, contrast, sat)))
            xs = out
        return [x.to(torch.uint8) for x in xs]
