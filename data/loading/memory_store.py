"""Training images decoded once into one uint8 tensor per process, for data that fits in memory.

``decoded_store`` reads the shards in the order given (samples in tar order), decodes every image the way
the stream does (``open_image``: any mode to RGB, EXIF upright, bad samples counted by reason) and keeps
them as ``images`` uint8 [N, 3, H, W] on the training device, each image in the top-left corner of the
largest image's frame (``sizes`` holds each image's own (h, w)). The loader counts as the stream does: the bad
samples once per epoch, conversions and upscaled images per delivered sample. Labels are parsed as the fine-tuning
stream parses them (``parse_label``). The encoded bytes are read first and the store is built only when
the decoded frame fits the budget; otherwise ``decoded_store`` says why and returns None.

Stores are kept per process, keyed by the shard files (path, size, modification time), the label parsing
and the device, so the stages of one ``beit compare`` seed and every epoch reuse them; together they stay
within the largest budget asked for (the least recently used go first).
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass

import torch

from beit.data.loading.data_stats import DataStats
from beit.data.loading.decode import BadSample, open_image
from beit.data.storage.shard_format import iter_tar_samples

_STORES: collections.OrderedDict = collections.OrderedDict()
MIB = 1 << 20


@dataclass
class DecodedStore:
    images: torch.Tensor          # uint8 [N, 3, H, W], on the device
    sizes: torch.Tensor           # long [N, 2]: (h, w) of each image, on the device
    labels: torch.Tensor | None   # long [N] on the device, or None (unlabelled)
    keys: list[str]
    shard_of: list[int]           # index into ``shards`` of each image
    shards: list[str]
    bad: DataStats                # the samples that could not be used, by reason and shard
    converted: list[str | None]   # each image's original mode when it was converted to RGB
    upscaled: list[bool]          # each image's side below the model input (counted as data/upscaled)
    reused: bool = False

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    def describe(self) -> str:
        _, _, h, w = self.images.shape
        return (f"{len(self)} images decoded once into {self.nbytes / MIB:.1f} MiB of uint8 ({h}x{w} frame) on "
                f"{self.images.device}" + (", reused from an earlier run in this process" if self.reused else ""))


def _signature(urls: list[str]) -> tuple:
    sig = []
    for u in urls:
        st = os.stat(u)
        sig.append((os.path.abspath(u), st.st_size, st.st_mtime_ns))
    return tuple(sig)


def _over(need: int, n: int, frame, budget_mb: float) -> str:
    return (f"the decoded set needs {need / MIB:.1f} MiB ({n} images in a {frame[0]}x{frame[1]} frame), above "
            f"--memory_cache_mb {budget_mb:g}")


def decoded_store(urls: list[str], *, num_classes: int, budget_mb: float, device, min_image_size: int = 8,
                  small_image_size: int | None = None) -> tuple[DecodedStore | None, str]:
    """(store, "") or (None, why not). ``num_classes`` > 0 parses and checks each sample's ``cls`` label."""
    from beit.data.storage.shardspec import is_remote
    if any(is_remote(u) for u in urls):
        return None, "remote shards are streamed, not cached"
    budget = int(budget_mb * MIB)
    key = (_signature(urls), num_classes, min_image_size, small_image_size, str(torch.device(device)))
    if key in _STORES:
        store = _STORES[key]
        if store.nbytes > budget:
            return None, _over(store.nbytes, len(store), store.images.shape[2:], budget_mb)
        _STORES.move_to_end(key)
        store.reused = True
        return store, ""
    raw, encoded = [], 0
    for i, url in enumerate(urls):
        with open(url, "rb") as f:
            for s in iter_tar_samples(f):
                raw.append((i, s))
                encoded += sum(len(v) for k, v in s.items() if isinstance(v, bytes))
                if encoded > budget:
                    return None, (f"the shards' encoded images alone exceed --memory_cache_mb {budget_mb:g} "
                                  f"(after {len(raw)} samples)")
    stats, images, labels, keys, shard_of, converted, upscaled = DataStats(), [], [], [], [], [], []
    from beit.data.loading.stream import image_member
    from beit.data.pipelines.labelled import parse_label
    from beit.data.pipelines.transforms import _uint8_tensor
    for i, s in raw:
        shard = urls[i]
        try:
            img, mode = open_image(s[image_member(s)], min_size=min_image_size, lazy_jpeg=False)
            label = parse_label(s, num_classes) if num_classes else -1
        except BadSample as e:
            stats.add_bad(shard, e.reason, key=s["__key__"], detail=e.detail)
            continue
        converted.append(mode)
        upscaled.append(bool(small_image_size) and min(img.size) < small_image_size)
        images.append(_uint8_tensor(img))
        labels.append(label)
        keys.append(s["__key__"])
        shard_of.append(i)
    if not images:
        return None, "no decodable image in the shards"
    h = max(x.shape[1] for x in images)
    w = max(x.shape[2] for x in images)
    need = len(images) * 3 * h * w
    if need > budget:
        return None, _over(need, len(images), (h, w), budget_mb)
    frame = torch.zeros(len(images), 3, h, w, dtype=torch.uint8)
    for j, x in enumerate(images):
        frame[j, :, :x.shape[1], :x.shape[2]] = x
    sizes = torch.tensor([[x.shape[1], x.shape[2]] for x in images], dtype=torch.long)
    store = DecodedStore(frame.to(device), sizes.to(device),
                         torch.tensor(labels, dtype=torch.long).to(device) if num_classes else None,
                         keys, shard_of, list(urls), stats, converted, upscaled)
    while _STORES and sum(s.nbytes for s in _STORES.values()) + need > budget:
        _STORES.popitem(last=False)
    _STORES[key] = store
    return store, ""


def clear_stores() -> None:
    """Forget every store of this process (tests)."""
    _STORES.clear()
