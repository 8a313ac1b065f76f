"""The comparison's results: table (JSON + markdown), a plain verdict with the spread, a plot, the code version."""
from __future__ import annotations

import json
import statistics
import subprocess
import textwrap
from pathlib import Path

NAMES = {
    "beit": "BEiT pretrained + fine-tuned",
    "scratch": "same ViT from scratch, same recipe and budget",
    "scratch_fitted": "same ViT from scratch, recipe fitted to it",
    "linear_probe": "linear probe on pretrained features",
    "knn": "kNN on pretrained features",
    "logreg_features": "logistic regression on pretrained features",
    "logreg_pixels": "logistic regression on pixels",
    "distill": "student distilled from the fine-tuned BEiT model (labels + unlabelled)",
    "student": "same student on the labels alone, same recipe and budget",
}


def method_names(arch: str = "beit", student: str = "mobilevit_xxs") -> dict[str, str]:
    """``NAMES`` with the encoder (ViT or the Swin's name) and the student model spelled out."""
    enc = "ViT" if arch == "beit" else arch
    out = {m: n.replace("same ViT", f"same {enc}") for m, n in NAMES.items()}
    if arch != "beit":
        out["beit"] = f"{arch}, BEiT pretrained + fine-tuned"
    out["distill"] = f"{student} distilled from the fine-tuned BEiT {enc} (labels + unlabelled)"
    out["student"] = f"same {student} on the labels alone, same recipe and budget"
    return out


CHANGED_FILES_LISTED = 50  # code_version lists at most this many changed files


def code_version(root: Path | None = None) -> dict:
    """The git commit of the code that ran (``root``: this checkout) and whether its tracked or
    untracked files differed from it."""
    root = root or Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30).stdout
    try:
        commit = git("rev-parse", "HEAD").strip()
        # porcelain lines are "XY path": the status columns may be blank, so no strip() before slicing
        changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "note": "not a git checkout"}
    return {"commit": commit or None, "dirty": bool(changed), "changed_files": changed[:CHANGED_FILES_LISTED]}


def mean_std(v: list[float]) -> tuple[float, float]:
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def fmt(v: list[float]) -> str:
    m, s = mean_std(v)
    return f"{m:.1f} ± {s:.1f}" if len(v) > 1 else f"{m:.1f}"


def per_seed(v: list[float]) -> str:
    """Every seed's value, one decimal, as the table's last column."""
    return ", ".join(f"{x:.1f}" for x in v)


def versus(a: list[float], b: list[float]) -> dict:
    """Paired per-seed differences a - b (points)."""
    d = [x - y for x, y in zip(a, b)]
    m, s = mean_std(d)
    return {"mean": m, "std": s, "min": min(d), "max": max(d), "ahead": sum(x > 0 for x in d), "seeds": len(d)}


def _say(d: dict) -> str:
    spread = f" ± {d['std']:.1f}" if d["seeds"] > 1 else ""
    return (f"{d['mean']:+.1f}{spread} points (per seed {d['min']:+.1f} to {d['max']:+.1f}; "
            f"ahead on {d['ahead']} of {d['seeds']} seeds)")


def verdict(rows: dict[str, list[float]], names: dict[str, str] | None = None) -> tuple[str, dict]:
    """The winner by mean top-1, its margin over the runner-up, and BEiT against every other method
    (and the distilled student against the same student on the labels alone)."""
    label = names or NAMES
    order = sorted(rows, key=lambda m: -statistics.mean(rows[m]))
    lines, margins = [], {}
    if len(order) > 1:
        w, r = order[0], order[1]
        margins["winner"] = {"method": w, "runner_up": r, **versus(rows[w], rows[r])}
        lines.append(f"**{label[w]}** wins with {fmt(rows[w])}% top-1; the runner-up, {label[r]}, has {fmt(rows[r])}%: "
                     f"a margin of {_say(margins['winner'])}.")
    if "beit" in rows:
        for m in order:
            if m == "beit":
                continue
            margins[f"beit_vs_{m}"] = d = versus(rows["beit"], rows[m])
            lines.append(f"BEiT pretrained + fine-tuned vs {label[m]}: {_say(d)}.")
    if "distill" in rows and "student" in rows:
        margins["distill_vs_student"] = d = versus(rows["distill"], rows["student"])
        lines.append(f"Distilled student vs the same student on the labels alone: {_say(d)}.")
    return "\n".join(f"- {x}" for x in lines), margins


def markdown(rows: dict[str, list[float]], seeds: list[int], header: str, notes: str, verdict_md: str,
             names: dict[str, str] | None = None) -> str:
    label = names or NAMES
    lines = [header, "", "| method | top-1 (%) | per seed |", "| --- | --- | --- |"]
    best = max(rows, key=lambda m: statistics.mean(rows[m]))
    for m, v in rows.items():
        cell = f"**{fmt(v)}**" if m == best else fmt(v)
        lines.append(f"| {label[m]} | {cell} | {per_seed(v)} |")
    return "\n".join(lines + ["", verdict_md, "", notes]) + "\n"


def plot(rows: dict[str, list[float]], path: Path, title: str, names: dict[str, str] | None = None) -> None:
    """Horizontal bars (mean, std error bar) with every seed's value as a dot."""
    label = names or NAMES
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    order = list(rows)[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(order) + 1.5))
    means = [statistics.mean(rows[m]) for m in order]
    stds = [mean_std(rows[m])[1] for m in order]
    ax.barh(range(len(order)), means, xerr=stds, color=["#4c72b0" if m == "beit" else "#999999" for m in order],
            capsize=3)
    for i, m in enumerate(order):
        ax.plot(rows[m], [i] * len(rows[m]), "k.", markersize=6)
    ax.set_yticks(range(len(order)), [label[m] for m in order])
    ax.set_xlabel("held-out top-1 (%)")
    ax.set_xlim(0, 100)
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)  # the long y labels leave a narrow axes
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: Path, results: dict, md: str, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "compare.md").write_text(md)
    plot(results["rows"], out / "compare.png", title, results.get("names"))
