"""Run logging: JSON-lines metrics, the trackers of --report_to (beit.runtime.trackers), tqdm on rank 0.

Only the main process writes. ``metrics.jsonl`` gets one JSON object per logged step; on resume it
is cut back to the resumed step so a restarted run continues the same file without duplicates.
The trackers (TensorBoard in ``output_dir/tensorboard/``, W&B, MLflow) get the same numbers in one layout for
every stage: tags ``train/*`` (per optimizer step or epoch), ``val/*`` (held-out) and ``data/*`` (data counts),
see ``tensorboard_tag``; images (``log_images``) under ``pictures/*``; at ``finish`` the final metrics and the
run's files.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from beit.runtime.trackers import TENSORBOARD_RUN, RunTrackers, run_files  # noqa: F401 (TENSORBOARD_RUN: re-export)

METRICS_FILE = "metrics.jsonl"
# metrics.jsonl keys whose TensorBoard name differs beyond the train/ prefix (one name in both stages)
_TAG_ALIASES = {"wd": "weight_decay", "train_loss": "epoch_loss"}


def tensorboard_tag(key: str) -> str:
    """TensorBoard tag of a metrics.jsonl key: 'val/x' and 'data/x' as they are, 'val_x' -> 'val/x',
    everything else 'train/<name>' ('wd' -> 'train/weight_decay', 'train_loss' -> 'train/epoch_loss')."""
    if "/" in key:
        return key
    if key.startswith("val_"):
        return "val/" + key[4:]
    return "train/" + _TAG_ALIASES.get(key, key)


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


class RunLogger:
    """Writes metrics on the main process; every other rank gets a no-op logger. With ``cfg`` (a config with the
    tracker options, beit.options.common.TrackerOptions) it starts the trackers of ``cfg.report_to`` with the config
    (a resumed run, ``resume_step`` set, goes on in the same tracker runs); ``finish`` ends them."""

    def __init__(self, accelerator, output_dir: str | Path, resume_step: int | None = None, cfg=None):
        from beit.config import to_dict

        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = Path(output_dir) / METRICS_FILE
        self.last_logged: dict = {}  # the newest record with training metrics, for the final summary
        self.trackers = RunTrackers(cfg.trackers() if cfg is not None else [], output_dir,
                                    getattr(cfg, "run_name", ""), main=self.main)
        if self.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_after(resume_step if resume_step is not None else 0)
            if self.trackers:
                self.trackers.start(to_dict(cfg), resume=resume_step is not None)

    def _truncate_after(self, step: int) -> None:
        """Keep only records with ``step <= step`` (a fresh run keeps none of a stale file)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if rec.get("step", 0) <= step and step > 0:
                keep.append(json.dumps(rec))
        self.path.write_text("".join(k + "\n" for k in keep))

    def log(self, metrics: dict, step: int) -> None:
        """Append ``metrics`` at ``step`` to metrics.jsonl and the trackers (main process only)."""
        if not self.main:
            return
        rec = {"step": step, "time": round(time.time(), 3)}
        rec.update({k: _plain(v) for k, v in metrics.items()})
        if "loss" in rec:
            self.last_logged = rec
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        numeric = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        self.trackers.log({tensorboard_tag(k): v for k, v in numeric.items()}, step=step)

    def log_images(self, images: dict, step: int) -> None:
        """HWC uint8 arrays to the trackers under their tags (main process)."""
        self.trackers.log_images(images, step)

    def finish(self, summary: dict | None = None, step: int = 0, files: tuple[str, ...] = ()) -> None:
        """The end of the run's logging: the numbers of ``summary`` as the trackers' final metrics, the run files
        among ``files`` (names in the run folder) and the report of ``beit viz`` (when drawn) as artifacts."""
        if self.main and self.trackers:
            self.trackers.finish(summary, step, run_files(self.path.parent, files))

    def progress(self, total: int, initial: int = 0, desc: str = "pretrain", images_per_step: int = 0):
        """A tqdm bar on the main process only, counting optimizer steps; with ``images_per_step`` it
        counts images (rate in img/s, ETA) and shows the step in its postfix."""
        if not images_per_step:
            return tqdm(total=total, initial=initial, desc=desc, disable=not self.main, dynamic_ncols=True,
                        mininterval=2.0)
        return ImageBar(total, initial, desc, images_per_step, disable=not self.main)

    def info(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()


class ImageBar:
    """A step-driven progress bar that shows images: ``update(steps)`` advances by steps x images per
    step, so tqdm's rate is images/s and its ETA follows; the postfix keeps ``step k/N``."""

    def __init__(self, total_steps: int, initial_steps: int, desc: str, images_per_step: int, disable: bool):
        self.per_step, self.total, self.step = images_per_step, total_steps, initial_steps
        self.bar = tqdm(total=total_steps * images_per_step, initial=initial_steps * images_per_step, desc=desc,
                        unit="img", unit_scale=True, disable=disable, dynamic_ncols=True, mininterval=2.0)
        self._postfix: dict = {}

    def update(self, steps: int = 1) -> None:
        self.step += steps
        if self.bar.disable:
            return
        if time.time() - self.bar.last_print_t >= self.bar.mininterval:  # this update draws: give it the postfix
            self.bar.set_postfix(step=f"{self.step}/{self.total}", refresh=False, **self._postfix)
        self.bar.update(steps * self.per_step)

    def set_postfix(self, refresh: bool = True, **kw) -> None:
        """Keep ``kw`` for the next drawing (every ``mininterval``); ``refresh`` draws now."""
        self._postfix = kw
        if refresh and not self.bar.disable:
            self.bar.set_postfix(step=f"{self.step}/{self.total}", refresh=True, **kw)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def data_error_metrics(loader, accelerator) -> dict:
    """Data counts (samples, bad samples by reason, conversions) summed over ranks; every rank calls it."""
    from accelerate.utils import gather_object

    flat = loader.metrics("data/")
    if accelerator.num_processes > 1:
        merged: dict = {}
        for part in gather_object([flat]):
            for k, v in part.items():
                merged[k] = merged.get(k, 0) + v
        flat = merged
    return flat


def data_summary(loader, batch_size: int, processes: int, what: str = "training data") -> list[str]:
    """Start-up lines about the data: what an epoch covers, remarks such as clamped workers, and a
    warning when the set is smaller than one batch on every process (images repeat within a step)."""
    lines = [f"{what}: {loader.describe()}"] + [f"note: {n}" for n in getattr(loader, "notes", [])]
    images = getattr(loader, "coverage", {}).get("images")
    if images is not None and images < batch_size * processes:
        lines.append(f"note: {images} images are fewer than one batch of {batch_size} x {processes} process(es): "
                     f"every step repeats images; --batch_size {max(1, images // processes)} or less shows each "
                     "image once per step")
    return lines
