"""``beit samples`` / ``python -m beit.data.samples``: write shards of the built-in real sample sets (offline).

    beit samples --out data_samples --kind all        # data_samples/photos and data_samples/digits

``photos``: real photographs and textures (scikit-image, scikit-learn) cut into square crops, ``train-*`` and
``val-*`` shards; ``digits``: scikit-learn's 1,797 real hand-written digits at 32 px, labelled, ``train-*``
and ``test-*`` shards (see beit.data.sample_sets).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from beit.config import field, parse_config


@dataclass
class SamplesConfig:
    out: str = field("", help="output folder")
    kind: Literal["photos", "digits", "all"] = field("all", help="photos (train/val crops, unlabelled), digits "
                                                              "(train/test, labelled) or all (both, in sub-folders)")

    def validate(self) -> None:
        if not self.out:
            raise ValueError("--out is required")


def main(argv: list[str] | None = None) -> int:
    from beit.data.sample_sets import build_sample_shards

    cfg = parse_config(SamplesConfig, argv, description=__doc__)
    for kind in ["photos", "digits"] if cfg.kind == "all" else [cfg.kind]:
        out = Path(cfg.out) / kind if cfg.kind == "all" else Path(cfg.out)
        paths = build_sample_shards(out, kind, progress=True)
        print(f"{kind}: wrote {len(paths)} shards to {out}")
    return 0


if __name__ == "__main__":
    from beit.cli import call
    sys.exit(call(main))
