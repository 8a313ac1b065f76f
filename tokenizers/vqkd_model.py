"""The VQ-KD model that is trained (BEiT v2): ViT encoder -> l2-normalised low-dimensional code -> nearest
codeword of an EMA codebook -> small ViT decoder -> the teacher's features, cosine loss.

Parameter and buffer names are unilm's (``beit2/modeling_vqkd.VQKD`` with its ``NormEMAVectorQuantizer``):
the encoder and decoder are timm ``Beit`` ViTs built as unilm builds its ViTs for VQ-KD (absolute position
embedding, no layer scale, q/v bias without k bias, mean-pooling layout: ``fc_norm`` on the patch tokens),
so ``reference_state_dict()`` is a state dict unilm's ``VQKD`` loads strictly. The teacher is not part of
the model (it is frozen and never saved).

Codebook (``NormEMAQuantizer``): rows and encoder outputs are l2-normalised, so the nearest row by
squared distance is the one of highest cosine; it starts from a spherical k-means of the first batch's
encoder outputs; after each forward the rows move towards the mean of their assigned outputs by an
exponential moving average (re-normalised), as the reference does. Ours adds dead-code restarts: a row
that no output chose for ``restart_after`` optimizer steps is replaced by a recent encoder output.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

PROCESS_TYPES = ("default", "imagenet_norm", "dall-e")
OURS_ONLY = ("quantize.last_used",)  # buffers the reference layout does not have


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Identity on one process; the training loop passes an all-reduce sum over processes."""
    return t


