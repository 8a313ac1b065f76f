"""Blockwise masking for BEiT masked image modelling, with an exact masked count.

The block phase follows BEiT v1 (with one change, see ``placement``): per block, area ~ U(min, remaining),
aspect ratio log-uniform, h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)), the block must fit
strictly inside the grid, top-left uniform, up to 10 tries, accepted only if it adds between 1 and `remaining` new
patches. v1 stops when 10 tries fail and so under-masks about a third of the time. Here a top-up
phase then grows the existing mask through its 4-connected frontier (cells with more masked
neighbours first, which fills corners and keeps shapes compact) until exactly
`num_masking_patches` cells are masked, so the blocky structure is kept and no new isolated
patches appear.

Speed: the block phase runs on Python scalars with uniforms drawn from the numpy Generator in
chunks of 64 (a mask after a reseed, as pretraining does per sample, needs a few dozen), and only
touches the mask through slices; the top-up is vectorised numpy.
"""
from __future__ import annotations

import math
from numbers import Integral

import numpy as np

_BLOCK_TRIES = 10  # per block, as in the reference
_BUFFER = 4096  # uniforms per block (4 per block try); the sequence of masks depends on it
_CHUNK = 64  # uniforms taken from the Generator at a time


def _as_grid(input_size) -> tuple[int, int]:
    if isinstance(input_size, Integral):
        input_size = (input_size, input_size)
    try:
        h, w = input_size
    except (TypeError, ValueError):
        raise ValueError(f"input_size must be an int or a pair (h, w) of ints, got {input_size!r}") from None
    if not (isinstance(h, Integral) and isinstance(w, Integral)) or h < 1 or w < 1:
        raise ValueError(f"input_size must hold positive ints (patch grid h, w), got {input_size!r}")
    return int(h), int(w)


