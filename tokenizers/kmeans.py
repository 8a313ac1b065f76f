"""K-means visual-word tokenizer: the offline default, fit on the user's own images.

Each ``p x p`` patch is described as mean colour + contrast + shape::

    patch = mean_rgb + contrast * shape,   shape = (patch - mean_rgb) / max(contrast, contrast_floor)

The shape part is scaled to unit norm on average (optionally ZCA-whitened first: off by default,
because on small photo sets whitening boosts pixel noise and k-means then spends codes on
outliers: held-out perplexity fell from ~30 to ~8 of 64 codes in our check); mean colour
and contrast are kept as separate, weighted features. Normalising the shape alone would map every
flat patch (sky, paper, black background) to the same degenerate vector, so one "background" token
would swallow a large part of the image; keeping colour and contrast gives flat patches of
different brightness/colour different codes, so tokens carry information there too. The std floor
keeps the noise of near-flat patches from being blown up to full-contrast shapes.

Tokens are the nearest of ``vocab_size`` centroids; ``decode`` paints each token's centroid back
as a patch (mean colour + contrast x shape), so the report can show reconstructions and PSNR. ``fit`` runs
mini-batch k-means (k-means++ init, per-centre learning rates, dead-code re-seeding) over batches streamed from
any iterable.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from beit.tokenizers.base import VisualTokenizer


def extract_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B,3,S,S] -> [B, h*w, 3*p*p] (row-major patch order, channel-major inside a patch)."""
    b = images.shape[0]
    cols = F.unfold(images, kernel_size=patch_size, stride=patch_size)  # [B, 3*p*p, L]
    return cols.transpose(1, 2).reshape(b, -1, cols.shape[1])


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centroid, for rows of ``x`` [N, F]."""
    c2 = (centroids * centroids).sum(1)
    idx, dist = [], []
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        d = c2[None, :] - 2.0 * (xs @ centroids.T)
        m, i = d.min(1)
        idx.append(i)
        dist.append((m + (xs * xs).sum(1)).clamp_min(0))
    if not idx:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0)
    return torch.cat(idx), torch.cat(dist)


class KMeansTokenizer(VisualTokenizer):
    """Nearest-centroid tokens over colour/contrast/shape patch features (see module docstring)."""

    kind = "kmeans"

    def __init__(self, vocab_size: int = 1024, patch_size: int = 8, input_size: int = 112,
                 interpolation: str = "bicubic", contrast_floor: float = 0.05, color_weight: float = 1.0,
                 contrast_weight: float = 2.0, whiten: bool = False, zca_eps: float = 0.1):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if patch_size < 1 or input_size % patch_size:
            raise ValueError(f"input_size ({input_size}) must be a multiple of patch_size ({patch_size})")
        if contrast_floor <= 0:
            raise ValueError("contrast_floor must be > 0 (it keeps flat patches from dividing by ~0)")
        self.vocab_size, self.patch_size, self.input_size = int(vocab_size), int(patch_size), int(input_size)
        self.grid_size = (input_size // patch_size, input_size // patch_size)
        self.interpolation = interpolation
        self.contrast_floor, self.color_weight, self.contrast_weight = contrast_floor, color_weight, contrast_weight
        self.whiten, self.zca_eps = bool(whiten), float(zca_eps)
        d = 3 * patch_size * patch_size
        self.shape_dim = d
        self.feature_dim = d + 4
        self.register_buffer("whitening", torch.eye(d))
        self.register_buffer("centroids", torch.zeros(vocab_size, self.feature_dim))
        self.freeze()

    def get_config(self) -> dict[str, Any]:
        return dict(vocab_size=self.vocab_size, patch_size=self.patch_size, input_size=self.input_size,
                    interpolation=self.interpolation, contrast_floor=self.contrast_floor,
                    color_weight=self.color_weight, contrast_weight=self.contrast_weight,
                    whiten=self.whiten, zca_eps=self.zca_eps)

    # ---- features -------------------------------------------------------------------------------
    def _decompose(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """patches [N, 3*p*p] -> (shape [N, D] unwhitened, mean rgb [N, 3], contrast [N, 1])."""
        n, p2 = patches.shape[0], self.patch_size ** 2
        per_channel = patches.view(n, 3, p2)
        mean_rgb = per_channel.mean(2)
        centred = (per_channel - mean_rgb[:, :, None]).reshape(n, -1)
        contrast = centred.pow(2).mean(1, keepdim=True).sqrt()
        shape = centred / contrast.clamp_min(self.contrast_floor)
        return shape, mean_rgb, contrast

    def features(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [N, 3*p*p] in [0,1] -> features [N, D+4] (what the centroids live in)."""
        shape, mean_rgb, contrast = self._decompose(patches)
        shape = (shape @ self.whitening) / math.sqrt(self.shape_dim)
        return torch.cat([shape, self.color_weight * (mean_rgb - 0.5), self.contrast_weight * contrast], 1)

    def fit_whitening(self, patches: torch.Tensor) -> None:
        """ZCA whitening of the shape vectors from a sample of patches (identity if whiten=False)."""
        if not self.whiten:
            self.whitening.copy_(torch.eye(self.shape_dim))
            return
        shape, _, _ = self._decompose(patches.double())
        shape = shape - shape.mean(0, keepdim=True)
        cov = shape.T @ shape / max(1, shape.shape[0] - 1)
        evals, evecs = torch.linalg.eigh(cov)
        # Scale so an average whitened shape has the same norm as before (sum of eigenvalues kept).
        evals = evals.clamp_min(0)
        w = evecs @ torch.diag((evals + self.zca_eps).rsqrt()) @ evecs.T
        kept = float((evals / (evals + self.zca_eps)).sum().clamp_min(1e-12))
        scale = math.sqrt(float(evals.sum()) / kept)
        self.whitening.copy_((w * scale).float())

    def _tokenize(self, images: torch.Tensor) -> torch.Tensor:
        patches = extract_patches(images, self.patch_size)
        b, n, _ = patches.shape
        idx, _ = nearest(self.features(patches.reshape(b * n, -1)), self.centroids)
        return idx.view(b, *self.grid_size)

    @property
    def has_decoder(self) -> bool:
        return True

    def centroid_patches(self) -> torch.Tensor:
        """Each centroid turned back into pixels [K, 3*p*p]: mean colour + contrast * shape."""
        d = self.shape_dim
        shape = self.centroids[:, :d] * math.sqrt(d) @ torch.linalg.pinv(self.whitening)
        mean_rgb = self.centroids[:, d:d + 3] / self.color_weight + 0.5
        contrast = (self.centroids[:, d + 3:] / self.contrast_weight).clamp_min(0)
        centred = shape * contrast.clamp_min(self.contrast_floor)
        p2 = self.patch_size ** 2
        return (centred.view(-1, 3, p2) + mean_rgb[:, :, None]).reshape(-1, d)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        cols = self.centroid_patches()[tokens.flatten(1)].transpose(1, 2)  # [B, 3*p*p, L]
        return F.fold(cols, (self.input_size, self.input_size), kernel_size=self.patch_size, stride=self.patch_size)

    def patch_features_of(self, images: torch.Tensor) -> torch.Tensor:
        """All patch features of a batch of images [B,3,S,S] -> [B*h*w, F]."""
        x = self.check_images(images)
        return self.features(extract_patches(x, self.patch_size).reshape(-1, self.shape_dim))

    def random_like(self, seed: int = 0) -> "KMeansTokenizer":
        """Random Gaussian centroids with this tokenizer's config and whitening."""
        tok = KMeansTokenizer.random(seed=seed, **self.get_config())
        tok.whitening.copy_(self.whitening)
        return tok

    # ---- fitting --------------------------------------------------------------------------------
    @classmethod
    def random(cls, seed: int = 0, **config: Any) -> "KMeansTokenizer":
        """An unfitted tokenizer with random Gaussian centroids (the baseline for the report)."""
        tok = cls(**config)
        g = torch.Generator().manual_seed(seed)
        tok.centroids.copy_(torch.randn(tok.vocab_size, tok.feature_dim, generator=g) / math.sqrt(tok.feature_dim))
        return tok

    @classmethod
    def fit(cls, batches: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]], *, epochs: int = 2,
            seed: int = 0, init_patches: int = 20000, reseed_every: int = 50, progress: bool = True,
            max_batches_per_epoch: int | None = None, batches_per_epoch: int | None = None,
            **config: Any) -> "KMeansTokenizer":
        """Fit by mini-batch k-means over image batches [B,3,S,S] in [0,1] (S = input_size).

        ``batches`` is re-iterated once per epoch (a list, a DataLoader, or a function returning a
        fresh iterator). The first ``init_patches`` patches fit the whitening and seed k-means++.
        Codes that won no patch in the last ``reseed_every`` batches are re-seeded onto far-away
        patches. Same data order + same seed -> identical centroids. (``KMeansFit`` is the same fit one
        batch at a time, with a resumable state: ``beit tokenizer train kmeans`` stops and resumes through it.)
        """
        source = batches if callable(batches) else (lambda: batches)
        fit = KMeansFit.start(source(), seed=seed, init_patches=init_patches, reseed_every=reseed_every, **config)
        for epoch in range(epochs):
            bar = tqdm(source(), desc=f"k-means epoch {epoch + 1}/{epochs}", disable=not progress,
                       unit="batch", leave=False, total=max_batches_per_epoch or batches_per_epoch)
            for b_i, images in enumerate(bar):
                if max_batches_per_epoch is not None and b_i >= max_batches_per_epoch:
                    break
                fit.update(images)
                if progress:
                    bar.set_postfix(inertia=f"{fit.inertia:.4f}", reseeded=fit.n_reseeded)
            fit.end_epoch()
        return fit.finish()


