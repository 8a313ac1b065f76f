"""Token cache: tokenize K augmented views per image once, so pretraining can skip the tokenizer
(``beit tokenizer cache``, beit.tokenizers.cache, writes one).

Each output sample holds the source image bytes (unchanged, same extension), ``views.json``
(``{"size": [W, H], "boxes": [[x0, y0, x1, y1] * K], "flips": [0/1 * K]}``, boxes in source
pixels) and ``tokens.npy`` (``uint16``/``int32`` [K, h, w], ``np.load(allow_pickle=False)``).
``manifest.json`` beside the shards has the data helper's fields plus ``token_cache`` (tokenizer
kind, vocab_size, grid_size, views_per_image, crop parameters). Boxes come from timm's
``RandomResizedCropAndInterpolation.get_params`` (scale 0.08-1, ratio 3/4-4/3), seeded per
(seed, key, view). Tokens are computed on the un-jittered tokenizer view: colour jitter, if any,
is applied by the reader to the encoder view only.

Reader: ``CachedViews(image_size=...)`` is a ``map_fn(pil_image, sample)`` for
``beit.data.loading.stream.build_stream_loader``; it picks one of the K views at random and returns
``{"images": [3, S, S] normalised, "tokens": LongTensor [h, w]}``. ``read_cache_info(dir)`` and
``check_cache_compatible`` validate a cache against the model before training starts.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from beit.data.loading.decode import BadSample
from beit.data.pipelines.transforms import INTERPOLATIONS, pil_to_tensor
from beit.data.storage.remote import RETRIES
from beit.data.storage.shard_format import MANIFEST_NAME, add_member, sha256_file, write_json_atomic
from beit.data.storage.shardspec import expand_shards
from beit.tokenizers import VisualTokenizer
from beit.tokenizers.images import ShardReadStats, iter_shard_samples


def sample_box(img: Image.Image, scale, ratio, seed_key: str) -> tuple[int, int, int, int]:
    """timm's random-resized-crop box (x0, y0, x1, y1), seeded by ``seed_key`` (global RNG untouched)."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    state = random.getstate()
    random.seed(seed_key)
    try:
        top, left, h, w = RandomResizedCropAndInterpolation.get_params(img, tuple(scale), tuple(ratio))
    finally:
        random.setstate(state)
    return int(left), int(top), int(left + w), int(top + h)


def crop_view(img: Image.Image, box, size: int, interpolation: str, flip: bool) -> torch.Tensor:
    """The box of ``img`` resized to size x size, maybe flipped: float [3, size, size] in [0, 1]."""
    t = pil_to_tensor(img.resize((size, size), INTERPOLATIONS[interpolation], box=tuple(box)))
    return t.flip(-1) if flip else t


def _encode_tokens(tokens: np.ndarray, vocab_size: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tokens.astype(np.uint16 if vocab_size <= 65536 else np.int32), allow_pickle=False)
    return buf.getvalue()


class _CacheShardWriter:
    """Writes ``<prefix>-NNNNNN.tar`` shards of at most ``per_shard`` samples (temp name, then rename)."""

    def __init__(self, out: Path, per_shard: int, prefix: str = "cache"):
        self.out, self.per_shard, self.prefix = out, per_shard, prefix
        self.tar: Optional[tarfile.TarFile] = None
        self.count, self.index, self.shards = 0, 0, []

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if self.tar is None:
            self.path = self.out / f"{self.prefix}-{self.index:06d}.tar"
            self.tmp = self.path.with_name(self.path.name + ".tmp")
            self.tar = tarfile.open(self.tmp, "w")
        for ext, data in members:
            add_member(self.tar, f"{key}.{ext}", data)
        self.count += 1
        if self.count == self.per_shard:
            self.close()

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.tmp.replace(self.path)
        self.shards.append({"name": self.path.name, "samples": self.count, "bytes": self.path.stat().st_size,
                            "sha256": sha256_file(self.path)})
        self.tar, self.count, self.index = None, 0, self.index + 1


