"""Pretraining samples: the two views of an image (encoder + tokenizer) with a seeded block mask, or a stored
view with its tokens from a token cache, and the loaders that stream them."""
from __future__ import annotations

import torch


class MimSample:
    """The loader's ``map_fn``: two-view augmentation + a block mask for one image.

    The stream seeds ``random``/numpy/torch per sample (the crop, jitter and flip) and passes the
    seed as ``sample["__seed__"]``; the masking generator is reseeded with it, so a sample's views
    and mask are reproducible and a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, transform, masker):
        self.transform, self.masker = transform, masker

    def __call__(self, img, sample: dict) -> dict:
        enc, tok = self.transform(img)
        self.masker.reseed(sample["__seed__"])
        return {"image": enc, "tokenizer_image": tok, "mask": torch.from_numpy(self.masker())}


class CachedMimSample(MimSample):
    """The loader's ``map_fn`` on token-cache shards: one stored view with its tokens + a block mask."""

    def __call__(self, img, sample: dict) -> dict:
        view = self.transform(img, sample)  # CachedViews: picks a stored view with the seeded `random`
        self.masker.reseed(sample["__seed__"])
        return {"image": view["images"], "tokens": view["tokens"], "mask": torch.from_numpy(self.masker())}


def masking_generator(cfg):
    """The block-masking generator of a pretraining config (``PretrainConfig``); its constructor checks it."""
    from beit.masking import MaskingGenerator
    n = cfg.masked_count()
    return MaskingGenerator(cfg.grid, n, min_num_patches=min(cfg.min_mask_patches, n),
                            max_num_patches=cfg.max_mask_patches or None, min_aspect=cfg.min_mask_aspect)


def build_mim_loader(cfg, shards, tokenizer, accelerator, *, train: bool, batch_size: int, accum: int = 1,
                     masker=None):
    """Training (``train``) or held-out loader; training reads the token cache when cfg.token_cache is set.
    The held-out loader reads every image of this rank's share once (a partial last batch included) and shows
    the whole image (centre square), no jitter or flip."""
    from beit.data.loading.global_order import build_loader_for_order
    from beit.data.loading.heldout import heldout_loader
    from beit.data.pipelines.transforms import TwoViewTransform
    from beit.tokenizers.token_cache import CachedViews

    if train and cfg.token_cache:
        transform = CachedViews(image_size=cfg.image_size, color_jitter=cfg.color_jitter)
    elif train:
        transform = TwoViewTransform(image_size=cfg.image_size, tokenizer_size=tokenizer.input_size,
                                     tokenizer_interpolation=tokenizer.interpolation,
                                     scale=(cfg.crop_scale_min, 1.0), color_jitter=cfg.color_jitter, hflip=cfg.hflip)
    else:
        transform = TwoViewTransform(image_size=cfg.image_size, tokenizer_size=tokenizer.input_size,
                                     tokenizer_interpolation=tokenizer.interpolation,
                                     scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=0.0, hflip=0.0)
    map_fn = (CachedMimSample if train and cfg.token_cache else MimSample)(transform, masker or masking_generator(cfg))
    if not train:
        return heldout_loader(shards, map_fn, accelerator, batch_size=batch_size, num_workers=cfg.loader_workers,
                              seed=cfg.seed, lazy_jpeg=True, remote_retries=cfg.remote_retries)
    from beit.data.pipelines.memory_path import MimBatch, choose_loader

    def stream():
        return build_loader_for_order(
            cfg.data_order, shards, map_fn=map_fn, batch_size=batch_size, num_workers=cfg.loader_workers,
            rank=accelerator.process_index, world_size=accelerator.num_processes, seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer, batches_per_epoch=cfg.batches_per_epoch or None,
            **dict(cfg.shard_source(), manifest=None if cfg.token_cache else cfg.manifest or None),
            max_bad_fraction=cfg.max_bad_fraction,
            small_image_size=cfg.image_size, labels=False,  # upscaled images counted as data/upscaled
            resampled=cfg.resampled, batch_multiple=accum,
            pin_memory=accelerator.device.type == "cuda")  # page-locked batches: the non_blocking copies overlap
    return choose_loader(cfg, shards, accelerator, lambda: MimBatch(transform, map_fn.masker), batch_size=batch_size,
                         num_classes=0, batch_multiple=accum, stream=stream,
                         why="a token cache stores its views" if cfg.token_cache else "")