def spherical_kmeans(x: torch.Tensor, k: int, iters: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(k unit centroids, cluster sizes) of unit vectors ``x`` [N, d]: start from k random rows (with
    replacement when N < k), assign by largest dot product, centroid = normalised mean; an empty cluster
    keeps its centroid."""
    n = x.shape[0]
    pick = (torch.randperm(n, generator=generator) if n >= k else torch.randint(0, n, (k,), generator=generator))[:k]
    means = x[pick.to(x.device)].clone()
    sizes = torch.zeros(k, device=x.device)
    for _ in range(iters):
        assign = (x @ means.T).argmax(-1)
        sizes = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(means).index_add_(0, assign, x)
        means = torch.where(sizes[:, None] > 0, F.normalize(sums, dim=-1), means)
    return means, sizes


class CodebookState(nn.Module):
    """unilm's ``EmbeddingEMA`` buffers: ``weight`` (the codebook), ``cluster_size`` (k-means sizes),
    ``embed_avg`` (kept for the layout) and ``initted``."""

    def __init__(self, n_code: int, code_dim: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(n_code, code_dim))
        self.register_buffer("cluster_size", torch.zeros(n_code))
        self.register_buffer("embed_avg", torch.zeros(n_code, code_dim))
        self.register_buffer("initted", torch.zeros(1))


class NormEMAQuantizer(nn.Module):
    """Cosine codebook with EMA updates (see module docstring). ``cluster_size`` is the EMA of how often
    each code is chosen per forward (the reference's usage statistic); ``last_used`` the optimizer step at
    which a code was last chosen (ours, for restarts)."""

    def __init__(self, n_code: int, code_dim: int, decay: float = 0.99, kmeans_init: bool = True):
        super().__init__()
        self.n_code, self.code_dim, self.decay = n_code, code_dim, decay
        self.embedding = CodebookState(n_code, code_dim)
        if not kmeans_init:  # random unit rows, ready to use (the reference without --quantize_kmeans_init)
            self.embedding.weight.copy_(F.normalize(torch.randn(n_code, code_dim), dim=-1))
            self.embedding.initted.fill_(1.0)
        self.register_buffer("cluster_size", torch.zeros(n_code))
        self.register_buffer("last_used", torch.zeros(n_code, dtype=torch.long))

    @property
    def initialised(self) -> bool:
        return bool(self.embedding.initted.item())

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest rows (squared l2, as the reference) of unit vectors z [..., d]."""
        w = self.embedding.weight
        d = w.pow(2).sum(-1) - 2.0 * z @ w.T  # + |z|^2, the same for every row
        return d.argmin(-1)

    @torch.no_grad()
    def init_from(self, z: torch.Tensor, generator: torch.Generator, iters: int = 10) -> None:
        """Spherical k-means of unit vectors ``z`` [N, d] (the reference: 10 iterations on the first batch)."""
        means, sizes = spherical_kmeans(z.float(), self.n_code, iters, generator)
        self.embedding.weight.copy_(means)
        self.embedding.cluster_size.copy_(sizes)
        self.embedding.initted.fill_(1.0)

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, idx: torch.Tensor, step: int,
                   reduce: Callable[[torch.Tensor], torch.Tensor] = reduce_sum) -> torch.Tensor:
        """Move each chosen row towards the normalised mean of its outputs (sums over processes via
        ``reduce``); returns the per-code counts of this forward (summed over processes)."""
        z, idx = z.reshape(-1, self.code_dim).float(), idx.reshape(-1)
        both = torch.zeros(self.n_code, self.code_dim + 1, device=z.device)
        both.index_add_(0, idx, torch.cat([z, torch.ones_like(z[:, :1])], 1))
        both = reduce(both)  # one collective for the sums and the counts
        sums, counts = both[:, :-1], both[:, -1]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        used = counts > 0
        mean = F.normalize(sums / counts.clamp_min(1)[:, None], dim=-1)
        w = self.embedding.weight
        moved = F.normalize(w * self.decay + mean * (1 - self.decay), dim=-1)
        w.copy_(torch.where(used[:, None], moved, w))
        self.last_used.masked_fill_(used, step)
        return counts

    @torch.no_grad()
    def restart_dead(self, recent: torch.Tensor, step: int, after_steps: int, generator: torch.Generator) -> int:
        """Replace every row unused for ``after_steps`` optimizer steps by a distinct random vector of
        ``recent`` (unit encoder outputs [N, d], the same on every process); returns how many."""
        dead = torch.nonzero(step - self.last_used >= after_steps).flatten()
        if not len(dead):
            return 0
        n = recent.shape[0]
        pick = (torch.randperm(n, generator=generator)[:len(dead)] if n >= len(dead)
                else torch.randint(0, n, (len(dead),), generator=generator))
        self.embedding.weight[dead] = F.normalize(recent[pick.to(recent.device)].float(), dim=-1)
        self.last_used[dead] = step
        self.cluster_size[dead] = 0.0
        return len(dead)

    def dead_count(self, step: int, after_steps: int) -> int:
        return int((step - self.last_used >= after_steps).sum())


def vit(img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int, num_heads: int,
        mlp_ratio: float) -> nn.Module:
    """A timm ``Beit`` laid out as unilm's VQ-KD ViTs (see module docstring)."""
    from timm.models.beit import Beit
    return Beit(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, global_pool="avg",
                embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                init_values=None, use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=False)


def patch_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``fc_norm`` of the ViT's patch tokens [B, N, D] (unilm ``forward(x, return_patch_tokens=True)``)."""
    return model.fc_norm(model.forward_features(x)[:, model.num_prefix_tokens:])


def _init_task_layer(seq: nn.Sequential) -> None:
    for m in seq:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


class VQKDModel(nn.Module):
    """Encoder, quantizer, decoder and the two task layers of VQ-KD; ``forward(images, target)``.

    ``images`` float [B, 3, S, S] in [0, 1]; ``target`` the teacher's features [B, h, w, teacher_dim]."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, n_code: int = 8192, code_dim: int = 32,
                 decoder_embed_dim: int = 768, decoder_depth: int = 3, decoder_num_heads: int = 12,
                 teacher_dim: int = 512, decay: float = 0.99, beta: float = 1.0, process_type: str = "default",
                 kmeans_init: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"input_size {img_size} is not a multiple of patch_size {patch_size}")
        for name, d, h in (("", embed_dim, num_heads), ("decoder_", decoder_embed_dim, decoder_num_heads)):
            if d % h:
                raise ValueError(f"{name}embed_dim {d} is not divisible by {name}num_heads {h}")
        if process_type not in PROCESS_TYPES:
            raise ValueError(f"process_type must be one of {PROCESS_TYPES}, got {process_type!r}")
        self.config: dict[str, Any] = dict(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, n_code=n_code, code_dim=code_dim, decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads, teacher_dim=teacher_dim, decay=decay,
            beta=beta, process_type=process_type, kmeans_init=kmeans_init)
        self.grid = (img_size // patch_size,) * 2
        self.beta, self.process_type = beta, process_type
        self.encoder = vit(img_size, patch_size, 3, embed_dim, depth, num_heads, mlp_ratio)
        self.decoder = vit(self.grid[0], 1, code_dim, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio)
        self.quantize = NormEMAQuantizer(n_code, code_dim, decay, kmeans_init)
        self.encode_task_layer = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(),
                                               nn.Linear(embed_dim, code_dim))
        self.decode_task_layer = nn.Sequential(nn.Linear(decoder_embed_dim, decoder_embed_dim), nn.Tanh(),
                                               nn.Linear(decoder_embed_dim, teacher_dim))
        _init_task_layer(self.encode_task_layer)
        _init_task_layer(self.decode_task_layer)
        mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
        self.register_buffer("im_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("im_std", std.view(1, 3, 1, 1), persistent=False)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed", "decoder.cls_token", "decoder.pos_embed"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder's and decoder's block activations in backward (less memory, ~1/3 slower)."""
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.set_grad_checkpointing(enable)

    def pre_process(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the encoder's input, as unilm's ``VQKD.pre_process``."""
        if self.process_type == "default":
            return images * (255.0 / 127.5) - 1.0
        if self.process_type == "imagenet_norm":
            return (images - self.im_mean) / self.im_std
        return images

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Unit codes [B, N, code_dim] (float32: the task layer and the quantizer run outside autocast)."""
        feats = patch_tokens(self.encoder, self.pre_process(images))
        with torch.autocast(device_type=images.device.type, enabled=False):
            return F.normalize(self.encode_task_layer(feats.float()), dim=-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantized codes [B, N, code_dim] -> predicted teacher features [B, N, teacher_dim]."""
        b, n, c = codes.shape
        x = codes.transpose(1, 2).reshape(b, c, *self.grid)
        return self.decode_task_layer(patch_tokens(self.decoder, x))

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss = cosine distance to the teacher's features + beta x commitment (as the reference);
        also returns the unit codes ``z`` (detached) and their ``indices`` for the codebook update."""
        z = self.encode(images)
        with torch.autocast(device_type=images.device.type, enabled=False):  # the nearest code in float32
            idx = self.quantize.lookup(z)
        zq = self.quantize.weight[idx]
        quant_loss = self.beta * F.mse_loss(zq, z)  # the codebook moves by EMA, not by this gradient
        rec = self.decode(z + (zq - z).detach())  # straight-through
        rec_loss = cosine_distance(rec.float(), target.flatten(1, 2).float())
        return {"loss": rec_loss + quant_loss, "rec_loss": rec_loss.detach(), "quant_loss": quant_loss.detach(),
                "z": z.detach(), "indices": idx}

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict in unilm's layout (what ``VQKD.load_state_dict`` takes, teacher excluded)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k not in OURS_ONLY}


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(pred, target) over every position."""
    return (1.0 - (F.normalize(pred, dim=-1) * F.normalize(target, dim=-1)).sum(-1)).mean()
