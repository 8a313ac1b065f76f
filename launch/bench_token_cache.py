"""Pretraining images/s with the tokenizer run live vs read from a token cache, in one process.

    python launch/bench_token_cache.py                          # ViT-Ti, 224 px, DALL-E-sized tokenizer, CPU
    python launch/bench_token_cache.py --images 96 --batch_size 16 --model_size small

Both runs are ``beit.pretrain.main`` on the same images, model, seed and batch size (data decoding,
augmentation, masking, forward/backward, AdamW): "live" tokenizes every batch's tokenizer view,
"cached" reads a token cache of the same images written beforehand (its build time is reported
apart: a one-off cost, paid once for many epochs). The tokenizer is a full-size DALL-E dVAE encoder
(n_hid 256, 2 blocks per group, 8192 codes; 112 px -> 14x14 tokens) with random weights: the
official one's FLOPs without the download. images/s = batch size / the median step time from
metrics.jsonl (robust to load spikes on a shared machine; the plain mean is printed too); the first
``--warmup`` steps of each run (loader start-up, allocator warm-up) are not timed.
Data loading runs in the main process (``num_workers 0``), so every cost is on the same cores; the two
modes alternate for ``--rounds`` rounds so a busy shared machine weighs on both alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

def subset_shard(shards: str, out: Path, n: int) -> int:
    """Copy the first ``n`` samples of ``shards`` into one tar (a small, fixed source set)."""
    from beit.data.shard_format import add_member, iter_tar_samples
    from beit.data.shardspec import expand_shards

    count = 0
    with tarfile.open(out, "w") as tar:
        for shard in expand_shards(shards):
            with open(shard, "rb") as f:
                for sample in iter_tar_samples(f):
                    for ext, data in sample.items():
                        if not ext.startswith("__"):
                            add_member(tar, f"{sample['__key__']}.{ext}", data)
                    count += 1
                    if count == n:
                        return count
    return count


def timed_run(cfg_kw: dict, warmup: int) -> list[float]:
    """Seconds of each of one pretraining run's steps after ``warmup``."""
    from accelerate.state import AcceleratorState, GradientState

    import beit.pretrain as pretrain
    from beit.runtime.run_logging import read_metrics

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        pretrain.main([], cfg=pretrain.PretrainConfig(**cfg_kw))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    recs = [r for r in read_metrics(cfg_kw["output_dir"]) if "samples_per_s" in r and r["step"] > warmup]
    return [cfg_kw["batch_size"] / r["samples_per_s"] for r in recs]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="", help="source shards (default: the built-in sample photos)")
    ap.add_argument("--images", type=int, default=40, help="images in the benchmark set (>= batch x steps)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    ap.add_argument("--model_size", default="tiny", help="tiny | small | base | large")
    ap.add_argument("--image_size", type=int, default=224, help="encoder view side (patch 16 -> 14x14 at 224)")
    ap.add_argument("--rounds", type=int, default=2, help="live/cached runs alternate this many times (evens out "
                    "the load of a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from beit.tokenizers.cache import write_token_cache
    from beit.tokenizers.dalle import DalleTokenizer

    steps = args.images // args.batch_size
    if steps <= args.warmup:
        raise SystemExit(f"--images {args.images} gives {steps} batches of {args.batch_size}: need more than "
                         f"--warmup {args.warmup}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        shards = args.shards
        if not shards:
            from beit.data.samples import build_sample_shards
            shards = build_sample_shards(tmp / "photos", "photos")
        n = subset_shard(shards, tmp / "bench-000000.tar", args.images)
        if n < args.images:
            raise SystemExit(f"only {n} images in {args.shards}, --images is {args.images}")
        torch.manual_seed(args.seed)
        tok = DalleTokenizer({"n_hid": 256, "n_blk_per_group": 2, "input_channels": 3, "vocab_size": 8192})
        tok.save(tmp / "dalle_random")
        t0 = time.perf_counter()
        write_token_cache(str(tmp / "bench-000000.tar"), tmp / "cache", tok.freeze(), views_per_image=1,
                          batch_size=args.batch_size, progress=False, seed=args.seed)
        build_s = time.perf_counter() - t0

        common = dict(tokenizer="dalle", tokenizer_path=str(tmp / "dalle_random"), model_size=args.model_size,
                      image_size=args.image_size, patch_size=16, batch_size=args.batch_size, total_steps=steps,
                      batches_per_epoch=steps, warmup_steps=1, num_workers=0, shuffle_buffer=args.batch_size,
                      log_every=1, checkpoint_every=10 ** 9, keep_last=1, tensorboard=False, seed=args.seed)
        modes = {"live": dict(common, data_shards=[str(tmp / "bench-000000.tar")]),
                 "cached": dict(common, token_cache=str(tmp / "cache"))}
        step_s: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.rounds):
            for mode, kw in modes.items():
                step_s[mode] += timed_run(dict(kw, output_dir=str(tmp / f"{mode}{r}")), args.warmup)
        live, cached = (args.batch_size / statistics.median(step_s[m]) for m in modes)
        mean = {m: args.batch_size * len(v) / sum(v) for m, v in step_s.items()}
    result = {"model": f"beit_{args.model_size} {args.image_size}px", "tokenizer": "dalle-size (random, 8192, 14x14)",
              "batch_size": args.batch_size, "timed_steps": (steps - args.warmup) * args.rounds,
              "torch_threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "live_img_per_s": round(live, 2), "cached_img_per_s": round(cached, 2), "speedup": round(cached / live, 2),
              "mean_live_img_per_s": round(mean["live"], 2), "mean_cached_img_per_s": round(mean["cached"], 2),
              "cache_build_s_per_img": round(build_s / args.images, 3),
              "step_s": {m: [round(x, 2) for x in v] for m, v in step_s.items()}}
    print(f"pretraining images/s: live tokenizer {live:.2f}, token cache {cached:.2f} "
          f"({cached / live:.2f}x); cache build {build_s / args.images:.3f} s/img (one-off)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
