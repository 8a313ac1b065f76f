"""One stage of the ``beit compare`` recipe timed phase by phase: run as a script by ``beit bench --sections
step_phases`` under this checkout's Python or a baseline's (any commit with the same entry points), so it imports
only what both have. Prints one JSON line: ms per optimizer step of the engine's epoch loop, and, with profile,
where they go (cProfile: Python work is inflated by the profiler, so the profiled total is higher).

    python beit/bench/step_phases_child.py '{"stage": "finetune", "work": "...", "steps": 300, "profile": false}'
"""
import cProfile
import json
import math
import pstats
import sys
import time
from pathlib import Path

# (phase, file name part, function name) of the epoch loop's direct callees; the rest of the loop is "loop"
PHASES = [("data", "data_wait.py", "__iter__"), ("tokenizer", "pretrain.py", "batch_tokens"),
          ("forward", "module.py", "_wrapped_call_impl"), ("loss", "functional.py", "cross_entropy"),
          ("backward", "accelerator.py", "backward"), ("clip", "accelerator.py", "clip_grad_norm_"),
          ("clip", "step_work.py", "clip"), ("optimizer", "optimizer.py", "step"),
          ("optimizer", "step_work.py", "step"), ("optimizer", "optimizer.py", "zero_grad"),
          ("optimizer", "step_work.py", "zero_grad"), ("schedule", "schedules.py", "step"),
          ("sync", "accelerator.py", "reduce"), ("sync", "pretrain.py", "all_ranks_true"),
          ("sync", "", "<method 'tolist' of 'torch._C.TensorBase' objects>"),
          ("metrics", "pretrain.py", "update"), ("metrics", "pretrain.py", "reduce"),
          ("metrics", "finetuning.py", "on_step"), ("metrics", "run_logging.py", "log"),
          ("progress", "run_logging.py", "update"), ("progress", "run_logging.py", "set_postfix")]


def phase_of(func: tuple) -> str:
    path, _, name = func
    for phase, part, fn in PHASES:
        if name == fn and part in path:
            return phase
    return "loop"


def main(spec: dict) -> dict:
    import torch
    torch.set_num_threads(1)
    from beit.compare import recipe
    if spec["stage"] == "finetune":
        import beit.engines.finetune as engine
        from beit.compare.stages import finetune_model_args
        from beit.options.finetune import FinetuneConfig
        from beit.training.finetuning import run_finetuning
        steps_per_epoch = spec["labels"] // recipe.FINETUNE["batch_size"]
        args = {**recipe.FINETUNE, **recipe.SCRATCH, "epochs": math.ceil(spec["steps"] / steps_per_epoch),
                "report_to": "none"}  # as beit compare's stages run by default
        cfg = FinetuneConfig(train_shards=spec["train"], val_shards=spec["test"], output_dir=spec["out"], seed=0,
                             init="", resume=False, **finetune_model_args(dict(recipe.MODEL)), **args)
        cfg.validate()
        run = lambda: run_finetuning(cfg)  # noqa: E731
    else:
        import beit.engines.pretrain as engine
        from beit.config import parse_config
        from beit.options.pretrain import PretrainConfig
        from beit.training.pretraining import run_pretraining
        argv = ["--train_shards", spec["train"], "--tokenizer", "kmeans", "--tokenizer_path", spec["tokenizer"],
                "--output_dir", spec["out"], "--seed", "0", "--total_steps", str(spec["steps"]), "--report_to", "none"]
        for k, v in {**recipe.MODEL, **recipe.PRETRAIN}.items():
            if k != "epochs":
                argv += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
        cfg = parse_config(PretrainConfig, argv)
        run = lambda: run_pretraining(cfg)  # noqa: E731
    loop = engine.train_one_epoch
    spent = {"seconds": 0.0, "calls": 0}

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return loop(*a, **k)
        finally:
            spent["seconds"] += time.perf_counter() - t0
    engine.train_one_epoch = timed
    prof = cProfile.Profile() if spec["profile"] else None
    if prof:
        prof.enable()
    run()
    if prof:
        prof.disable()
    steps = spec["steps"] if spec["stage"] == "pretrain" else args["epochs"] * steps_per_epoch
    out = {"stage": spec["stage"], "steps": steps, "ms_per_step": 1000 * spent["seconds"] / steps,
           "beit": str(Path(engine.__file__).parents[2])}
    if prof:
        phases: dict[str, float] = {}
        for func, (_, _, _, _, callers) in pstats.Stats(prof).stats.items():
            for caller, stats in callers.items():
                if caller[2] == "train_one_epoch" and caller[0] == loop.__code__.co_filename:
                    phases[phase_of(func)] = phases.get(phase_of(func), 0.0) + stats[3]
        loop_total = sum(v[3] for f, v in pstats.Stats(prof).stats.items()
                         if f[2] == "train_one_epoch" and f[0] == loop.__code__.co_filename)
        phases["loop"] = loop_total - sum(v for k, v in phases.items() if k != "loop")
        out["profiled_ms_per_step"] = {k: 1000 * v / steps for k, v in sorted(phases.items())}
    return out


if __name__ == "__main__":
    print("STEP_PHASES " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
