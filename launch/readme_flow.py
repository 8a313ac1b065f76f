"""The README's "Using it on your data" flow at a real size, timed and scored: the commands of its first code
block, run verbatim on a bundled set written as class folders, against logistic regression on the pixels.

    python launch/readme_flow.py --set digits --out /tmp/flow_digits    # the 1,797 digits (tests/ runs this)
    python launch/readme_flow.py --set photos --out /tmp/flow_photos    # the 1,326 crops of the photographs

``my_labelled/`` holds the class folders and ``my_photos`` is the same folder (a link), as when a user's images
are both the unlabelled and the labelled set; the shard cache is ``<out>/cache``. Then the README's Python block
loads the export with timm and scores the held-out images through timm's own data config. Prints and writes
``<out>/flow.json``: seconds per command and in all, the held-out masked-token accuracy beside the majority-token
baseline, the fine-tune's held-out top-1 beside logistic regression on the pixels of the same split (at the
model's input size), timm's top-1, the machine (CPU capability, cores) and its load before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def own_data_section() -> str:
    text = README.read_text()
    start = text.index("## Using it on your data")
    return text[start:text.index("\n## ", start + 1)]


def own_data_commands() -> list[str]:
    """The commands of the section's bash block, each with its continuation lines, as printed."""
    block = re.search(r"```bash\n(.*?)```", own_data_section(), re.S).group(1)
    return [c.strip() for c in re.split(r"(?<!\\)\n", block) if c.strip() and not c.lstrip().startswith("#")]


def own_data_python() -> str:
    """The section's Python block (loading the export with timm)."""
    return re.search(r"```python\n(.*?)```", own_data_section(), re.S).group(1)


def stated_minutes() -> float:
    """The most the section says the three commands take on its 2-core machine ("at most N minutes")."""
    return float(re.search(r"at most (\d+(?:\.\d+)?) minutes", own_data_section()).group(1))


def write_folders(out: Path, kind: str) -> int:
    from beit.data.sample_sets import write_class_folders

    labelled = out / "my_labelled"
    n = write_class_folders(labelled, kind)
    (out / "my_photos").symlink_to("my_labelled", target_is_directory=True)
    return n


def run_commands(out: Path, env: dict) -> list[dict]:
    runs = []
    for i, cmd in enumerate(own_data_commands()):
        t0 = time.time()
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=out, env=env, capture_output=True, text=True)
        log = r.stdout + r.stderr
        (out / f"command{i + 1}.log").write_text(log)
        runs.append({"command": cmd, "seconds": round(time.time() - t0, 1), "returncode": r.returncode})
        print(f"[{runs[-1]['seconds']:.0f} s] {cmd}", flush=True)
        if r.returncode:
            raise SystemExit(f"command {i + 1} failed ({r.returncode}):\n{cmd}\n{log[-4000:]}")
    return runs


def score(out: Path) -> dict:
    """The run's results beside the baselines on the fine-tune's own train / held-out split."""
    import torch
    import yaml

    from beit.compare.baselines import logistic_regression, pixels_of
    from beit.data.storage.shardspec import expand_shards
    from beit.engines.knn import load_views

    pre = json.loads((out / "runs/mine/pretrain/final_metrics.json").read_text())
    ft_dir = out / "runs/mine/finetune"
    final = json.loads((ft_dir / "final.json").read_text())
    cfg = yaml.safe_load((ft_dir / "config.yaml").read_text())
    train = load_views(expand_shards(cfg["train_shards"]), cfg["image_size"])
    held = load_views(expand_shards(cfg["val_shards"]), cfg["image_size"])
    pixels = logistic_regression(pixels_of(train[0]), train[1].numpy(), pixels_of(held[0]), held[1].numpy())

    cwd = os.getcwd()
    os.chdir(out)  # the README's Python block uses paths relative to where the commands ran
    try:
        scope: dict = {}
        exec(own_data_python(), scope)  # noqa: S102 - the README's own block, verbatim
    finally:
        os.chdir(cwd)
    model, transform = scope["model"], scope["transform"]
    hits = n = 0
    import io

    from PIL import Image

    from beit.data.loading.stream import image_member
    from beit.data.storage.shard_format import iter_tar_samples
    with torch.no_grad():
        for shard in expand_shards(cfg["val_shards"]):
            with open(shard, "rb") as f:
                for s in iter_tar_samples(f):
                    image = Image.open(io.BytesIO(s[image_member(s)])).convert("RGB")
                    hits += int(model(transform(image)[None]).argmax(-1).item() == int(s["cls"].decode()))
                    n += 1
    return {"pretrain": {k: pre.get(f"val/{k}") for k in ("mim_acc", "majority_acc", "tokens")}
            | {"learning": pre.get("learning", {}).get("learning"), "warnings": pre.get("warnings", [])},
            "finetune_top1": final["top1"], "held_out": final["samples"], "train_images": len(train[1]),
            "logreg_pixels_top1": round(pixels, 2), "timm_top1": 100.0 * hits / max(1, n), "timm_images": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=("digits", "photos"), default="digits")
    ap.add_argument("--out", required=True, help="an empty (or new) work folder")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty")
    from beit.bench.machine import cpu_capability

    images = write_folders(out, a.set)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               BEIT_CACHE=str(out / "cache"))
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs = run_commands(out, env)
    result = {"set": a.set, "images": images, "commands": runs, "seconds": round(sum(r["seconds"] for r in runs), 1),
              "stated_minutes": stated_minutes(), **score(out),
              "machine": {"cpu_capability": cpu_capability(), "cores": os.cpu_count(), "load_before": load_before,
                          "load_after": [round(x, 2) for x in os.getloadavg()]}}
    (out / "flow.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
