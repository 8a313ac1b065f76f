"""Evidence that BEiT pretraining helps when labels are few, on real images, offline, on a CPU:
``beit compare`` on the bundled digits.

    python launch/evidence.py --out runs/evidence            # 3 seeds
    python launch/evidence.py --out runs/evidence --seeds 0  # one seed, quicker

Data: scikit-learn's 1,797 real hand-written digits as shards (``beit.data.samples``, 32x32 RGB),
with the FIXED held-out test split (360 images) that no stage ever reads except for scoring. The
1,437 training images are the unlabelled pretraining data; each seed fine-tunes on a stratified 10%
of their labels. Any other argument goes to ``beit compare`` (``--methods beit,logreg_pixels``,
``--pretrain '{epochs: 60}'``, ...). Results: ``<out>/compare.json``, ``compare.md``, ``compare.png``.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/evidence", help="work folder (a rerun reuses the finished stages)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args, rest = p.parse_known_args(argv)
    from beit.compare.run import main as compare
    from beit.data.samples import build_sample_shards
    digits = Path(args.out) / "digits"
    build_sample_shards(digits, "digits")
    return compare(["--train_shards", str(digits / "train-*.tar"), "--test_shards", str(digits / "test-*.tar"),
                    "--label_fraction", str(LABEL_FRACTION), "--seeds", ",".join(map(str, args.seeds)),
                    "--output_dir", args.out, "--threads", "1", *rest])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
