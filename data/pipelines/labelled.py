"""Labelled WebDataset shards for fine-tuning: timm transforms, label parsing, the two loaders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from beit.config import field
from beit.data.pipelines.transforms import AugmentOptions


def check_shards(cfg, names: tuple[str, ...] = ("train_shards", "val_shards")) -> None:
    """Expand the shard specs ``names`` now so a typo fails at start-up with the data layer's message
    (an empty held-out spec means no held-out evaluation)."""
    from beit.data.storage.shardspec import expand_shards
    for name in names:
        if not getattr(cfg, name):
            continue  # no held-out data: no evaluation; no training shards: --data (its folder plan checks it)
        try:
            expand_shards(getattr(cfg, name), allow_remote=cfg.allow_remote_shards)
        except ValueError as e:
            raise ValueError(f"--{name}: {e}") from None


def manifest_label_map(spec: str, manifest: str = "", allow_remote: bool = False
                       ) -> tuple[dict[str, int] | None, str | None]:
    """(label_map or None, where the manifest is or None): ``manifest`` if given, else the manifest.json beside
    the first shard of ``spec`` (fetched for an http(s) shard)."""
    from beit.data.storage.shardspec import expand_shards, shard_manifest
    m, where = shard_manifest(expand_shards(spec, allow_remote=allow_remote), manifest or None)
    return ((m.get("label_map") or None) if m else None), where


def class_names_of(label_map: dict[str, int]) -> list[str]:
    """Class names in label order (a gap in the labels gets the label's number as its name)."""
    by_label = {v: k for k, v in label_map.items()}
    return [by_label.get(i, str(i)) for i in range(max(label_map.values()) + 1)]


def resolve_classes(train_spec: str, val_spec: str, num_classes: int, *, manifest: str = "",
                    allow_remote: bool = False, folder=None) -> tuple[int, list[str] | None]:
    """(number of classes, class names) from the training shards' manifest label map (or from the class
    folders of ``folder``, a ``--data`` FolderPlan not written yet).

    ``num_classes`` 0 means "from the data"; a non-zero value that disagrees with the label map is
    refused with both numbers, as are held-out shards written with another label map. Without a
    label map (e.g. ADE20K, or hand-made tars) ``num_classes`` must be given."""
    label_map, manifest = ((folder.label_map, folder.root) if folder is not None
                           else manifest_label_map(train_spec, manifest, allow_remote))
    if label_map is None:
        if num_classes:
            return num_classes, None
        where = f"{manifest} has no label_map (unlabelled shards?)" if manifest else \
            f"there is no manifest.json beside the training shards {train_spec!r}"
        raise ValueError(f"the number of classes is not known: {where}; write the shards with `beit shards write "
                         "--layout imagenet` (class folders) or pass --num_classes")
    names = class_names_of(label_map)
    if num_classes and num_classes != len(names):
        raise ValueError(f"--num_classes {num_classes} (flag or recipe) disagrees with the {len(names)} classes in "
                         f"{manifest} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); set "
                         f"--num_classes 0 (from the data) or {len(names)}")
    if val_spec:
        val_map, val_manifest = manifest_label_map(val_spec, allow_remote=allow_remote)
        if val_map is not None and val_map != label_map:
            raise ValueError(f"the held-out shards' label map ({val_manifest}, {len(val_map)} classes) differs from "
                             f"the training shards' ({manifest}, {len(label_map)} classes): write the held-out split "
                             + ("as class folders and pass them as --val_data" if folder is not None
                                else f"with --label_map {Path(manifest).parent / 'class_index.json'}")
                             + " (or use --val_fraction)")
    return len(names), names


@dataclass
class ClassificationAugmentOptions(AugmentOptions):
    """Fine-tuning's augmentation and evaluation preprocessing (timm's classification transforms)."""
    auto_augment: str = field("rand-m9-mstd0.5-inc1", help="timm RandAugment spec ('' = off)")
    reprob: float = field(0.25, help="random erasing probability")
    crop_pct: float = field(0.875, help="eval: resize to image_size / crop_pct, then centre crop")
    interpolation: str = field("bicubic", help="resize interpolation")


def build_transforms(cfg, is_training: bool):
    """timm's classification transform: RandAugment + random erasing for training (posterize made safe on
    Pillow >= 13, see beit.data.rand_augment), resize + centre crop for evaluation."""
    from timm.data import create_transform

    from beit.data.rand_augment import patch_posterize
    if is_training:
        return patch_posterize(create_transform(
            cfg.image_size, is_training=True, scale=(cfg.crop_scale_min, 1.0), hflip=cfg.hflip,
            color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment or None, interpolation=cfg.interpolation,
            re_prob=cfg.reprob, re_mode="pixel", re_count=1, mean=tuple(cfg.mean), std=tuple(cfg.std)))
    return eval_transform(cfg.image_size, cfg.interpolation, cfg.crop_pct, cfg.mean, cfg.std)


def eval_transform(image_size: int, interpolation: str, crop_pct: float, mean, std):
    """The evaluation preprocessing of a fine-tuned classifier (timm's): resize the shorter side to
    ``floor(image_size / crop_pct)``, centre crop ``image_size``, to [0, 1], normalise. Every scorer of a
    fine-tuned model builds it here (the held-out evaluation, ``beit predict``)."""
    from timm.data import create_transform
    return create_transform(image_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct,
                            mean=tuple(mean), std=tuple(std))


def parse_label(sample: dict, num_classes: int) -> int:
    """The integer label stored as ASCII text under ``cls``; a missing, unreadable or out-of-range label
    is a bad sample (counted by reason and shard, like an undecodable image)."""
    from beit.data.loading.decode import BadSample
    raw = sample.get("cls")
    if raw is None:
        raise BadSample("no_label", f"no 'cls' member in {sample.get('__shard__', '?')}; fine-tuning needs labels")
    try:
        label = int((raw.decode("ascii") if isinstance(raw, (bytes, bytearray)) else str(raw)).strip())
    except (UnicodeDecodeError, ValueError):
        raise BadSample("bad_label",
                        f"cls={bytes(raw)[:20] if isinstance(raw, (bytes, bytearray)) else raw!r}") from None
    if not 0 <= label < num_classes:
        raise BadSample("bad_label", f"label {label} outside 0..{num_classes - 1}")
    return label


class LabelledMap:
    """``map_fn`` for ``build_stream_loader``: (PIL image, sample) -> {"image", "label"}. Picklable.
    (The loader seeds python/numpy/torch per sample, so the augmentation is reproducible.)"""

    def __init__(self, transform, num_classes: int):
        self.transform, self.num_classes = transform, num_classes

    def __call__(self, image, sample: dict) -> dict:
        return {"image": self.transform(image), "label": parse_label(sample, self.num_classes)}


def build_loaders(cfg, accelerator, num_classes: int, *, train_map=None, val_map=None, val_batch_size: int = 0):
    """(train loader, held-out loader or None without --val_shards). The train stream is shuffled and reshuffled
    per epoch; the held-out loader reads every sample once, in order, with a partial last batch. The maps default
    to the classification transforms with labels (``LabelledMap``)."""
    from beit.data.loading.global_order import build_loader_for_order
    from beit.data.loading.heldout import heldout_loader
    from beit.data.pipelines.memory_path import ClassifyBatch, choose_loader
    from beit.data.storage.shardspec import expand_shards
    custom = train_map is not None
    transform = None if custom else build_transforms(cfg, True)
    train_map = train_map or LabelledMap(transform, num_classes)
    val_map = val_map or LabelledMap(build_transforms(cfg, False), num_classes)

    def stream():
        return build_loader_for_order(cfg.data_order, cfg.train_shards, **cfg.shard_source(),
                                      map_fn=train_map, batch_size=cfg.batch_size, num_workers=cfg.loader_workers,
                                      rank=accelerator.process_index, world_size=accelerator.num_processes,
                                      seed=cfg.seed, max_bad_fraction=cfg.max_bad_fraction,
                                      batches_per_epoch=cfg.batches_per_epoch or None,
                                      small_image_size=cfg.image_size,  # counted as data/upscaled
                                      resampled=cfg.resampled, batch_multiple=cfg.grad_accum_steps,
                                      pin_memory=accelerator.device.type == "cuda")
    train = choose_loader(cfg, cfg.train_shards, accelerator, lambda: ClassifyBatch(transform),
                          batch_size=cfg.batch_size, num_classes=num_classes, batch_multiple=cfg.grad_accum_steps,
                          stream=stream, why=f"the {type(train_map).__name__} samples are not cached" if custom else "")
    val = heldout_loader(expand_shards(cfg.val_shards, allow_remote=cfg.allow_remote_shards), val_map, accelerator,
                         batch_size=val_batch_size or cfg.batch_size, num_workers=cfg.loader_workers, seed=cfg.seed,
                         remote_retries=cfg.remote_retries) if cfg.val_shards else None
    return train, val
