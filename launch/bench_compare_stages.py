"""Images/s and data waiting of every ``beit compare`` stage, this checkout beside another one, in one run.

    python launch/bench_compare_stages.py --other /path/to/other/checkout --out /tmp/bench_stages

Runs the same ``beit compare`` command (the bundled digits, label fraction 0.1, seed 0, the default recipe
with fewer epochs: ``--pretrain_epochs``, ``--finetune_epochs``) with each checkout's own Python
(``<checkout>/.venv/bin/python``), alternating the checkouts over ``--rounds``, and reads each stage's own
metrics: images/s from the logged records (first to last, so start-up and the final evaluation are left out)
and the mean ``data_wait_fraction`` of those records. Prints one table per round and the median ratios
(this / other), with the CPU capability and the load average at the start and end of every run; writes the
figures as JSON to ``<out>/bench_stages.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
STAGES = {"pretrain": 64, "finetune_beit": 16, "finetune_scratch": 16, "linear_probe": 16}  # stage: batch


def stage_figures(run_dir: Path, batch: int) -> dict:
    """img/s and mean data_wait_fraction from a stage's metrics.jsonl (records that carry both)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if "pretrain" in run_dir.name:
        recs = [r for r in recs if "loss" in r and "data_wait_fraction" in r]
    else:  # fine-tuning: the per-epoch records
        recs = [r for r in recs if "train_loss" in r and "data_wait_fraction" in r]
    if len(recs) < 2:
        raise RuntimeError(f"{run_dir}: fewer than two timed records; run more epochs")
    steps = recs[-1]["step"] - recs[0]["step"]
    seconds = recs[-1]["time"] - recs[0]["time"]
    return {"img_per_s": round(steps * batch / seconds, 1), "steps": steps, "seconds": round(seconds, 2),
            "data_wait_fraction": round(statistics.mean(r["data_wait_fraction"] for r in recs[1:]), 4)}


def run_compare(checkout: Path, data: Path, out: Path, args) -> dict:
    python = checkout / ".venv" / "bin" / "python"
    cmd = [str(python), "-m", "beit.compare.run", "--train_shards", str(data / "train-*.tar"),
           "--test_shards", str(data / "test-*.tar"), "--label_fraction", "0.1", "--seeds", "0",
           "--methods", "beit,scratch,linear_probe", "--threads", str(args.threads), "--output_dir", str(out),
           "--pretrain", json.dumps({"epochs": args.pretrain_epochs, "log_every": 10}),
           "--finetune", json.dumps({"epochs": args.finetune_epochs}),
           "--linear_probe", json.dumps({"epochs": args.finetune_epochs})]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH="")
    load0 = os.getloadavg()[0]
    t = time.time()
    r = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{checkout}: beit compare failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    res = {"wall_s": round(time.time() - t, 1), "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
           "stages": {s: stage_figures(out / "seed0" / s, b) for s, b in STAGES.items()}}
    res["stage_seconds"] = json.loads((out / "compare.json").read_text())["per_seed"][0]["seconds"]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", required=True, help="the other checkout (with its own .venv), e.g. the base commit")
    p.add_argument("--out", default="/tmp/bench_stages", help="work folder")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pretrain_epochs", type=int, default=8)
    p.add_argument("--finetune_epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from beit.data.sample_sets import build_sample_shards
    from beit.runtime.precision import cpu_capability, cpu_model
    out = Path(args.out)
    data = out / "digits"
    if not (data / "manifest.json").is_file():
        build_sample_shards(data, "digits")
    checkouts = {"this": HERE, "other": Path(args.other).resolve()}
    commits = {k: subprocess.run(["git", "-C", str(v), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() for k, v in checkouts.items()}
    print(f"cpu: {cpu_model()}, capability {cpu_capability()}, {os.cpu_count()} cores, {args.threads} thread(s); "
          f"load {os.getloadavg()}; this {commits['this']} vs other {commits['other']}", flush=True)
    rounds = []
    for i in range(args.rounds):
        order = ["other", "this"] if i % 2 == 0 else ["this", "other"]
        got = {}
        for name in order:
            got[name] = run_compare(checkouts[name], data, out / f"round{i}_{name}", args)
            print(f"round {i} {name}: {got[name]['wall_s']} s, load {got[name]['load']}", flush=True)
        rounds.append(got)
        print(f"{'stage':18} {'other img/s':>12} {'this img/s':>11} {'ratio':>6} {'wait other':>11} {'wait this':>10}")
        for s in STAGES:
            o, n = got["other"]["stages"][s], got["this"]["stages"][s]
            print(f"{s:18} {o['img_per_s']:12.1f} {n['img_per_s']:11.1f} {n['img_per_s'] / o['img_per_s']:6.2f} "
                  f"{o['data_wait_fraction']:11.3f} {n['data_wait_fraction']:10.3f}", flush=True)
    summary = {s: {"ratio_median": round(statistics.median(r["this"]["stages"][s]["img_per_s"]
                                                           / r["other"]["stages"][s]["img_per_s"] for r in rounds), 2),
                   "data_wait_this_max": max(r["this"]["stages"][s]["data_wait_fraction"] for r in rounds),
                   "data_wait_other_max": max(r["other"]["stages"][s]["data_wait_fraction"] for r in rounds)}
               for s in STAGES}
    print("median ratio this/other: " + ", ".join(f"{s} {v['ratio_median']}x" for s, v in summary.items()))
    print(f"load at the end {os.getloadavg()}")
    result = {"machine": {"cpu": cpu_model(), "cpu_capability": cpu_capability(), "cores": os.cpu_count(),
                          "threads": args.threads}, "commits": commits, "args": vars(args), "rounds": rounds,
              "summary": summary}
    (out / "bench_stages.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
