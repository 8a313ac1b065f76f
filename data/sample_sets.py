"""Built-in real sample sets, made offline from images that ship inside scikit-image / scikit-learn.

``photos``: the real photographs and textures of ``skimage.data`` plus scikit-learn's two sample
photographs, cut deterministically into square crops (96-160 px, several scales). Each source
image's rightmost 20 % columns are reserved for ``val-*.tar``; ``train-*.tar`` crops come from
the rest, so validation crops never overlap a training crop.

``digits``: scikit-learn's 1,797 real hand-written digits (8x8 grey) upscaled to 32x32 RGB PNG,
label in ``cls``, with a fixed stratified 20 % held-out split in ``test-*.tar``.

``beit samples`` (beit.data.samples) writes them.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from beit.data.storage.shard_writer import Item, WriteOptions, write_shards

# skimage.data entries that are real photographs / micrographs / textures and ship with the wheel.
# (cat is chelsea again, horse/logo/checkerboard/... are synthetic, several others need a download.)
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins",
                  "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
                  "moon", "page", "retina", "rocket", "text")
CROP_FRACTIONS = (0.25, 0.4, 0.6)   # crop side as a fraction of the image's shorter side
OUT_MIN, OUT_MAX = 96, 160          # output crop side range in px
VAL_FRACTION = 0.2                  # rightmost columns kept for validation
PHOTO_QUALITY = 90
DIGIT_SIZE = 32
DIGIT_TEST_FRACTION = 0.2


def load_photos() -> dict[str, np.ndarray]:
    """Name -> HxWx3 uint8 array of every sample photo available offline (missing ones skipped)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out: dict[str, np.ndarray] = {}
    for name in SKIMAGE_PHOTOS:
        try:
            a = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - entries that need a download fail offline; expected
            continue
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        out[name] = np.ascontiguousarray(a[..., :3].astype(np.uint8))
    sk = load_sample_images()
    for fname, a in zip(sk.filenames, sk.images):
        out["sklearn_" + Path(fname).stem] = np.ascontiguousarray(a)
    if not out:
        raise RuntimeError("no sample photos could be loaded from scikit-image / scikit-learn")
    return out


def _crops(h: int, w: int, x_lo: int, x_hi: int):
    """Deterministic (x, y, side) square crops inside columns [x_lo, x_hi) at several scales."""
    region_w = x_hi - x_lo
    for f in CROP_FRACTIONS:
        side = min(max(int(round(min(h, w) * f)), 48), h, region_w)
        stride = max(side // 2, 1)
        for y in range(0, h - side + 1, stride):
            for x in range(x_lo, x_hi - side + 1, stride):
                yield x, y, side


def _encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=PHOTO_QUALITY)
    return buf.getvalue()


def photo_items() -> dict[str, list[Item]]:
    """{"train": [...], "val": [...]} crops of every sample photo."""
    splits: dict[str, list[Item]] = {"train": [], "val": []}
    for name, arr in sorted(load_photos().items()):
        img = Image.fromarray(arr, "RGB")
        h, w = arr.shape[:2]
        cut = int(round(w * (1 - VAL_FRACTION)))
        for split, (lo, hi) in (("train", (0, cut)), ("val", (cut, w))):
            seen = set()
            for x, y, side in _crops(h, w, lo, hi):
                if (x, y, side) in seen:
                    continue
                seen.add((x, y, side))
                out = min(max(side, OUT_MIN), OUT_MAX)
                crop = img.crop((x, y, x + side, y + side)).resize((out, out), Image.Resampling.BICUBIC)
                key = f"{name}_s{side}_x{x}_y{y}"
                splits[split].append(Item(key=key, image=_encode_jpeg(crop), ext="jpg"))
    return splits


def digit_items() -> dict[str, list[Item]]:
    """{"train": [...], "test": [...]} labelled 32x32 RGB digits with a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx = np.arange(len(d.target))
    train_idx, test_idx = train_test_split(idx, test_size=DIGIT_TEST_FRACTION, random_state=0,
                                           stratify=d.target)
    splits: dict[str, list[Item]] = {}
    for split, ids in (("train", train_idx), ("test", test_idx)):
        items = []
        for i in sorted(int(j) for j in ids):
            grey = np.clip(d.images[i] / 16.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
            img = Image.fromarray(grey, "L").resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="PNG")
            items.append(Item(key=f"digit_{i:04d}", image=buf.getvalue(), ext="png", label=int(d.target[i])))
        splits[split] = items
    return splits


def build_sample_shards(out_dir: str | Path, kind: str, *, progress: bool = False) -> list[str]:
    """Write the built-in sample set ``kind`` ("photos" or "digits") into ``out_dir``.

    photos -> out_dir/train-*.tar and out_dir/val-*.tar; digits -> out_dir/train-*.tar and
    out_dir/test-*.tar (labels in ``cls``). Overwrites an earlier set; returns all shard paths.
    Output bytes are deterministic (same versions of the libraries -> same sha256).
    """
    if kind == "photos":
        splits, per_shard, label_map = photo_items(), 100, None
    elif kind == "digits":
        splits, per_shard, label_map = digit_items(), 400, {str(c): c for c in range(10)}
    else:
        raise ValueError(f"unknown sample kind {kind!r}; choose 'photos' or 'digits'")
    paths: list[str] = []
    for split, items in splits.items():
        opts = WriteOptions(max_samples=per_shard, shuffle_seed=0, validate="none")
        paths += write_shards(items, out_dir, prefix=split, opts=opts, label_map=label_map,
                              source=f"beit.data.samples:{kind}/{split}", overwrite=True, progress=progress)
    return paths


def write_class_folders(out_dir: str | Path, kind: str) -> int:
    """A sample set as a folder of class folders, as a user's labelled images would be: ``digits`` (all 1,797
    digits, 32 px PNG, ``<digit>/digit_NNNN.png``) or ``photos`` (the 1,326 training crops of the photographs,
    96-160 px JPEG, one folder per photograph). Returns the number of images written."""
    out = Path(out_dir)
    if kind == "digits":
        items = [it for split in digit_items().values() for it in split]
        named = [(str(it.label), it) for it in items]
    elif kind == "photos":
        splits = photo_items()
        name_of = {it.key: it.key.rsplit("_s", 1)[0] for split in splits.values() for it in split}
        both = {name_of[it.key] for it in splits["train"]} & {name_of[it.key] for it in splits["val"]}
        named = [(name_of[it.key], it) for it in splits["train"] if name_of[it.key] in both]
    else:
        raise ValueError(f"unknown sample kind {kind!r}; choose 'photos' or 'digits'")
    for name, it in named:
        path = out / name / f"{it.key}.{it.ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(it.image)
    return len(named)
