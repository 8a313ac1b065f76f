"""RandAugment as the shipped recipes draw it, on the installed Pillow: every op of every spec at every
magnitude the spec can reach, on real sample images; posterize keeps Pillow < 13's result at 0 bits and
every other op stays timm's own."""
import copy
import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from beit.data.pipelines.labelled import build_transforms
from beit.data.rand_augment import POSTERIZE_OPS, augment_ops, safe_posterize
from beit.options.finetune import FinetuneConfig

REPO = Path(__file__).resolve().parents[1]
LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitudes are clipped to [0, 10] unless the spec sets mmax


def shipped_specs() -> dict[str, str]:
    """auto_augment spec -> where it is shipped (launch/*.yaml, FinetuneConfig's default, beit compare's recipe)."""
    from beit.compare.recipe import FINETUNE
    found = {}
    for path in sorted((REPO / "launch").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text()).get("auto_augment")
        if spec:
            found.setdefault(spec, f"launch/{path.name}")
    default = next(f.default for f in dataclasses.fields(FinetuneConfig) if f.name == "auto_augment")
    for spec, where in ((default, "FinetuneConfig default"), (FINETUNE.get("auto_augment"), "beit compare recipe")):
        if spec:
            found.setdefault(spec, where)
    return found


SPECS = shipped_specs()


def test_the_shipped_specs_are_the_ones_this_file_knows():
    # a new spec in a recipe is picked up by the tests below; this pins that the known ones are there
    assert {"rand-m9-mstd0.5-inc1", "rand-m6-mstd0.5-inc1"} <= set(SPECS)


@pytest.fixture(scope="module")
def real_images() -> list[Image.Image]:
    """Real photographs (skimage / scikit-learn) and a real hand-written digit, 48 px crops, RGB."""
    from sklearn.datasets import load_digits

    from beit.data.sample_sets import load_photos
    photos = load_photos()
    out = []
    for name in ("astronaut", "coffee", "camera", "sklearn_china"):
        a = photos[name]
        side = min(a.shape[:2])
        out.append(Image.fromarray(a[:side, :side]).resize((48, 48), Image.Resampling.BICUBIC))
    digit = np.clip(load_digits().images[7] / 16 * 255, 0, 255).astype(np.uint8)
    out.append(Image.fromarray(digit, "L").resize((48, 48), Image.Resampling.BICUBIC).convert("RGB"))
    return out


def train_transform(spec: str, image_size: int = 48):
    return build_transforms(FinetuneConfig(auto_augment=spec, image_size=image_size), is_training=True)


def reachable_levels(op, n: int = 201) -> np.ndarray:
    """Every magnitude ``op`` can be applied at (timm's AugmentOp.__call__): fixed without noise, [0, m] for
    uniform noise, [0, upper bound] for Gaussian noise (it reaches any value, then clipped)."""
    upper = op.magnitude_max or LEVEL_DENOM
    if not op.magnitude_std:
        lo = hi = min(max(op.magnitude, 0.0), upper)
    elif op.magnitude_std == float("inf"):
        lo, hi = 0.0, min(op.magnitude, upper)
    else:
        lo, hi = 0.0, upper
    return np.unique(np.round(np.append(np.linspace(lo, hi, n), [lo, hi, min(op.magnitude, hi)]), 6))


def at_level(op, level: float):
    """``op`` always applied, at exactly ``level``."""
    fixed = copy.copy(op)
    fixed.prob, fixed.magnitude, fixed.magnitude_std = 1.0, float(level), 0
    return fixed


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_every_op_at_every_reachable_magnitude(spec, real_images):
    ops = augment_ops(train_transform(spec))
    assert len(ops) >= 14 and any(op.name in POSTERIZE_OPS for op in ops), [op.name for op in ops]
    for op in ops:
        levels = reachable_levels(op)
        assert levels[-1] == LEVEL_DENOM, (op.name, levels[-1])  # the noise reaches the top of the scale
        for level in levels:
            fixed = at_level(op, level)
            for seed, img in enumerate(real_images):
                random.seed(seed)  # also picks the sign of the signed ops
                try:
                    out = fixed(img)
                except Exception as e:  # noqa: BLE001 - any op failure is the finding
                    pytest.fail(f"{spec} ({SPECS[spec]}): {op.name} at magnitude {level:g} raised {e!r}")
                assert isinstance(out, Image.Image) and out.size == img.size and out.mode == img.mode


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_whole_transform_seeded_draws(spec, real_images):
    """The training transform as the loader calls it (seeded per sample), 3,000 draws per spec: today's timm +
    Pillow 13 raised on about 1 draw in 700 at m9."""
    t = train_transform(spec, image_size=32)
    for i in range(3000):
        random.seed(i)
        np.random.seed(i)
        torch.manual_seed(i)
        x = t(real_images[i % len(real_images)])
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all()


def test_posterize_is_pillow_12s_at_every_bit_count(real_images):
    """Pillow < 13 kept ``bits`` high bits with the mask ~(2**(8-bits)-1), 0 bits included (black)."""
    for img in real_images:
        a = np.asarray(img)
        for bits in range(0, 9):
            mask = ~(2 ** (8 - bits) - 1) & 0xFF
            assert np.array_equal(np.asarray(safe_posterize(img, bits)), a & mask), bits
    grey = real_images[-1].convert("L")
    assert np.asarray(safe_posterize(grey, 0)).max() == 0 and safe_posterize(grey, 0).mode == "L"


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_only_posterize_differs_from_timm(spec, real_images):
    """Every other op is timm's own function; posterize gives timm's result wherever timm's works."""
    from timm.data import create_transform
    from timm.data.auto_augment import NAME_TO_OP
    ours = augment_ops(train_transform(spec))
    theirs = augment_ops(create_transform(48, is_training=True, auto_augment=spec))
    assert [op.name for op in ours] == [op.name for op in theirs]
    for mine, timm_op in zip(ours, theirs):
        if mine.name not in POSTERIZE_OPS:
            assert mine.aug_fn is NAME_TO_OP[mine.name] and timm_op.aug_fn is NAME_TO_OP[mine.name]
            continue
        assert mine.aug_fn is safe_posterize and timm_op.aug_fn is NAME_TO_OP[mine.name]  # timm itself untouched
        for level in reachable_levels(mine, n=41):
            bits = mine.level_fn(level, mine.hparams)[0]
            for img in real_images[:2]:
                got = np.asarray(at_level(mine, level)(img))
                if bits >= 1:
                    assert np.array_equal(got, np.asarray(at_level(timm_op, level)(img))), (mine.name, level)
                else:
                    assert got.max() == 0, (mine.name, level)


@pytest.mark.parametrize("spec", ["original-mstd0.5", "v0", "augmix-m5-w4-d2"])
def test_other_timm_policies_get_the_safe_posterize_too(spec):
    """AutoAugment policies and AugMix hold their ops elsewhere than RandAugment; the loader pickles the transform."""
    import pickle
    ops = augment_ops(pickle.loads(pickle.dumps(train_transform(spec))))
    posterize = [op for op in ops if op.name in POSTERIZE_OPS]
    assert ops and posterize and all(op.aug_fn is safe_posterize for op in posterize)
