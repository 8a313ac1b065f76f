"""Shard tools: ``python -m beit.data.shards write ...`` and ``python -m beit.data.shards verify ...``.

write: turn a flat folder (recursive), ImageNet class folders, ADE20K image/annotation pairs or a
file list into WebDataset shards plus manifest.json (see ``write --help``). Deterministic; each
shard is renamed into place only when complete; ``--resume true`` continues an interrupted run.
Shards are named ``train-NNNNNN.tar`` (and ``val-NNNNNN.tar`` with ``--val_fraction``, a seeded
split stratified by class), so the next command's ``'DIR/train-*.tar'`` matches them.

    beit shards write --source photos/ --out shards/photos --val_fraction 0.1
    beit shards write --source labelled/ --out shards/labelled --layout imagenet --val_fraction 0.2

verify: read every shard of a folder, check the manifest's hashes and counts, decode every
sample and list the bad ones by key; exits non-zero on any problem.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from beit.config import Options, field, parse_config
from beit.data.storage.shard_format import written_counts
from beit.data.storage.shard_sources import list_ade20k, list_filelist, list_folder, list_imagenet, load_label_map
from beit.data.storage.shard_verify import verify_folder
from beit.data.storage.shard_writer import (
    WriteOptions,
    auto_samples_per_shard,
    check_unique_keys,
    split_items,
    write_shards,
)


@dataclass
class WriteConfig(Options):
    source: str = field("", help="input folder (folder/imagenet/ade20k layouts) or text file (filelist)")
    out: str = field("", help="output folder for the shards and manifest.json")
    layout: Literal["folder", "imagenet", "ade20k", "filelist"] = field(
        "folder", help="folder | imagenet (class folders -> labels) | ade20k | filelist")
    prefix: str = field("", help="shard name prefix (default: the ADE20K split, else 'train'; with --val_fraction the "
                              "held-out shards are 'val')")
    split: str = field("", help="ade20k: sub-folder of images/ and annotations/ (training, validation)")
    label_map: str = field("", help="JSON class->int map to reuse (val must use train's class_index.json)")
    samples_per_shard: int = field(0, help="samples per shard at most (0: auto = min(1000, ceil(images / 16)), so a "
                                           "small set still splits over 16 loader readers)")
    val_fraction: float = field(0.0, help="hold out this fraction of the images as val-*.tar shards (seeded by "
                                          "--shuffle_seed, stratified by class for labelled layouts; 0: none)")
    max_bytes: int = field(0, help="bytes per shard at most (0: no limit)")
    resize: int = field(0, help="shrink images whose longer side exceeds this many px (0: keep size)")
    reencode: Literal["keep", "jpg", "png"] = field("keep", help="output encoding (keep re-encodes only resized "
                                                                 "images)")
    quality: int = field(90, help="JPEG quality when re-encoding")
    shuffle_seed: int = field(0, help="seed of the sample order across shards (-1: sorted order)")
    check_images: Literal["decode", "header", "none"] = field("decode", help="how inputs are checked before writing")
    workers: int = field(1, help="parallel encoder processes")
    resume: bool = field(False, help="continue an interrupted run (same source and options)")
    overwrite: bool = field(False, help="replace existing shards with the same prefix")
    progress: bool = field(True, help="show a progress bar")

    RENAMED = {"max_samples": "samples_per_shard"}  # it was read as a total; it always meant per shard

    def validate(self) -> None:
        if not self.source or not self.out:
            raise ValueError("--source and --out are required")
        self.check_choices()
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.samples_per_shard < 0:
            raise ValueError(f"--samples_per_shard must be >= 0 (0: auto), got {self.samples_per_shard}")
        self.options(1).check()

    def options(self, num_items: int) -> WriteOptions:
        per_shard = self.samples_per_shard or auto_samples_per_shard(num_items)
        return WriteOptions(max_samples=per_shard, max_bytes=self.max_bytes or None,
                            resize=self.resize or None, reencode=self.reencode, quality=self.quality,
                            shuffle_seed=None if self.shuffle_seed < 0 else self.shuffle_seed,
                            validate=self.check_images)


@dataclass
class VerifyConfig:
    dir: str = field("", help="folder holding the shards and manifest.json")
    decode: bool = field(True, help="decode every sample (false: only hashes and counts)")
    workers: int = field(1, help="parallel checker processes")
    max_report: int = field(50, help="bad samples to list at most")

    def validate(self) -> None:
        if not self.dir:
            raise ValueError("--dir is required")


def run_write(cfg: WriteConfig) -> list[str]:
    lm = load_label_map(cfg.label_map) if cfg.label_map else None
    if cfg.layout == "folder":
        items, label_map, skipped = list_folder(cfg.source)
    elif cfg.layout == "imagenet":
        items, label_map, skipped = list_imagenet(cfg.source, lm)
    elif cfg.layout == "ade20k":
        items, label_map, skipped = list_ade20k(cfg.source, cfg.split)
    else:
        items, label_map, skipped = list_filelist(cfg.source, lm)
    check_unique_keys(items)  # across the splits too, before anything is created
    out = Path(cfg.out)
    prefix = cfg.prefix or cfg.split or "train"
    source = f"{cfg.layout}:{Path(cfg.source).resolve()}" + (f"/{cfg.split}" if cfg.split else "")
    parts = [(prefix, items, skipped)]
    if cfg.val_fraction > 0:
        train, val = split_items(items, cfg.val_fraction, max(cfg.shuffle_seed, 0))
        parts = [(prefix, train, skipped), ("val", val, [])]
    paths: list[str] = []
    for name, part, part_skipped in parts:
        written = write_shards(part, out, prefix=name, opts=cfg.options(len(part)), label_map=label_map,
                               source=source + (f"#{name}" if len(parts) > 1 else ""), workers=cfg.workers,
                               resume=cfg.resume, overwrite=cfg.overwrite, progress=cfg.progress,
                               pre_skipped=part_skipped)
        samples, skipped = written_counts(out, name)
        print(f"wrote {len(written)} shard(s), {samples} image(s) as {out}/{name}-*.tar" + (
            f" ({len(skipped)} unreadable input(s) skipped, listed in {out / 'manifest.json'})" if skipped else ""))
        paths += written
    if label_map is not None:
        (out / "class_index.json").write_text(json.dumps(label_map, indent=1, sort_keys=True) + "\n")
    print(f"manifest: {out / 'manifest.json'}")
    return paths


def run_verify(cfg: VerifyConfig) -> int:
    reports, problems = verify_folder(cfg.dir, decode=cfg.decode, workers=cfg.workers)
    n_bad, listed = 0, 0
    for rep in reports:
        name = Path(rep.shard).name
        for p in rep.problems:
            print(f"BAD SHARD {name}: {p}")
        for key, why in rep.bad_samples:
            n_bad += 1
            if listed < cfg.max_report:
                print(f"BAD SAMPLE {name} {key}: {why}")
                listed += 1
    for p in problems:
        print(f"PROBLEM {cfg.dir}: {p}")
    bad_shards = sum(1 for r in reports if r.problems)
    total = sum(r.samples for r in reports)
    print(f"verified {len(reports)} shard(s), {total} sample(s): {bad_shards} bad shard(s), "
          f"{n_bad} bad sample(s), {len(problems)} other problem(s)")
    return 1 if (bad_shards or n_bad or problems) else 0


def write(argv: list[str] | None = None) -> int:
    """``beit shards write``."""
    return main(["write", *(sys.argv[1:] if argv is None else argv)])


def verify(argv: list[str] | None = None) -> int:
    """``beit shards verify``."""
    return main(["verify", *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("write", "verify"):
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(__doc__.strip() + "\n\nusage: python -m beit.data.shards {write,verify} [--help] ...",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    from beit.cli import call  # the exit-code policy of every command
    cmd, rest = argv[0], argv[1:]
    if cmd == "write":
        return call(lambda a: run_write(parse_config(WriteConfig, a, description="Write WebDataset shards + "
                                                                                 "manifest.json")), rest)
    return call(lambda a: run_verify(parse_config(VerifyConfig, a, description="Verify shards against manifest.json")),
                rest)


if __name__ == "__main__":
    sys.exit(main())
