"""End to end: real short pretraining runs (``run_pretraining``, what ``beit pretrain`` runs: shard streaming, decoding,
two-view augmentation, masking, the tokenizer, forward/backward, AdamW) on the built-in sample
photos, one per tokenizer kind (random weights of the real architectures) and one from a token cache
of the DALL-E-sized tokenizer; images/s and ``data_wait_fraction`` (share of step time spent waiting
for the loader), both from the run's own metrics.jsonl, medians over the steps after the first."""
from __future__ import annotations

import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from beit.bench.timing import rnd


def _tokenizers(tmp: Path, smoke: bool, input_size: int) -> dict[str, str]:
    """Saved random-weight tokenizers of every kind, for ``input_size`` px views -> {kind: path}."""
    from beit.bench.tokenizer_speed import DALLE_FULL, DALLE_SMOKE
    from beit.tokenizers.dalle import DalleTokenizer
    from beit.tokenizers.dvae import DVAETokenizer
    from beit.tokenizers.kmeans import KMeansTokenizer
    from beit.tokenizers.vqkd import VQKDTokenizer
    torch.manual_seed(0)
    vit = dict(embed_dim=32, depth=1, num_heads=2, n_code=64) if smoke else {}
    toks = {"kmeans": KMeansTokenizer.random(0, vocab_size=64 if smoke else 1024, patch_size=8, input_size=input_size),
            "dalle": DalleTokenizer(DALLE_SMOKE if smoke else DALLE_FULL, input_size=input_size),
            "dvae": DVAETokenizer(vocab_size=64 if smoke else 512, hidden=16 if smoke else 64, input_size=input_size),
            "vqkd": VQKDTokenizer(img_size=2 * input_size, patch_size=16, **vit)}
    return {k: str(t.save(tmp / "tok" / k)) for k, t in toks.items()}


def subset_shards(shards: str, out_dir: Path, n: int, parts: int) -> int:
    """Copy the first ``n`` samples of ``shards`` into ``parts`` tars (round robin), so that each of
    ``parts`` loader workers has a shard of its own."""
    from beit.data.storage.shard_format import add_member, iter_tar_samples
    from beit.data.storage.shardspec import expand_shards

    out_dir.mkdir(parents=True, exist_ok=True)
    tars = [tarfile.open(out_dir / f"bench-{i:06d}.tar", "w") for i in range(parts)]
    count = 0
    try:
        for shard in expand_shards(shards):
            with open(shard, "rb") as f:
                for sample in iter_tar_samples(f):
                    for ext, data in sample.items():
                        if not ext.startswith("__"):
                            add_member(tars[count % parts], f"{sample['__key__']}.{ext}", data)
                    count += 1
                    if count == n:
                        return count
    finally:
        for t in tars:
            t.close()
    return count


def _run(cfg_kw: dict) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    from beit.options.pretrain import PretrainConfig
    from beit.runtime.run_logging import read_metrics
    from beit.training.pretraining import run_pretraining

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    t0 = time.perf_counter()
    try:
        run_pretraining(PretrainConfig(**cfg_kw))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    wall = time.perf_counter() - t0
    recs = [r for r in read_metrics(cfg_kw["output_dir"]) if "samples_per_s" in r]
    timed = recs[1:] or recs  # the first step carries the loader start-up
    return {"img_per_s": rnd(statistics.median(r["samples_per_s"] for r in timed)),
            "data_wait_fraction": rnd(statistics.median(r["data_wait_fraction"] for r in timed)),
            "first_step_data_wait_fraction": rnd(recs[0]["data_wait_fraction"]),
            "wall_s": rnd(wall), "steps": len(recs)}


def run(*, kinds=("kmeans", "dalle", "dvae", "vqkd", "token_cache"), model_size: str = "tiny",
        image_size: int = 224, batch_size: int = 8, steps: int = 6, num_workers: int = 2,
        smoke: bool = False, compile: bool = False) -> dict:
    from beit.data.sample_sets import build_sample_shards
    from beit.tokenizers import load_tokenizer
    from beit.tokenizers.token_cache import write_token_cache
    grid = image_size // 16
    tok_size = grid * 8  # kmeans/dalle/dvae downsample 8x; vqkd (16 px patches) gets image_size
    out = {"model": f"beit_{model_size} {image_size}px", "batch": batch_size, "steps": steps,
           "num_workers": num_workers, "torch_threads": torch.get_num_threads(),
           "note": "images/s and data_wait_fraction: medians over the logged steps after the first"}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        build_sample_shards(tmp / "photos", "photos")
        n_images = batch_size * (steps + 1)  # a small fixed set: every run reads the same images, the cache is quick
        parts = max(1, num_workers)
        if subset_shards(str(tmp / "photos" / "train-*.tar"), tmp / "bench", n_images, parts) < n_images:
            raise ValueError(f"the sample photos have fewer than {n_images} images: lower steps or batch_size")
        shards = str(tmp / "bench")
        paths = _tokenizers(tmp, smoke, tok_size)
        common = dict(model_size=model_size, image_size=image_size, patch_size=16, batch_size=batch_size,
                      total_steps=steps, batches_per_epoch=steps, warmup_steps=1, num_workers=num_workers,
                      shuffle_buffer=batch_size, log_every=1, checkpoint_every=10 ** 9, keep_last=1,
                      report_to="none", seed=0, train_shards=[shards],
                      mixed_precision="no", compile=compile)
        for kind in kinds:
            if kind == "token_cache":
                tok = load_tokenizer("dalle", paths["dalle"])
                t0 = time.perf_counter()
                m = write_token_cache(shards, tmp / "cache", tok, views_per_image=1,
                                      batch_size=batch_size, progress=False, seed=0)
                build = time.perf_counter() - t0
                kw = dict(common, tokenizer="dalle", token_cache=str(tmp / "cache"), train_shards=[])
                res = _run(dict(kw, output_dir=str(tmp / "run_cache")))
                res["cache_build_s_per_img"] = rnd(build / max(1, m["num_samples"]))
                res["tokenizer"] = "dalle (cached tokens)"
            else:
                kw = dict(common, tokenizer=kind, tokenizer_path=paths[kind])
                if kind == "vqkd":
                    kw["image_size"] = image_size  # vqkd reads the 16 px patch grid of its own view
                res = _run(dict(kw, output_dir=str(tmp / f"run_{kind}")))
            out[kind] = res
    return out
