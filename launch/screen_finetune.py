"""Screen fine-tune recipe changes off the pretrained encoders of a finished ``beit compare`` run.

    python launch/evidence.py --out runs/dev_digits --dev --seeds 0 --methods beit,logreg_pixels
    python launch/screen_finetune.py --run runs/dev_digits --variants '{epochs: 200}' '{layer_decay: 0.65}'

Every variant is the run's fine-tune recipe with the given overrides, trained on each seed's label
subset from that seed's pretrained encoder and scored on the run's scored set (on a ``--dev`` run: the
validation split carved from the training images, never the test split). ``--scratch`` screens the
same-recipe scratch model instead (no init, no layer decay). Each variant is a cached stage under
``<run>/seed<N>/screen/``; the table goes to stdout and ``<run>/screen.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread per process


def _name(variant: dict, scratch: bool) -> str:
    body = ",".join(f"{k}={v}" for k, v in sorted(variant.items())) or "baseline"
    return ("scratch:" if scratch else "") + body


def _one(args: tuple) -> tuple[str, int, dict]:
    import torch
    torch.set_num_threads(1)
    from beit.compare import stages
    name, seed, run, model, recipe_args, init, test = args
    out = Path(run) / f"seed{seed}" / "screen" / name.replace("/", "_").replace(":", "_")
    res = stages.finetune(str(Path(run) / f"seed{seed}" / "labels" / "train-*.tar"), test, out, seed,
                          model, recipe_args, init=init)
    return name, seed, res


def main(argv: list[str] | None = None) -> int:
    import yaml

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="output folder of a finished beit compare / evidence run")
    p.add_argument("--variants", nargs="+", default=["{}"], help="YAML dicts of fine-tune overrides ({} = the run's "
                                                                 "recipe)")
    p.add_argument("--scratch", action="store_true", help="screen the same-recipe scratch model instead of BEiT")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="fine-tunes at once, one process each")
    args = p.parse_args(argv)
    from beit.compare import recipe
    results = Path(args.run) / "compare.json"
    if not results.is_file():
        raise FileNotFoundError(f"--run {args.run}: no compare.json there; give the --out / --output_dir of a finished "
                                "launch/evidence.py or beit compare run")
    done = json.loads(results.read_text())
    cfg, model = done["config"], done["recipe"]["model"]
    shared = {**recipe.FINETUNE, **cfg["finetune"], **(recipe.SCRATCH if args.scratch else {})}
    jobs = []
    for text in ["{}"] + [v for v in args.variants if v.strip() != "{}"]:
        variant = yaml.safe_load(text) or {}
        if not isinstance(variant, dict):
            raise ValueError(f"--variants: {text!r} is not a YAML dict such as '{{epochs: 200}}'")
        name = _name(variant, args.scratch)
        for seed in cfg["seeds"]:
            init = "" if args.scratch else str(Path(args.run) / f"seed{seed}" / "pretrain" / "pretrained.safetensors")
            if init and not Path(init).is_file():
                raise FileNotFoundError(f"{init}: the run has no pretrained encoder for seed {seed} (run it with "
                                        "method beit)")
            jobs.append((name, seed, args.run, model, {**shared, **variant}, init, cfg["test_shards"]))
    if args.jobs > 1:
        from beit.compare.run import job_pool
        with job_pool(args.jobs) as pool:
            results = list(pool.map(_one, jobs))
    else:
        results = [_one(j) for j in jobs]
    table: dict[str, dict[int, dict]] = {}
    for name, seed, res in results:
        table.setdefault(name, {})[seed] = res
    base_name = _name({}, args.scratch)
    base_mean = statistics.mean(r["top1"] for r in table[base_name].values())
    print(f"\n{'variant':48s} top-1 mean  vs base  per seed (final train loss)")
    for name, per in table.items():
        mean = statistics.mean(r["top1"] for r in per.values())
        seeds = "  ".join(f"{r['top1']:.1f} ({r['train_loss']:.3f})" for _, r in sorted(per.items()))
        print(f"{name:48s} {mean:9.2f}  {mean - base_mean:+6.2f}  {seeds}")
    path = Path(args.run) / "screen.json"  # every variant screened in this run folder so far
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved.update({n: {str(s): r for s, r in per.items()} for n, per in table.items()})
    path.write_text(json.dumps(saved, indent=1))
    return 0


if __name__ == "__main__":
    from beit.cli import call
    sys.exit(call(main))
