"""The memory-cache training path: which recipes it serves, their batched augmentations, and the choice
between it and the per-image stream (the start-up summary's "data path" line says which runs and why).

* pretraining (``MimBatch``): ``TwoViewTransform``'s crop box, both resizes, flip and colour jitter on the
  batch, a block mask per slot;
* fine-tuning (``ClassifyBatch``): timm's classification training transform, read op by op: random resized
  crop, flip, colour jitter and normalisation run on the batch; RandAugment / AutoAugment / AugMix (on PIL
  images, between the flip and the normalisation) and random erasing run per image (timm's own ops, with
  random/numpy/torch seeded per slot); any other op sends the recipe to the stream, named in the summary.

``draw(generator, n)`` takes the random numbers of n slots (the loader calls it per block of slots);
``__call__(store, indices, draws)`` augments any number of micro-batches at once.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from beit.data.pipelines.batched import BOX_TRIES, BatchedJitter, random_resized_boxes, resize_boxes
from beit.data.pipelines.transforms import INTERPOLATIONS, encoder_input, seed_everything

_NAMES = {v: k for k, v in INTERPOLATIONS.items()}


def _filter_name(mode) -> str:
    """A PIL resampling filter or torchvision ``InterpolationMode`` as a name of ``INTERPOLATIONS``."""
    name = _NAMES.get(mode) or getattr(mode, "value", None)
    if name not in INTERPOLATIONS:
        raise NotImplementedError(f"interpolation {mode}")
    return name


def _draw_crop(gen: torch.Generator, n: int, hflip: float) -> dict:
    d = {"box": torch.rand(n, BOX_TRIES, 4, generator=gen, dtype=torch.float64)}
    if hflip > 0:
        d["flip"] = torch.rand(n, generator=gen) < hflip
    return d


def _crop(store, idx, u: dict, scale, ratio, outputs):
    """The crop box and flip of each image, every output (size, filter) resized from it."""
    dev = store.images.device
    sizes = store.sizes[idx]
    boxes = random_resized_boxes(sizes, scale, ratio, u["box"]).to(dev)
    flip = u["flip"].to(dev) if "flip" in u else None
    images = store.images[idx]
    out, done = [], {}
    for size, filt in outputs:
        if (size, filt) not in done:
            done[(size, filt)] = resize_boxes(images, sizes, boxes, size, filt, flip)
        out.append(done[(size, filt)])
    return out


class MimBatch:
    """Pretraining's two views + block masks for store images (``TwoViewTransform`` + ``MimSample``)."""

    def __init__(self, transform, masker):
        t = transform
        self.scale, self.ratio, self.hflip = t.scale, t.ratio, t.hflip
        self.outputs = [(t.image_size, _filter_name(t.interp)), (t.tokenizer_size, _filter_name(t.tok_interp))]
        self.jitter = BatchedJitter(t.jitter.brightness[1] - 1) if t.jitter is not None else None
        self.masker = masker
        self.out_pixels = 3 * sum(s * s for s, _ in self.outputs)

    def describe(self) -> str:
        ops = ["random resized crop (" + " and ".join(f"{s} px {f}" for s, f in self.outputs) + ")"]
        ops += ["flip"] * (self.hflip > 0) + ["colour jitter"] * (self.jitter is not None)
        return ", ".join(ops) + "; block masks per image"

    def draw(self, gen: torch.Generator, n: int) -> dict:
        d = _draw_crop(gen, n, self.hflip)
        if self.jitter is not None:
            d["jitter"] = self.jitter.draw(gen, n)
        self.masker.reseed(int(torch.randint(1 << 62, (1,), generator=gen)))
        d["mask"] = torch.stack([torch.from_numpy(self.masker()) for _ in range(n)])
        return d

    thread_safe = True  # its random numbers come from ``draw`` and the masker's own generator

    def __call__(self, store, idx, u: dict) -> dict:
        enc, tok = _crop(store, idx, u, self.scale, self.ratio, self.outputs)
        if self.jitter is not None:
            small_last = [enc, tok] if tok.shape[-1] <= enc.shape[-1] else [tok, enc]
            a, b = self.jitter(small_last, u["jitter"].to(enc.device))
            enc, tok = (a, b) if small_last[0] is enc else (b, a)
        return {"image": enc, "tokenizer_image": tok, "mask": u["mask"].to(enc.device)}


