"""Images/s of the pretraining input path with and without the token cache, in one run.

    python -m beit.tokenizers.bench_cache --shards 'data/photos/train-*.tar' --tokenizer dalle_random

Path "live": decode -> TwoViewTransform (encoder + tokenizer view) -> tokenizer.tokenize (batched).
Path "cached": decode a cache sample -> CachedViews (encoder view) -> stored tokens.
``dalle_random`` is a full-size DALL-E encoder (n_hid 256, 2 blocks/group, 8192 codes) with random
weights: the same FLOPs as the official one, so the timing is honest without the download.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from beit.config import field, parse_config
from beit.data.shardspec import expand_shards


@dataclass
class BenchCacheConfig:
    shards: str = field("", help="source shards")
    tokenizer: str = field("dalle_random", help="dalle_random, or a kind for load_tokenizer")
    tokenizer_path: Optional[str] = field(None, help="path for load_tokenizer kinds")
    image_size: int = field(224, help="encoder view size")
    num_images: int = field(64, help="images timed per path")
    batch_size: int = field(16, help="tokenizer batch")
    device: str = field("cpu", help="tokenizer device")


def _tokenizer(cfg: BenchCacheConfig):
    if cfg.tokenizer == "dalle_random":
        from beit.tokenizers.dalle import DalleTokenizer
        return DalleTokenizer({"n_hid": 256, "n_blk_per_group": 2, "input_channels": 3, "vocab_size": 8192})
    from beit.tokenizers import load_tokenizer
    return load_tokenizer(cfg.tokenizer, cfg.tokenizer_path)


def run(cfg: BenchCacheConfig) -> dict:
    from beit.data.transforms import TwoViewTransform
    from beit.tokenizers.cache import CachedViews, write_token_cache
    from beit.tokenizers.images import ShardReadStats, iter_shard_images

    tok = _tokenizer(cfg).to(cfg.device)
    paths = expand_shards(cfg.shards)
    imgs = []
    for _, img in iter_shard_images(paths, ShardReadStats()):
        imgs.append(img)
        if len(imgs) == cfg.num_images:
            break
    two = TwoViewTransform(image_size=cfg.image_size, tokenizer_size=tok.input_size,
                           tokenizer_interpolation=tok.interpolation)
    t0 = time.perf_counter()
    tviews = []
    for img in imgs:
        _, tv = two(img.copy())
        tviews.append(tv)
    for b in torch.stack(tviews).split(cfg.batch_size):
        tok.tokenize(b.to(cfg.device))
    live = len(imgs) / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as d:
        # Build a cache of these shards' first images (timed separately: a one-off cost).
        src = Path(d) / "src"
        t1 = time.perf_counter()
        m = write_token_cache(paths[:1], src, tok, views_per_image=1, progress=False, batch_size=cfg.batch_size)
        build_s = time.perf_counter() - t1
        from beit.data.decode import load_pixels, open_image, to_rgb
        from beit.data.shard_format import image_ext, iter_tar_samples
        reader = CachedViews(image_size=cfg.image_size)
        samples = []
        with open(src / m["shards"][0]["name"], "rb") as f:
            for s in iter_tar_samples(f):
                samples.append(s)
        samples = (samples * (cfg.num_images // max(1, len(samples)) + 1))[:cfg.num_images]
        t2 = time.perf_counter()
        for s in samples:
            img, _ = open_image(s[image_ext(s)])
            load_pixels(img)
            reader(to_rgb(img)[0], s)
        cached = len(samples) / (time.perf_counter() - t2)
    return {"tokenizer": cfg.tokenizer, "live_img_per_s": round(live, 2), "cached_img_per_s": round(cached, 2),
            "speedup": round(cached / live, 1), "cache_build_s_per_img": round(build_s / m["num_samples"], 3),
            "images": len(imgs), "device": cfg.device}


def main(argv=None) -> int:
    cfg = parse_config(BenchCacheConfig, argv, description=__doc__)
    print(run(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
