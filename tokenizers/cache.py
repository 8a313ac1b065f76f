"""``beit tokenizer cache`` / ``python -m beit.tokenizers.cache``: pre-tokenise shards into a token cache.

    python -m beit.tokenizers.cache --train_shards 'data/train-*.tar' --out data/token_cache \\
        --tokenizer dalle --tokenizer_path weights/dalle --views_per_image 8

K augmented views per image are tokenized once, so pretraining (``--token_cache``) skips the tokenizer;
the format and its reader are in beit.tokenizers.token_cache.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from beit.config import field, parse_config
from beit.data.pipelines.transforms import CropOptions
from beit.options.common import TokenizerOptions, TrainDataOptions
from beit.tokenizers import load_tokenizer
from beit.tokenizers.token_cache import write_token_cache


@dataclass
class TokenCacheConfig(TokenizerOptions, CropOptions, TrainDataOptions):
    DEPRECATED = {"scale_min": "crop_scale_min"}  # one name for the crop's minimum area everywhere
    out: str = field("data/token_cache", help="output folder for cache-*.tar + manifest.json")
    views_per_image: int = field(4, help="augmented views (crop box + flip) stored per image")
    hflip: float = field(0.5, help="flip probability of a stored view")
    batch_size: int = field(64, help="views per tokenizer call")
    samples_per_shard: int = field(1000, help="images per cache shard")
    seed: int = field(0, help="seed of the boxes and flips")
    model_grid: int = field(0, help="BEiT patch grid side to check the tokenizer against; 0 = no check")
    device: str = field("cpu", help="device for the tokenizer (cpu, cuda)")
    tokenizer_dtype: Literal["fp32", "bf16"] = field("fp32", help="fp32 (exact) | bf16: the tokenizer under bf16 "
                                                     "autocast, faster on GPUs and AMX/AVX-512-BF16 CPUs; a few tokens "
                                                     "differ (agreement: `beit bench`)")

    def validate(self) -> None:
        self.check_choices()
        self.check_train_data()
        if self.views_per_image < 1:
            raise ValueError("--views_per_image must be >= 1")


def main(argv=None) -> int:
    cfg = parse_config(TokenCacheConfig, argv, description=__doc__)
    tok = load_tokenizer(cfg.tokenizer_kind(), cfg.tokenizer_path, trust_pickle=cfg.trust_pickle)
    tok = tok.to(cfg.device).set_compute_dtype(cfg.tokenizer_dtype)
    if cfg.model_grid and tuple(tok.grid_size) != (cfg.model_grid, cfg.model_grid):
        raise SystemExit(f"tokenizer grid {tok.grid_size} != model patch grid {cfg.model_grid}x{cfg.model_grid}")
    if cfg.data:
        from beit.runtime.run_lock import main_print
        found = cfg.folder_shards(labelled=False, log=main_print)
        main_print(f"--data {cfg.data}: {found.describe()}")
        cfg = dataclasses.replace(cfg, train_shards=[found.train])
    m = write_token_cache(cfg.train_shards, cfg.out, tok, views_per_image=cfg.views_per_image,
                          scale=(cfg.crop_scale_min, 1.0), hflip=cfg.hflip, seed=cfg.seed, batch_size=cfg.batch_size,
                          samples_per_shard=cfg.samples_per_shard, tokenizer_path=cfg.tokenizer_path,
                          allow_remote=cfg.allow_remote_shards, remote_retries=cfg.remote_retries)
    print(f"wrote {len(m['shards'])} cache shard(s), {m['num_samples']} images x {cfg.views_per_image} views "
          f"in {m['token_cache']['seconds']}s to {cfg.out} (bad source samples: {m['bad_samples'] or 0})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
