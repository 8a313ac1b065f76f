"""Input pipeline: our stream (reduced-size JPEG decoding + TwoViewTransform) against a plain
torchvision ImageFolder with the reference transform (decode full size, jitter the whole image,
flip, crop + resize twice), on the same JPEGs: ImageNet-sized windows of the sample photos, or
your own (``jpegs``). Also ours with the reduced-size decode turned off (full-size decode, the same
transform), which is what PIL's ``Image.draft`` buys. Our loader ships uint8 views that the training
loop normalises on the accelerator; the plain one ships float tensors."""
from __future__ import annotations

import io
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from beit.bench.timing import rnd
from beit.data.loading.decode import open_image
from beit.data.loading.stream import build_stream_loader
from beit.data.pipelines.transforms import TwoViewTransform, encoder_input, tokenizer_input
from beit.data.sample_sets import load_photos
from beit.data.storage.shard_writer import Item, WriteOptions, write_shards


def make_jpegs(n: int, folder: Path, size: tuple[int, int] = (500, 375), quality: int = 90) -> list[Item]:
    """n JPEGs (4:2:0) as files and as shard items: random windows of the sample photos,
    scaled to ``size`` from windows 1-2x as large, so every JPEG keeps camera-level detail. Only the
    photos at least ``size`` are used, unless fewer than 4 are (then windows of smaller ones are
    upscaled, which makes smoother, cheaper-to-decode JPEGs)."""
    rng = random.Random(0)
    photos = [Image.fromarray(a) for _, a in sorted(load_photos().items())]
    big = [p for p in photos if p.size[0] >= size[0] and p.size[1] >= size[1]]
    photos = big if len(big) >= 4 else photos
    (folder / "all").mkdir(parents=True)
    items = []
    for i in range(n):
        p = photos[i % len(photos)]
        w, h = p.size
        hi = min(2.0, w / size[0], h / size[1])
        f = rng.uniform(min(1.0, hi), hi)
        cw, ch = round(size[0] * f), round(size[1] * f)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = p.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        (folder / "all" / f"{i:05d}.jpg").write_bytes(buf.getvalue())
        items.append(Item(key=f"{i:05d}", image=buf.getvalue(), ext="jpg"))
    return items


class ReferenceTwoView:
    """The reference pipeline: full decode, ColorJitter on the whole image, flip, one RRC box
    resized twice (bicubic 224 normalised, lanczos 112 in [0,1])."""

    def __init__(self, image_size=224, tokenizer_size=112):
        self.jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.0)
        self.flip = T.RandomHorizontalFlip(0.5)
        self.sizes = (image_size, tokenizer_size)
        self.norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        self.to_tensor = T.ToTensor()

    def __call__(self, img):
        img = self.flip(self.jitter(img))
        i, j, h, w = RandomResizedCropAndInterpolation.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        box = (j, i, j + w, i + h)
        enc = img.resize((self.sizes[0],) * 2, Image.Resampling.BICUBIC, box=box)
        tok = img.resize((self.sizes[1],) * 2, Image.Resampling.LANCZOS, box=box)
        return self.norm(self.to_tensor(enc)), self.to_tensor(tok)


def timed(batches, warmup: int = 1) -> float:
    """Images/s after the first ``warmup`` batches (worker start-up excluded)."""
    n, t0 = 0, None
    for k, b in enumerate(batches):
        if k == warmup - 1:
            t0 = time.perf_counter()
        elif k >= warmup:
            n += (b["enc"] if isinstance(b, dict) else b[0][0]).shape[0]
    return n / (time.perf_counter() - t0)


def ours(shards: str, workers: int, batch: int) -> float:
    tf = TwoViewTransform()

    def map_fn(img, sample):
        enc, tok = tf(img)
        return {"enc": enc, "tok": tok}

    loader = build_stream_loader(shards, map_fn=map_fn, batch_size=batch, num_workers=workers,
                                 shuffle_buffer=64)
    return timed(loader)


