"""Evidence that BEiT pretraining helps when labels are few, on real images, offline, on a CPU:
``beit compare`` on the bundled digits.

    python launch/evidence.py --out runs/evidence            # 3 seeds, up to 1.5 per core at once (--jobs)
    python launch/evidence.py --out runs/evidence --seeds 0  # one seed, quicker
    python launch/evidence.py --out runs/evidence_photos --set photos   # crops of the bundled photographs

Data: scikit-learn's 1,797 real hand-written digits as shards (``beit.data.samples``, 32x32 RGB),
with the FIXED held-out test split (360 images) that no stage ever reads except for scoring. The
1,437 training images are the unlabelled pretraining data; each seed fine-tunes on a stratified 10%
of their labels. ``--set photos``: crops of the bundled photographs labelled by the photograph they
come from (training crops from the left 80% of each photograph, test crops from the right 20%). Any other
argument goes to ``beit compare`` (``--methods beit,logreg_pixels``,
``--pretrain '{epochs: 60}'``, ...). Results: ``<out>/compare.json``, ``compare.md``, ``compare.png``.

``--dev``: for choosing a recipe without the test split. A stratified 20% of the TRAINING images
becomes the scored set and the other 80% the training (and unlabelled) set; the test split is not
read at all. Every recipe change in docs/compare.md was screened this way.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Tiny models on a shared 2-core CPU: one intra-op thread is several times faster than two
# (no OpenMP spinning when the other core is busy). Must be set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

LABEL_FRACTION = 0.10
DEV_FRACTION = 0.20
DEV_SEED = 12345


def photo_classes(out: Path) -> Path:
    """A labelled set from the bundled photographs: each crop's class is the photograph it was cut
    from (``<name>_s<side>_x<x>_y<y>`` keys); training crops come from the left 80% of every
    photograph, test crops from the right 20%, so no test crop overlaps a training crop."""
    import re

    from beit.compare.labels import write_labelled
    from beit.data.sample_sets import build_sample_shards
    from beit.data.storage.shard_format import iter_tar_samples
    raw = out / "photos_raw"
    build_sample_shards(raw, "photos")
    splits = {}
    for split in ("train", "val"):
        items = []
        for shard in sorted(raw.glob(f"{split}-*.tar")):
            with open(shard, "rb") as f:
                items += [{"key": s["__key__"], "data": s["jpg"], "ext": "jpg",
                           "name": re.fullmatch(r"(.+)_s\d+_x\d+_y\d+", s["__key__"]).group(1)}
                          for s in iter_tar_samples(f)]
        splits[split] = items
    names = sorted({s["name"] for s in splits["train"]} & {s["name"] for s in splits["val"]})
    label_map = {n: i for i, n in enumerate(names)}
    dest = out / "photos"
    for split, prefix in (("train", "train"), ("val", "test")):
        samples = [dict(s, label=label_map[s["name"]]) for s in splits[split] if s["name"] in label_map]
        write_labelled(samples, dest, prefix, label_map, f"evidence:photo-classes/{split}", 0)
    return dest


def dev_split(data: Path) -> Path:
    """``data/dev``: a fixed stratified ``DEV_FRACTION`` of the training images as ``dev-*.tar`` (scored)
    and the rest as ``train-*.tar``; the test shards are not read."""
    from beit.compare.labels import label_map_of, read_labelled, stratified_subset, write_labelled
    train = read_labelled(str(data / "train-*.tar"), "train_shards")
    label_map = label_map_of(str(data / "train-*.tar"))
    dev, rest = stratified_subset(train, DEV_FRACTION, DEV_SEED)
    out = data / "dev"
    write_labelled(rest, out, "train", label_map, "evidence:dev/train", 0)
    write_labelled(dev, out, "dev", label_map, "evidence:dev/dev", 0)
    return out


def main(argv: list[str] | None = None) -> int:
    from beit.config import DefaultsHelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--out", default="runs/evidence", help="work folder (a rerun reuses the finished stages)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", default="digits", choices=["digits", "photos"],
                   help="digits: the 8x8 hand-written digits; photos: which bundled photograph a crop comes from")
    p.add_argument("--dev", action="store_true",
                   help="score on a validation split carved from the training images (recipe screening); "
                        "the test split is not read")
    args, rest = p.parse_known_args(argv)
    from beit.compare.run import main as compare
    from beit.data.sample_sets import build_sample_shards
    if args.set == "digits":
        data = Path(args.out) / "digits"
        build_sample_shards(data, "digits")
    else:
        data = photo_classes(Path(args.out))
    test, fraction = "test", LABEL_FRACTION
    # the seeds at once, up to 1.5 per core (the numbers do not change; 3 seeds on 2 cores finish in 1.5x
    # one seed's time, 2 at a time and then the third in 2x); --jobs overrides
    cores = os.cpu_count() or 1
    jobs = [] if any(a.startswith("--jobs") for a in rest) else ["--jobs", str(min(len(args.seeds),
                                                                                   cores + cores // 2))]
    if args.dev:  # as many labels as the real run: 10% of all the training images
        data, test, fraction = dev_split(data), "dev", LABEL_FRACTION / (1 - DEV_FRACTION)
    return compare(["--train_shards", str(data / "train-*.tar"), "--test_shards", str(data / f"{test}-*.tar"),
                    "--label_fraction", str(fraction), "--seeds", ",".join(map(str, args.seeds)),
                    "--output_dir", args.out, "--threads", "1", *jobs, *rest])


if __name__ == "__main__":
    from beit.cli import call
    sys.exit(call(main))
