"""Held-out samples for the pictures, prepared exactly as the run's own held-out evaluation does."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from beit.data.loading.heldout import HeldOutStream, good_rows
from beit.data.storage.shardspec import expand_shards

ONE_PROCESS = SimpleNamespace(process_index=0, num_processes=1)  # what the held-out loaders read of an Accelerator


def _good(loader, limit: int):
    """Decodable rows of ``loader``'s batches until ``limit`` samples (counted bad ones are skipped)."""
    n = 0
    for batch in loader:
        ok = good_rows(batch)
        rows = {k: v[ok] for k, v in batch.items() if torch.is_tensor(v)}
        if not len(ok) or not ok.any():
            continue
        k = min(int(ok.sum()), limit - n)
        yield {key: v[:k] for key, v in rows.items()}
        n += k
        if n >= limit:
            return


def _shards(spec, what: str, cfg=None) -> list[str]:
    """The held-out shards; for a run on a --data folder, a message that says where they went."""
    folder = getattr(cfg, "data", "") if cfg is not None else ""
    if not spec:
        raise ValueError(f"no held-out shards to draw pictures from ({what} is empty" + (
            f"; the run read --data {folder} with nothing held out" if folder else "") + "): pass --val_shards")
    try:
        return expand_shards(spec)
    except ValueError as e:
        if not folder:
            raise
        raise ValueError(f"the run's held-out shards, written from --data {folder} into the shard cache, are gone "
                         f"(the folder changed and was converted again, or the cache was cleared): {e}; pass "
                         "--val_shards") from None


def pretrain_samples(cfg, tokenizer, n: int, val_shards=None) -> dict:
    """{"image": uint8 encoder views, "tokenizer_image": uint8 tokenizer views, "mask": bool [n,h,w]} of the
    first ``n`` held-out images, with the run's held-out views and seeded masks."""
    from beit.data.pipelines.pretraining import build_mim_loader

    cfg = replace(cfg, num_workers=0, token_cache=None)
    shards = _shards(val_shards or cfg.val_shards or ([] if cfg.data else cfg.train_shards), "val_shards",
                     None if val_shards else cfg)
    loader = build_mim_loader(cfg, shards, tokenizer, ONE_PROCESS, train=False, batch_size=n)
    parts = list(_good(loader, n))
    if not parts:
        raise ValueError(f"no decodable image in {shards[:3]}")
    return {k: torch.cat([p[k] for p in parts]) for k in ("image", "tokenizer_image", "mask")}


def classification_batches(cfg, limit: int, val_shards=None, batch_size: int = 64):
    """Batches {"image" normalised, "label"} of up to ``limit`` held-out images (the run's eval transform)."""
    from beit.data.pipelines.labelled import LabelledMap, build_transforms

    stream = HeldOutStream(_shards(val_shards or cfg.val_shards, "val_shards", None if val_shards else cfg),
                           LabelledMap(build_transforms(cfg, False), cfg.num_classes), seed=cfg.seed)
    return _good(DataLoader(stream, batch_size=batch_size), limit)


def segmentation_samples(cfg, n: int, val_shards=None) -> list[dict]:
    """Up to ``n`` held-out {"image" normalised [3,H,W], "label" [H',W']} pairs (sizes vary per image)."""
    from beit.data.pipelines.segmentation import SegEvalMap

    stream = HeldOutStream(_shards(val_shards or cfg.val_shards, "val_shards"),
                           SegEvalMap(cfg.num_classes, cfg.image_size, reduce_zero_label=cfg.reduce_zero_label,
                                      mean=tuple(cfg.mean), std=tuple(cfg.std)), seed=cfg.seed)
    out = []
    for part in _good(DataLoader(stream, batch_size=1), n):
        out.append({"image": part["image"][0], "label": part["label"][0]})
    return out
