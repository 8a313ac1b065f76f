"""Benchmark: our exact-count MaskingGenerator against a plain re-implementation of BEiT v1's loop.

    python launch/bench_masking.py [--grid 14 14] [--count 75] [--min-block 16] [--draws 20000]

Prints draws/s for both, the speed ratio, the fraction of draws with exactly `count` masked cells
for the v1-style loop (ours is exact by construction), and the mean number of 4-connected
components for both and for uniform random masking with the same count.
"""
from __future__ import annotations

import argparse
import math
import random
import time

import numpy as np
from scipy import ndimage

from beit.masking import MaskingGenerator


class V1StyleMasking:
    """BEiT v1's published algorithm, written straightforwardly (python `random`, per-cell fill)."""

    def __init__(self, input_size, num_masking_patches, min_num_patches=4, min_aspect=0.3, seed=0):
        self.height, self.width = input_size
        self.n = num_masking_patches
        self.min_num_patches = min_num_patches
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.random = random.Random(seed)

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _ in range(10):
            area = self.random.uniform(self.min_num_patches, max_mask_patches)
            aspect = math.exp(self.random.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = self.random.randint(0, self.height - h)
                left = self.random.randint(0, self.width - w)
                covered = mask[top:top + h, left:left + w].sum()
                if 0 < h * w - covered <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self):
        mask = np.zeros((self.height, self.width), dtype=np.int64)
        count = 0
        while count < self.n:
            delta = self._mask(mask, self.n - count)
            if delta == 0:
                break
            count += delta
        return mask


def _rate(fn, draws):
    t0 = time.perf_counter()
    out = [fn() for _ in range(draws)]
    return draws / (time.perf_counter() - t0), out


def _components(masks):
    return float(np.mean([ndimage.label(m)[1] for m in masks]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, nargs=2, default=[14, 14])
    ap.add_argument("--count", type=int, default=75)
    ap.add_argument("--min-block", type=int, default=16)
    ap.add_argument("--draws", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    grid = tuple(a.grid)

    ours = MaskingGenerator(grid, a.count, min_num_patches=a.min_block, seed=a.seed)
    inside = MaskingGenerator(grid, a.count, min_num_patches=a.min_block, seed=a.seed, placement="inside")
    ref = V1StyleMasking(grid, a.count, min_num_patches=a.min_block, seed=a.seed)
    ours_rate, ours_masks = _rate(ours, a.draws)
    inside_rate, inside_masks = _rate(inside, a.draws)
    ref_rate, ref_masks = _rate(ref, a.draws)
    ours_counts = np.array([m.sum() for m in ours_masks])
    ref_counts = np.array([m.sum() for m in ref_masks])

    rng = np.random.default_rng(a.seed)
    n_cells = grid[0] * grid[1]
    random_masks = [np.isin(np.arange(n_cells), rng.choice(n_cells, a.count, replace=False)).reshape(grid)
                    for _ in range(min(a.draws, 2000))]

    print(f"grid {grid[0]}x{grid[1]}, {a.count} masked, min block {a.min_block}, {a.draws} draws")
    print(f"ours      : {ours_rate:10.0f} draws/s  exact-count fraction {np.mean(ours_counts == a.count):.4f}")
    print(f"ours inside: {inside_rate:9.0f} draws/s  (placement='inside', the v1 block rule + exact top-up)")
    print(f"v1 loop   : {ref_rate:10.0f} draws/s  exact-count fraction {np.mean(ref_counts == a.count):.4f}"
          f"  (min count {ref_counts.min()}, mean {ref_counts.mean():.2f})")
    print(f"speed ratio ours / v1: {ours_rate / ref_rate:.2f}x (inside: {inside_rate / ref_rate:.2f}x)")
    k = min(a.draws, 2000)
    print(f"mean 4-connected components: ours {_components(ours_masks[:k]):.2f}, "
          f"ours inside {_components(inside_masks[:k]):.2f}, "
          f"v1 {_components(ref_masks[:k]):.2f}, uniform random {_components(random_masks):.2f}")


if __name__ == "__main__":
    main()