class MaskingGenerator:
    """Draws bool masks of shape (h, w) with exactly ``num_masking_patches`` True cells.

    Args:
        input_size: patch grid, int (square) or (h, w); 14 for a 224 px image with 16 px patches.
        num_masking_patches: masked cells per draw (BEiT: 75 of 196), 1 <= N <= h*w.
        min_num_patches: smallest block area in patches (BEiT pretraining uses 16), <= N.
        max_num_patches: largest block area; None means N.
        min_aspect / max_aspect: block aspect-ratio range (h / w), sampled log-uniformly;
            max_aspect None means 1 / min_aspect.
        seed: seed (or None for OS entropy) of ``self.rng``, a ``numpy.random.Generator``.
        placement: "clip" (default): a block's top-left is uniform over every position where it
            still overlaps the grid and the part outside is cut off, so every cell is masked about
            equally often. "inside": the reference's rule, the block lies wholly inside the grid,
            which masks the corners of a 14x14 grid about 10x less often than its centre.
    """

    def __init__(self, input_size, num_masking_patches, min_num_patches=4, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None, seed=None, placement="clip"):
        if placement not in ("clip", "inside"):
            raise ValueError(f"placement must be 'clip' or 'inside', got {placement!r}")
        self.placement = placement
        self.height, self.width = _as_grid(input_size)
        self.num_patches = self.height * self.width
        n = num_masking_patches
        if not isinstance(n, Integral) or not 1 <= n <= self.num_patches:
            raise ValueError(
                f"num_masking_patches must be an int in [1, {self.num_patches}] for a "
                f"{self.height}x{self.width} grid, got {n!r}; lower it or enlarge the grid")
        if not isinstance(min_num_patches, Integral) or min_num_patches < 1:
            raise ValueError(f"min_num_patches must be an int >= 1, got {min_num_patches!r}")
        if min_num_patches > n:
            raise ValueError(
                f"min_num_patches ({min_num_patches}) is larger than num_masking_patches ({n}): "
                "no block could ever be placed; lower min_num_patches")
        if max_num_patches is None:
            max_num_patches = n
        if not isinstance(max_num_patches, Integral) or max_num_patches < min_num_patches:
            raise ValueError(
                f"max_num_patches ({max_num_patches!r}) must be an int >= min_num_patches ({min_num_patches})")
        if max_aspect is None:
            if not min_aspect > 0:
                raise ValueError(f"min_aspect must be > 0, got {min_aspect!r}")
            max_aspect = 1.0 / min_aspect
        if not (min_aspect > 0 and max_aspect > 0):
            raise ValueError(f"aspect ratios must be > 0, got min_aspect={min_aspect!r}, max_aspect={max_aspect!r}")
        if min_aspect > max_aspect:
            raise ValueError(f"min_aspect ({min_aspect}) must be <= max_aspect ({max_aspect})")
        self.num_masking_patches = int(n)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(max_num_patches)
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.reseed(seed)

    def reseed(self, seed=None) -> None:
        """Reset ``self.rng`` (and the buffered uniforms) to ``numpy.random.default_rng(seed)``."""
        self.rng = np.random.default_rng(seed)
        self._buf: list[float] = []
        self._pos = 0
        self._undrawn = 0  # uniforms of the current _BUFFER-sized block not yet taken from self.rng

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __repr__(self) -> str:
        lo, hi = (math.exp(a) for a in self.log_aspect_ratio)
        return (f"MaskingGenerator(input_size=({self.height}, {self.width}), "
                f"num_masking_patches={self.num_masking_patches}, min_num_patches={self.min_num_patches}, "
                f"max_num_patches={self.max_num_patches}, min_aspect={lo:.4g}, max_aspect={hi:.4g}, "
                f"placement={self.placement!r})")

    def _uniforms(self) -> tuple[float, float, float, float]:
        # The uniforms come in blocks of _BUFFER (a block's last < 4 are skipped), but are taken from
        # the Generator _CHUNK at a time: a mask per reseed needs a few dozen, not thousands.
        if self._pos + 4 > len(self._buf):
            if self._undrawn < 4 - (len(self._buf) - self._pos):  # the block is used up: start the next one
                # skip what the block leaves over (advance() would drop a buffered uint32)
                self.rng.random(self._undrawn)
                self._buf, self._pos, self._undrawn = [], 0, _BUFFER
            take = min(self._undrawn, _CHUNK)
            self._buf = self._buf[self._pos:] + self.rng.random(take).tolist()
            self._pos, self._undrawn = 0, self._undrawn - take
        p = self._pos
        self._pos = p + 4
        b = self._buf
        return b[p], b[p + 1], b[p + 2], b[p + 3]

    def _place_block(self, mask: np.ndarray, max_new: int) -> int:
        """Try up to 10 random blocks; mask the first that adds 1..max_new cells. Returns cells added."""
        lo_area = self.min_num_patches
        log_lo, log_hi = self.log_aspect_ratio
        H, W = self.height, self.width
        clip = self.placement == "clip"
        for _ in range(_BLOCK_TRIES):
            u_area, u_aspect, u_top, u_left = self._uniforms()
            area = lo_area + u_area * (max_new - lo_area)
            aspect = math.exp(log_lo + u_aspect * (log_hi - log_lo))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if bh < H and bw < W:
                if clip:
                    top = int(u_top * (H + bh - 1)) - bh + 1
                    left = int(u_left * (W + bw - 1)) - bw + 1
                    view = mask[max(top, 0):top + bh, max(left, 0):left + bw]
                else:
                    top = int(u_top * (H - bh + 1))
                    left = int(u_left * (W - bw + 1))
                    view = mask[top:top + bh, left:left + bw]
                new = view.size - int(np.count_nonzero(view))
                if 0 < new <= max_new:
                    view[...] = True
                    return new
        return 0

    def _top_up(self, mask: np.ndarray, count: int) -> None:
        """Grow the mask through its 4-connected frontier until exactly N cells are masked."""
        if self._undrawn:  # the Generator's draws below come after the whole current block
            self._buf = self._buf[self._pos:] + self.rng.random(self._undrawn).tolist()
            self._pos, self._undrawn = 0, 0
        n = self.num_masking_patches
        flat = mask.reshape(-1)
        if count == 0:  # no block fitted (tiny grid): start from one random cell
            flat[self.rng.integers(self.num_patches)] = True
            count = 1
        nb = np.empty(mask.shape, dtype=np.int8)
        while count < n:
            need = n - count
            nb.fill(0)
            nb[1:] += mask[:-1]
            nb[:-1] += mask[1:]
            nb[:, 1:] += mask[:, :-1]
            nb[:, :-1] += mask[:, 1:]
            nb[mask] = 0
            idx = np.flatnonzero(nb)
            if idx.size > need:
                score = nb.reshape(-1)[idx] + self.rng.random(idx.size)
                idx = idx[np.argpartition(-score, need - 1)[:need]]
            flat[idx] = True
            count += idx.size

    def __call__(self) -> np.ndarray:
        """One mask: bool array (h, w) with exactly ``num_masking_patches`` True cells."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        n, cap = self.num_masking_patches, self.max_num_patches
        count = 0
        while count < n:
            added = self._place_block(mask, min(n - count, cap))
            if added == 0:
                break
            count += added
        if count < n:
            self._top_up(mask, count)
        return mask

    def generate(self, batch_size: int) -> np.ndarray:
        """``batch_size`` masks stacked into a bool array (batch_size, h, w)."""
        out = np.empty((batch_size, self.height, self.width), dtype=bool)
        for i in range(batch_size):
            out[i] = self()
        return out