class KMeansFit:
    """Mini-batch k-means in progress: ``start`` (whitening + k-means++ on the first patches), ``update`` per
    batch (Sculley's per-centre learning rates, dead codes re-seeded every ``reseed_every`` batches),
    ``end_epoch`` after each pass, ``finish`` -> the tokenizer. ``state_dict`` / ``from_state`` resume it exactly
    between batches."""

    COUNTERS = ("step", "epoch", "n_reseeded", "init_patches", "reseed_every", "inertia_sum", "n_seen", "n_images",
                "images_per_epoch", "last_epoch_inertia")

    def __init__(self, tok: KMeansTokenizer, centroids: torch.Tensor, g: torch.Generator, reseed_every: int = 50):
        self.tok, self.centroids, self.g, self.reseed_every = tok, centroids, g, int(reseed_every)
        self.counts = torch.zeros(tok.vocab_size, dtype=torch.float64)
        self.recent = torch.zeros(tok.vocab_size, dtype=torch.long)
        self.step = self.epoch = self.n_reseeded = self.init_patches = 0
        self.images_per_epoch: list[int] = []
        self.last_epoch_inertia = 0.0
        self.inertia_sum, self.n_seen, self.n_images = 0.0, 0, 0
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # the epoch's last batch, for its end

    @classmethod
    def start(cls, batches: Iterable[torch.Tensor], *, seed: int = 0, init_patches: int = 20000,
              reseed_every: int = 50, **config: Any) -> "KMeansFit":
        """Whitening and k-means++ seeds from the first ``init_patches`` patches of ``batches``."""
        tok = KMeansTokenizer(**config)
        g = torch.Generator().manual_seed(seed)
        k = tok.vocab_size
        sample: list[torch.Tensor] = []
        n_sample = 0
        for images in batches:
            p = extract_patches(tok.check_images(images), tok.patch_size).reshape(-1, tok.shape_dim)
            sample.append(p)
            n_sample += p.shape[0]
            if n_sample >= init_patches:
                break
        if n_sample < k:
            raise ValueError(f"only {n_sample} patches available to fit {k} codes; use more images or a "
                             f"smaller vocab_size (at least a few patches per code, ideally > 20)")
        init = torch.cat(sample)[:max(init_patches, k)]
        tok.fit_whitening(init)
        fit = cls(tok, kmeans_plus_plus(tok.features(init), k, g), g, reseed_every)
        fit.init_patches = int(init.shape[0])
        return fit

    @property
    def inertia(self) -> float:
        """Mean squared distance to the nearest centre over this epoch so far."""
        return self.inertia_sum / max(1, self.n_seen)

    def update(self, images: torch.Tensor) -> None:
        """One mini-batch step."""
        tok, centroids = self.tok, self.centroids
        x = tok.features(extract_patches(tok.check_images(images), tok.patch_size).reshape(-1, tok.shape_dim))
        idx, dist = nearest(x, centroids)
        hits = torch.bincount(idx, minlength=tok.vocab_size)
        sums = torch.zeros_like(centroids).index_add_(0, idx, x)
        self.counts += hits.double()
        self.recent += hits
        upd = hits > 0
        # Per-centre learning rate hits/count (Sculley's mini-batch k-means, batched form).
        lr = (hits[upd].double() / self.counts[upd]).float()[:, None]
        centroids[upd] += lr * (sums[upd] / hits[upd, None].float() - centroids[upd])
        self.inertia_sum += float(dist.sum())
        self.n_seen += x.shape[0]
        self.n_images += images.shape[0]
        self.step += 1
        if self.step % self.reseed_every == 0:
            self.n_reseeded += _reseed_dead(centroids, self.counts, self.recent, x, dist, self.g)
        self._last = (x, dist)

    def end_epoch(self) -> None:
        """After a pass: re-seed the codes unused since the last re-seed (on the pass's last batch)."""
        if self.n_seen and self._last is not None:
            self.n_reseeded += _reseed_dead(self.centroids, self.counts, self.recent, *self._last, self.g)
        self.images_per_epoch.append(self.n_images)
        self.last_epoch_inertia = self.inertia
        self.epoch += 1
        self.inertia_sum, self.n_seen, self.n_images, self._last = 0.0, 0, 0, None

    def pass_metrics(self) -> dict:
        """The pass just ended (after ``end_epoch``): its number, mean inertia, images, codes re-seeded so far."""
        return {"epoch": self.epoch, "inertia": self.last_epoch_inertia, "reseeded": self.n_reseeded,
                "images": self.images_per_epoch[-1] if self.images_per_epoch else 0}

    def finish(self) -> KMeansTokenizer:
        tok = self.tok
        tok.centroids.copy_(self.centroids)
        tok.fit_stats = {"init_patches": self.init_patches, "steps": self.step, "images_per_epoch":
                         self.images_per_epoch, "reseeded": self.n_reseeded,
                         "mean_inertia_last_epoch": self.last_epoch_inertia}
        return tok

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-safe counters and config) between batches."""
        tensors = {"centroids": self.centroids, "counts": self.counts, "recent": self.recent,
                   "whitening": self.tok.whitening, "generator": self.g.get_state()}
        return tensors, {"config": self.tok.get_config(), **{k: getattr(self, k) for k in self.COUNTERS}}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], state: dict) -> "KMeansFit":
        tok = KMeansTokenizer(**state["config"])
        tok.whitening.copy_(tensors["whitening"])
        g = torch.Generator()
        g.set_state(tensors["generator"])
        fit = cls(tok, tensors["centroids"].clone(), g)
        fit.counts, fit.recent = tensors["counts"].clone(), tensors["recent"].clone()
        for k in cls.COUNTERS:
            setattr(fit, k, state[k])
        return fit


def kmeans_plus_plus(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) of ``k`` centres from rows of ``x``."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=g))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than codes: pick uniformly
            i = int(torch.randint(n, (1,), generator=g))
        else:
            i = int(torch.multinomial(d2 / total, 1, generator=g))
        centres.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return torch.stack(centres).clone()


def _reseed_dead(centroids: torch.Tensor, counts: torch.Tensor, recent: torch.Tensor, x: torch.Tensor,
                 dist: torch.Tensor, g: torch.Generator) -> int:
    """Move codes with no recent hits onto batch points drawn with probability ~ distance^2."""
    dead = (recent == 0).nonzero().flatten()
    recent.zero_()
    if dead.numel() == 0 or x.shape[0] == 0:
        return 0
    w = dist.double() + 1e-12
    picks = torch.multinomial(w / w.sum(), dead.numel(), replacement=dead.numel() > x.shape[0], generator=g)
    centroids[dead] = x[picks]
    counts[dead] = 1.0
    return int(dead.numel())


def load_kmeans(path: str | Path | None = None, **kw: Any) -> KMeansTokenizer:
    """``load_tokenizer("kmeans", path)``: a tokenizer saved by ``KMeansTokenizer.save``."""
    if path is None:
        raise ValueError("the k-means tokenizer needs a fitted codebook: fit one on your shards with "
                         "`python -m beit.tokenizers.train kmeans --train_shards '<train-*.tar>' --out <dir>/kmeans` "
                         "and pass --tokenizer_path <dir>/kmeans")
    if kw:
        raise TypeError(f"unexpected options for a saved k-means tokenizer: {sorted(kw)}")
    return KMeansTokenizer.load(path)