class ClassifyBatch:
    """timm's classification training transform on store images, built from its op list; raises
    ``NotImplementedError`` naming an op the batched path does not have."""

    PER_IMAGE = ("RandAugment", "AutoAugment", "AugMixAugment")

    def __init__(self, compose):
        from torchvision.transforms import ColorJitter, Normalize, RandomHorizontalFlip
        self.crop = self.jitter = self.erase = None
        self.hflip, self.per_image, self.mean, self.std = 0.0, [], None, None
        for t in getattr(compose, "transforms", [compose]):
            name = type(t).__name__
            if name == "RandomResizedCropAndInterpolation":
                if isinstance(t.interpolation, (tuple, list)):
                    raise NotImplementedError("random interpolation per image (timm 'random')")
                self.crop = (t.size[0], t.scale, t.ratio, _filter_name(t.interpolation))
            elif isinstance(t, RandomHorizontalFlip):
                self.hflip = float(t.p)
            elif isinstance(t, ColorJitter):
                ranges = {t.brightness, t.contrast, t.saturation}
                if t.hue is not None or len(ranges) > 1:
                    raise NotImplementedError("colour jitter with hue or unequal strengths")
                if t.brightness is not None:
                    self.jitter = BatchedJitter(t.brightness[1] - 1)
            elif name in self.PER_IMAGE:
                self.per_image.append(t)
            elif name in ("MaybeToTensor", "ToTensor"):
                pass
            elif isinstance(t, Normalize):
                self.mean, self.std = tuple(map(float, t.mean)), tuple(map(float, t.std))
            elif name == "RandomErasing":
                self.erase = t
            else:
                raise NotImplementedError(name)
        if self.crop is None or self.mean is None:
            raise NotImplementedError("a transform without a random resized crop and normalisation")
        self.out_pixels = 3 * self.crop[0] ** 2 * 4  # float output

    def describe(self) -> str:
        size, _, _, filt = self.crop
        ops = [f"random resized crop ({size} px {filt})"] + ["flip"] * (self.hflip > 0)
        ops += ["colour jitter"] * (self.jitter is not None) + ["normalise"]
        line = ", ".join(ops)
        per_image = [type(t).__name__ for t in self.per_image] + ["random erasing"] * (self.erase is not None)
        if per_image:
            line += (f"; per image: {', '.join(per_image)} (timm's own operations, no batched version; the other "
                     "ops stay batched)")
        return line

    def draw(self, gen: torch.Generator, n: int) -> dict:
        d = _draw_crop(gen, n, self.hflip)
        if self.jitter is not None:
            d["jitter"] = self.jitter.draw(gen, n)
        if self.per_image or self.erase is not None:
            d["seed"] = torch.randint(1 << 62, (n,), generator=gen)
        return d

    @property
    def thread_safe(self) -> bool:
        """RandAugment and random erasing draw from the process-wide RNGs (seeded around each call)."""
        return not self.per_image and self.erase is None

    def _per_image(self, x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """RandAugment & co. on PIL images, then normalisation and random erasing, each image with random/numpy/
        torch seeded from its own seed (the caller's RNG states are kept)."""
        from beit.data.loading.stream import rng_states, set_rng_states
        saved, out = rng_states(), []
        try:
            for view, s in zip(x.cpu(), seeds):
                seed_everything(s)
                if self.per_image:
                    img = Image.fromarray(np.ascontiguousarray(view.permute(1, 2, 0).numpy()), "RGB")
                    for t in self.per_image:
                        img = t(img)
                    view = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
                view = encoder_input(view, self.mean, self.std)
                out.append(self.erase(view) if self.erase is not None else view)
        finally:
            set_rng_states(saved)
        return torch.stack(out).to(x.device)

    def __call__(self, store, idx, u: dict) -> dict:
        size, scale, ratio, filt = self.crop
        (x,) = _crop(store, idx, u, scale, ratio, [(size, filt)])
        if self.jitter is not None:
            (x,) = self.jitter([x], u["jitter"].to(x.device))
        if self.per_image or self.erase is not None:
            x = self._per_image(x, u["seed"].tolist())
        else:
            x = encoder_input(x, self.mean, self.std)
        return {"image": x, "label": store.labels[idx]}


def choose_loader(cfg, shards, accelerator, augment, *, batch_size: int, num_classes: int, batch_multiple: int,
                  stream, why: str = ""):
    """The memory-cache loader when ``cfg.memory_cache_mb`` allows it and the data fits, else ``stream()``;
    either way the loader's first note is the "data path" line. ``augment()`` builds the batched augmentation
    (``NotImplementedError`` names an op it lacks)."""
    from beit.data.loading.memory_loader import MemoryLoader
    from beit.data.loading.memory_store import decoded_store
    from beit.data.storage.shardspec import expand_shards

    if why:
        pass
    elif cfg.memory_cache_mb <= 0:
        why = "--memory_cache_mb 0"
    elif cfg.resampled:
        why = "--resampled draws shards at random"
    elif cfg.data_order != "shards":  # its order and resume are the stream's own (the cache's are invariant too)
        why = f"--data_order {cfg.data_order} keeps the stream's order"
    if not why:
        try:
            batched = augment()
        except NotImplementedError as e:
            why = f"the augmentation's {e} has no batched version"
    if not why:
        urls = expand_shards(shards, allow_remote=cfg.allow_remote_shards)
        store, why = decoded_store(urls, num_classes=num_classes, budget_mb=cfg.memory_cache_mb,
                                   device=accelerator.device, small_image_size=cfg.image_size)
    if why:
        loader = stream()
        loader.notes = [f"data path: per-image stream ({why})"] + list(loader.notes)
        return loader
    loader = MemoryLoader(store, batched, batch_size=batch_size, rank=accelerator.process_index,
                          world_size=accelerator.num_processes, seed=cfg.seed,
                          batches_per_epoch=cfg.batches_per_epoch or None, batch_multiple=batch_multiple,
                          max_bad_fraction=cfg.max_bad_fraction)
    loader.notes = [f"data path: memory cache, {store.describe()}; augmented in batches on "
                    f"{store.images.device}: {batched.describe()}"
                    + ("; --num_workers is not used" if cfg.num_workers > 0 else "")]
    return loader