def write_token_cache(shards, out_dir, tok: VisualTokenizer, *, views_per_image: int = 4,
                      scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, seed: int = 0,
                      batch_size: int = 64, samples_per_shard: int = 1000, progress: bool = True,
                      tokenizer_path: Optional[str] = None, max_bad_fraction: float = 0.01,
                      allow_remote: bool = False, remote_retries: int = RETRIES) -> dict[str, Any]:
    """Tokenize ``views_per_image`` random views of every image of ``shards`` (paths; http(s) URLs and ``pipe:``
    with ``allow_remote``) into cache shards; returns the manifest."""
    from tqdm.auto import tqdm

    if views_per_image < 1:
        raise ValueError("views_per_image must be >= 1")
    paths = expand_shards(shards, allow_remote=allow_remote)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = _CacheShardWriter(out, samples_per_shard)
    stats = ShardReadStats()
    pending: list[tuple[str, list[tuple[str, bytes]], dict]] = []
    views: list[torch.Tensor] = []

    def flush() -> None:
        if not pending:
            return
        tokens = torch.cat([tok.tokenize(v) for v in torch.stack(views).split(batch_size)]).cpu().numpy()
        for i, (key, members, meta) in enumerate(pending):
            k = views_per_image
            members = members + [("views.json", json.dumps(meta).encode()),
                                 ("tokens.npy", _encode_tokens(tokens[i * k:(i + 1) * k], tok.vocab_size))]
            writer.add(key, members)
        pending.clear()
        views.clear()

    bar = tqdm(desc="token cache", unit="img", disable=not progress)
    t0 = time.time()
    for sample, ext, img in iter_shard_samples(paths, stats, remote_retries):
        key = sample["__key__"]
        boxes, flips = [], []
        for k in range(views_per_image):
            box = sample_box(img, scale, ratio, f"{seed}/{key}/{k}")
            flip = random.Random(f"flip/{seed}/{key}/{k}").random() < hflip
            boxes.append(list(box))
            flips.append(int(flip))
            views.append(crop_view(img, box, tok.input_size, tok.interpolation, flip))
        extra = [(e, sample[e]) for e in ("cls",) if e in sample]
        pending.append((key, [(ext, sample[ext])] + extra,
                        {"size": list(img.size), "boxes": boxes, "flips": flips}))
        if len(views) >= batch_size:
            flush()
        bar.update(1)
    flush()
    writer.close()
    bar.close()
    total = stats.samples + stats.num_bad
    if total and stats.num_bad / total > max_bad_fraction:
        raise RuntimeError(f"{stats.num_bad} of {total} source samples were bad ({stats.bad}); worst shards "
                           f"{sorted(stats.bad_by_shard.items(), key=lambda kv: -kv[1])[:3]}")
    manifest = {"shards": writer.shards, "num_samples": stats.samples, "label_map": None,
                "source": f"beit.tokenizers.cache:{len(paths)} shard(s) from {paths[0]}",
                "options": {"seed": seed, "samples_per_shard": samples_per_shard},
                "bad_samples": stats.bad,
                "token_cache": {"tokenizer": tok.kind, "tokenizer_path": tokenizer_path,
                                "tokenizer_config": tok.get_config(), "vocab_size": tok.vocab_size,
                                "grid_size": list(tok.grid_size), "tokenizer_input_size": tok.input_size,
                                "interpolation": tok.interpolation, "views_per_image": views_per_image,
                                "scale": list(scale), "ratio": list(ratio), "hflip": hflip,
                                "compute_dtype": str(tok.compute_dtype).removeprefix("torch."),
                                "seconds": round(time.time() - t0, 1)}}
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


# ---- reading --------------------------------------------------------------------------------------
def read_cache_info(cache_dir: str | Path) -> dict[str, Any]:
    """The ``token_cache`` block of a cache's manifest (raises if the folder is not a token cache)."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build a token cache with `python -m beit.tokenizers.cache`")
    info = json.loads(path.read_text()).get("token_cache")
    if not info:
        raise ValueError(f"{path} describes ordinary shards, not a token cache (no 'token_cache' entry)")
    return info


def check_cache_compatible(info: dict[str, Any], vocab_size: int, grid_size) -> None:
    """Refuse a cache whose tokens do not fit the model (vocab, patch grid)."""
    if int(info["vocab_size"]) != int(vocab_size):
        raise ValueError(f"token cache vocab_size {info['vocab_size']} != model vocab_size {vocab_size}")
    if list(info["grid_size"]) != list(grid_size):
        raise ValueError(f"token cache grid {tuple(info['grid_size'])} != model patch grid {tuple(grid_size)}; "
                         "rebuild the cache with a tokenizer whose grid equals image_size / patch_size")


def _member(sample: dict, name: str) -> Any:
    if name not in sample:
        raise BadSample("not_a_token_cache_sample", f"sample {sample.get('__key__')} has no {name}")
    return sample[name]


class CachedViews:
    """``map_fn(pil_image, sample) -> {"images": uint8 [3,S,S], "tokens": Long[h,w]}`` for cache shards.

    Picks one of the stored views with ``random`` (seed it per worker/sample as the stream does),
    resizes its box of the source image to ``image_size`` (bicubic), applies colour jitter and flips
    as stored, with the same kernels as ``TwoViewTransform``. The view stays uint8, like the live
    path's; the pretraining loop normalises it on the device (``encoder_input``).
    """

    def __init__(self, image_size: int = 224, interpolation: str = "bicubic", color_jitter: float = 0.4):
        from beit.data.pipelines.transforms import TwoViewTransform

        self.image_size = int(image_size)
        self.views = TwoViewTransform(image_size=image_size, tokenizer_size=image_size, interpolation=interpolation,
                                      color_jitter=color_jitter)

    def __call__(self, img: Image.Image, sample: dict) -> dict[str, torch.Tensor]:
        meta = _member(sample, "views.json")
        meta = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
        tokens = _member(sample, "tokens.npy")
        tokens = np.load(io.BytesIO(tokens), allow_pickle=False) if isinstance(tokens, bytes) else np.asarray(tokens)
        if list(img.size) != list(meta["size"]):
            raise BadSample("cache_mismatch", f"image is {img.size}, cache recorded {meta['size']}")
        k = random.randrange(len(meta["boxes"]))
        box = tuple(int(v) for v in meta["boxes"][k])
        view = self.views.resize_view(img, box, self.image_size, self.views.interp)
        if self.views.jitter is not None:
            view = self.views.jitter_views([view])[0]
        if meta["flips"][k]:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = torch.from_numpy(np.array(view)).permute(2, 0, 1)
        return {"images": image, "tokens": torch.from_numpy(tokens[k].astype(np.int64))}


def token_cache_fingerprint(cache_dir: str | Path) -> str:
    """Hash of a token cache's tokenizer settings, views and shard contents (its folder may move)."""
    import hashlib
    manifest = json.loads((Path(cache_dir) / MANIFEST_NAME).read_text())
    info = {k: v for k, v in manifest["token_cache"].items() if k not in ("seconds", "tokenizer_path")}
    shards = [(s["name"], s["sha256"]) for s in manifest["shards"]]
    return hashlib.sha256(json.dumps([info, shards, manifest.get("options")], sort_keys=True).encode()).hexdigest()[:16]
