"""What TensorBoard pictures cost in pretraining: the same run with --log_images_every 0, the default and
a 10x denser setting, alternating, in one process.

    beit bench --sections tb_images            # the demo's model and data (launch/demo_pretrain.yaml), CPU
    beit bench --sections tb_images --tb_steps 200 --tb_rounds 3

Every run is a pretraining run (``run_pretraining``) with the demo recipe on the built-in photo shards, TensorBoard on,
only ``log_images_every`` differing. Reported: each setting's median training seconds (the run's
``train_seconds``) and its overhead against "off", and the measured seconds per picture call (masks,
tokens and the k-means reconstruction of 4 images, PNG-encoded into the event file), from which the
overhead at the default follows as call time / (every x median step time): on a busy shared machine the
wall-clock difference of two runs is mostly noise, the timed call is not.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path


def run_once(cfg) -> float:
    from accelerate.state import AcceleratorState, GradientState

    from beit.training.pretraining import run_pretraining

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return float(run_pretraining(cfg)["train_seconds"])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def run(steps: int = 100, rounds: int = 2, work_dir: str = "") -> dict:
    """``rounds`` alternating rounds of (off, default, dense) runs of ``steps`` optimizer steps each."""
    import torch

    from beit.config import load_yaml
    from beit.data.sample_sets import build_sample_shards
    from beit.options.pretrain import PretrainConfig
    from beit.runtime import train_pictures
    from beit.tokenizers.images import shard_image_batches
    from beit.tokenizers.kmeans import KMeansTokenizer

    default_every = PretrainConfig().log_images_every
    root = Path(work_dir or tempfile.mkdtemp(prefix="bench_tb_images_"))
    if not (root / "photos" / "manifest.json").is_file():
        build_sample_shards(root / "photos", "photos")
    train = str(root / "photos" / "train-*.tar")
    if not (root / "kmeans.json").is_file():  # the demo's tokenizer kind and size, fit briefly
        KMeansTokenizer.fit(lambda: shard_image_batches(train, size=64, batch_size=64, max_images=512), epochs=1,
                            seed=0, init_patches=8000, progress=False, vocab_size=256, patch_size=8,
                            input_size=64).save(root / "kmeans")
    base = dataclasses.replace(load_yaml(PretrainConfig, "demo_pretrain"), train_shards=[train], val_shards=[],
                               tokenizer_path=str(root / "kmeans"), total_steps=steps, report_to="tensorboard",
                               checkpoint_every=10 ** 9, keep_last=1, num_workers=1)

    calls: list[float] = []
    original = train_pictures.TrainingPictures.__call__

    def timed(self, *a, **kw):
        t = time.perf_counter()
        try:
            return original(self, *a, **kw)
        finally:
            calls.append(time.perf_counter() - t)

    train_pictures.TrainingPictures.__call__ = timed
    settings = {"off": 0, "default": default_every, "dense": max(1, default_every // 10)}
    seconds: dict[str, list[float]] = {k: [] for k in settings}
    try:
        for r in range(rounds):
            for name, every in settings.items():
                out = root / f"run_{name}_{r}"
                seconds[name].append(run_once(dataclasses.replace(base, log_images_every=every, output_dir=str(out))))
                print(f"round {r + 1}: {name:<8} (every {every:>3}): {seconds[name][-1]:.1f} s", flush=True)
    finally:
        train_pictures.TrainingPictures.__call__ = original
    med = {k: statistics.median(v) for k, v in seconds.items()}
    step_s = med["off"] / steps
    per_call = statistics.median(calls) if calls else float("nan")
    result = {"steps": steps, "rounds": rounds, "default_every": default_every,
              "median_train_seconds": med, "seconds": seconds, "median_step_s": step_s,
              "picture_call_s": per_call, "picture_calls": len(calls),
              "overhead_vs_off": {k: med[k] / med["off"] - 1 for k in ("default", "dense")},
              "default_overhead_from_call_time": per_call / (default_every * step_s),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads()}
    print(f"median training time over {rounds} rounds of {steps} steps: off {med['off']:.1f} s, "
          f"default (every {default_every}) {med['default']:.1f} s ({result['overhead_vs_off']['default']:+.1%}), "
          f"dense (every {settings['dense']}) {med['dense']:.1f} s ({result['overhead_vs_off']['dense']:+.1%})")
    print(f"one picture call {per_call * 1000:.0f} ms (median of {len(calls)}), step {step_s * 1000:.0f} ms: "
          f"overhead at the default every {default_every} steps = {result['default_overhead_from_call_time']:.2%} "
          f"(CPU {result['cpu_capability']}, {result['torch_threads']} threads)")
    return result
