"""Training curves from a run's metrics.jsonl: loss, masked-token accuracy beside the majority
baseline (pretraining) or held-out top-1/top-5 (fine-tuning), lr and grad norm."""
from __future__ import annotations

from pathlib import Path

from beit.runtime.run_logging import read_metrics
from beit.viz.figures import DPI, plt, save

CURVES_IN = (9.6, 6.4)


def curves_px() -> tuple[int, int]:
    return round(CURVES_IN[0] * DPI), round(CURVES_IN[1] * DPI)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _panel(ax, records, keys: list[tuple[str, str]], title: str, log: bool = False) -> None:
    drawn = False
    for key, label in keys:
        x, y = _series(records, key)
        if x:
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
            drawn = True
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.tick_params(labelsize=7)
    if drawn:
        ax.legend(fontsize=7)
        if log and all(v > 0 for k, _ in keys for v in _series(records, k)[1]):
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes, fontsize=8)


def draw_curves(run_dir: Path, stage: str, path: Path) -> Path:
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'} is missing or empty: no curves to draw")
    fig, axes = plt().subplots(2, 2, figsize=CURVES_IN, dpi=DPI)
    if stage == "pretrain":
        _panel(axes[0][0], records, [("loss", "train loss"), ("val/loss", "held-out loss")], "masked-token loss")
        _panel(axes[0][1], records, [("mim_acc", "masked-token accuracy"), ("majority_acc", "majority-token baseline"),
                                     ("val/mim_acc", "held-out accuracy"), ("val/majority_acc", "held-out baseline")],
               "masked-token accuracy vs always the most frequent token")
    else:
        _panel(axes[0][0], records, [("loss", "train loss (step)"), ("train_loss", "train loss (epoch mean)"),
                                     ("val_loss", "held-out loss")], "loss")
        _panel(axes[0][1], records, [("val_top1", "held-out top-1"), ("val_top5", "held-out top-5"),
                                     ("val_mIoU", "held-out mIoU"), ("val_aAcc", "held-out pixel acc")],
               "held-out scores (%)")
    _panel(axes[1][0], records, [("lr", "learning rate")], "learning rate", log=True)
    _panel(axes[1][1], records, [("grad_norm", "gradient norm (before clipping)")], "gradient norm")
    fig.suptitle(f"{run_dir.name}: {len(records)} logged records", fontsize=10)
    fig.tight_layout()
    return save(fig, path)