def plain(folder: Path, workers: int, batch: int) -> float:
    ds = ImageFolder(str(folder), transform=ReferenceTwoView())
    return timed(DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers))


def in_process(items: list[Item], folder: Path) -> dict[str, float]:
    """Images/s of decode + two-view transform alone (no loader): ours (uint8 views), ours with the
    float conversion done on the CPU too, ours decoding every JPEG at full size (no ``draft``), and
    the reference."""
    tf, ref = TwoViewTransform(), ReferenceTwoView()
    paths = sorted((folder / "all").glob("*.jpg"))

    def ours_():
        for it in items:
            tf(open_image(it.image)[0])

    def ours_float():
        for it in items:
            enc, tok = tf(open_image(it.image)[0])
            encoder_input(enc), tokenizer_input(tok)

    def ours_full_decode():
        for it in items:
            tf(open_image(it.image, lazy_jpeg=False)[0])

    def plain_():
        for p in paths:
            with open(p, "rb") as f:
                ref(Image.open(f).convert("RGB"))
    out = {}
    for name, fn in (("ours", ours_), ("ours_float_on_cpu", ours_float), ("ours_full_size_decode", ours_full_decode),
                     ("plain", plain_)):
        t0 = time.perf_counter()
        fn()
        out[name] = len(items) / (time.perf_counter() - t0)
    return out


def own_jpegs(src: Path, n: int, folder: Path) -> list[Item]:
    """The first n JPEGs under ``src`` (recursive, sorted), as files and as shard items."""
    files = sorted(q for q in src.rglob("*") if q.suffix.lower() in (".jpg", ".jpeg"))[:n]
    if not files:
        raise SystemExit(f"no .jpg/.jpeg files under {src}")
    (folder / "all").mkdir(parents=True)
    items = []
    for i, f in enumerate(files):
        data = f.read_bytes()
        (folder / "all" / f"{i:05d}.jpg").write_bytes(data)
        items.append(Item(key=f"{i:05d}", image=data, ext="jpg"))
    return items




def run(*, images: int = 1024, workers=(1, 2), batch_size: int = 32, size=(500, 375), quality: int = 90,
        rounds: int = 2, jpegs: Path | None = None) -> dict:
    """Best images/s of ``rounds`` alternating rounds for each pipeline and worker count."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        items = own_jpegs(jpegs, images, tmp / "folder") if jpegs else make_jpegs(images, tmp / "folder", tuple(size),
                                                                                  quality)
        write_shards(items, tmp / "shards", opts=WriteOptions(max_samples=max(1, len(items) // 8), validate="none"),
                     progress=False)
        shards = str(tmp / "shards")
        torch.set_num_threads(1)
        try:
            runs = [in_process(items, tmp / "folder") for _ in range(rounds)]
            one = {k: max(r[k] for r in runs) for k in runs[0]}
            res = {"jpegs": f"{len(items)} from "
                            f"{jpegs}" if jpegs else f"{len(items)} of {size[0]}x{size[1]}, quality {quality}",
                   "kib_per_jpeg": rnd(sum(len(it.image) for it in items) / len(items) / 1024),
                   "batch": batch_size, "views": "224 bicubic + 112 lanczos",
                   "in_process_img_per_s": {k: rnd(v) for k, v in one.items()},
                   "in_process_ratio_vs_plain": rnd(one["ours"] / one["plain"]),
                   "reduced_size_decode_gain": rnd(one["ours"] / one["ours_full_size_decode"]),
                   "loader": []}
            for w in workers:
                o = max(ours(shards, w, batch_size) for _ in range(rounds))
                r = max(plain(tmp / "folder", w, batch_size) for _ in range(rounds))
                res["loader"].append({"workers": w, "ours_img_per_s": rnd(o), "plain_img_per_s": rnd(r),
                                      "ours_per_worker": rnd(o / w), "plain_per_worker": rnd(r / w),
                                      "ratio": rnd(o / r)})
        finally:
            torch.set_num_threads(threads)
    return res
