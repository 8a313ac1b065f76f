"""timm's RandAugment / AutoAugment / AugMix ops, with posterize made safe on Pillow >= 13.

timm's posterize ops map a magnitude to the bits kept per channel; ``PosterizeIncreasing`` (the ``inc1``
of ``rand-m9-mstd0.5-inc1``) keeps 0 bits at level 10, which the magnitude noise (``mstd0.5``) reaches
about once in 700 images. Pillow < 13 turned 0 bits into a black image (mask ``~(2**8 - 1)``); Pillow 13
raises ``ValueError: bits must be between or equal to 1 and 8`` and a fine-tune dies mid-epoch.

:func:`safe_posterize` keeps Pillow < 13's result on every Pillow; :func:`patch_posterize` puts it into the
ops of ONE built transform (each timm ``AugmentOp`` holds its own ``aug_fn``), so timm itself and every
other user of it in the process are unchanged, and every other op is timm's own function.
"""
from __future__ import annotations

from PIL import Image, ImageOps

POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")


def safe_posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's ``posterize`` (8 bits or more: unchanged; 1-7: Pillow's) with 0 bits as Pillow < 13 gave it:
    every channel 0."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep >= 1:
        return ImageOps.posterize(img, bits_to_keep)
    return img.point(lambda _: 0)


def augment_ops(transform) -> list:
    """Every timm ``AugmentOp`` inside ``transform`` (a Compose, RandAugment, AutoAugment or AugMix)."""
    from timm.data.auto_augment import AugmentOp
    found, todo = [], [transform]
    while todo:
        t = todo.pop()
        if isinstance(t, AugmentOp):
            found.append(t)
        elif isinstance(t, (list, tuple)):
            todo.extend(t)
        else:
            for name in ("transforms", "ops", "policy"):  # Compose, RandAugment/AugMix, AutoAugment
                todo.extend(getattr(t, name, None) or [])
    return found


def patch_posterize(transform):
    """Point the posterize ops of ``transform`` at :func:`safe_posterize`; returns ``transform``."""
    for op in augment_ops(transform):
        if op.name in POSTERIZE_OPS:
            op.aug_fn = safe_posterize
    return transform
