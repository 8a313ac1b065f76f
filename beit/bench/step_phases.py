"""Where the milliseconds of a ``beit compare`` step go: the recipe's fine-tune and pretraining stages on the bundled
32 px digits, timed per optimizer step, in this checkout and (``--baseline_python``) in another one, in alternating
rounds of fresh processes; then one cProfile'd run each that splits the step into phases (data, tokenizer,
forward, loss, backward, clip, optimizer, schedule, sync, metrics, progress, the loop itself).

    beit bench --sections step_phases --threads 1
    beit bench --sections step_phases --baseline_python /path/to/old/checkout/.venv/bin/python

The baseline interpreter must import ``beit`` from the other checkout (an editable install there); both run
``step_phases_child.py`` of this checkout, which uses only entry points every recent commit has.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = Path(__file__).with_name("step_phases_child.py")


def _child(python: str, spec: dict) -> dict:
    proc = subprocess.run([python, str(CHILD), json.dumps(spec)], capture_output=True, text=True, timeout=3600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("STEP_PHASES ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{python} {CHILD.name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("STEP_PHASES "):])


def prepare(work: Path) -> dict:
    """The digits shards, a seeded 10% label subset (as compare's seed 0) and a k-means tokenizer fitted on them."""
    from beit.compare import recipe
    from beit.compare.labels import read_labelled, stratified_subset, write_labelled
    from beit.compare.stages import fit_tokenizer
    from beit.data.sample_sets import build_sample_shards
    build_sample_shards(work / "digits", "digits")
    train = str(work / "digits" / "train-*.tar")
    subset, _ = stratified_subset(read_labelled(train, "train_shards"), 0.1, 0)
    labels = write_labelled(subset, work / "labels", "train", {}, "bench:step_phases", 0)
    tok = fit_tokenizer(train, work / "tokenizer", 0, dict(recipe.MODEL), {})
    return {"unlabelled": train, "labels": labels, "n_labels": len(subset), "test": str(work / "digits" / "test-*.tar"),
            "tokenizer": tok["path"]}


def run(steps: int = 300, rounds: int = 2, baseline_python: str = "", work_dir: str = "") -> dict:
    import torch

    from beit.runtime.precision import cpu_capability
    work = Path(work_dir or tempfile.mkdtemp(prefix="bench_steps_"))
    data = prepare(work)
    pythons = {"this": sys.executable, **({"baseline": baseline_python} if baseline_python else {})}
    out: dict = {"note": "ms per optimizer step of the engine's epoch loop (data loading included: num_workers 0), "
                         "median of alternating rounds of fresh 1-thread processes; phases from one cProfile'd run "
                         "(the profiler inflates Python work)", "cpu_capability": cpu_capability(),
                 "torch_threads": 1, "steps": steps, "torch": torch.__version__}
    for stage in ("finetune", "pretrain"):
        spec = {"stage": stage, "steps": steps, "labels": data["n_labels"], "test": data["test"],
                "train": data["labels"] if stage == "finetune" else data["unlabelled"], "tokenizer": data["tokenizer"]}
        times: dict[str, list[float]] = {k: [] for k in pythons}
        for r in range(rounds):
            for name, py in pythons.items():
                res = _child(py, {**spec, "profile": False, "out": str(work / f"{stage}_{name}_{r}")})
                times[name].append(res["ms_per_step"])
        row = {name: {"ms_per_step": round(statistics.median(v), 2), "rounds": [round(x, 2) for x in v]}
               for name, v in times.items()}
        for name, py in pythons.items():
            res = _child(py, {**spec, "profile": True, "out": str(work / f"{stage}_{name}_profiled")})
            row[name]["profiled_ms_per_step"] = {k: round(v, 2) for k, v in res["profiled_ms_per_step"].items()}
            row[name]["beit"] = res["beit"]
        if "baseline" in row:
            row["speedup"] = round(row["baseline"]["ms_per_step"] / row["this"]["ms_per_step"], 3)
        out[stage] = row
    return out
