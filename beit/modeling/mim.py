"""BEiT masked-image-modelling model, assembled from timm's BEiT modules.

timm's ``Beit`` has the encoder (patch embedding, blocks with layer scale and q/v bias, a shared
relative position bias) but no mask token and no masked-token head. ``BeitPretrainModel`` adds
those around timm's own ``PatchEmbed``, ``Block`` and ``RelativePositionBias`` and initialises
everything as the BEiT reference does. Parameter names match the reference checkpoints and timm,
so ``encoder_state_dict()`` loads into ``timm.models.beit.Beit(**timm_beit_kwargs(...))``.

BEiT v2's CLS-pretraining ("patch aggregation") branch is optional (``cls_pretraining``): the last block's CLS
token joined with the patch tokens after block ``early_layers`` goes through ``head_layers`` more blocks and
predicts the same masked tokens, through the main norm and ``lm_head`` (``shared_lm_head``) or its own
``cls_pt_norm`` / ``cls_pt_lm_head``; unilm beit2's ``VisionTransformerForMaskedImageModelingCLS`` key names.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm, PatchEmbed, to_2tuple
from timm.models.beit import RelativePositionBias
from torch.utils.checkpoint import checkpoint

from beit.modeling.blocks import BeitBlock

BEIT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, init_values=0.1),
    "small": dict(embed_dim=384, depth=12, num_heads=6, init_values=0.1),
    "base": dict(embed_dim=768, depth=12, num_heads=12, init_values=0.1),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
}

# Constructor arguments that also shape the timm fine-tune model (the rest is pretraining-only).
_ENCODER_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "init_values")


def _trunc_normal(t: torch.Tensor, std: float) -> None:
    # The reference truncates at +-1 std (not timm's default +-2 absolute), so the empirical
    # std of the weights is about 0.54 * std.
    nn.init.trunc_normal_(t, mean=0.0, std=std, a=-std, b=std)



def flat_mask(bool_masked_pos, batch: int, grid_size, device, grid_name: str) -> torch.Tensor:
    """[B, h, w] or [B, h*w] mask (bool or 0/1 ints) -> bool [B, h*w] on ``device``; ``grid_name`` names the
    grid in the error (``{h}``/``{w}`` filled in)."""
    m = torch.as_tensor(bool_masked_pos if torch.is_tensor(bool_masked_pos) else np.asarray(bool_masked_pos))
    if m.dtype != torch.bool:
        if m.is_floating_point() or m.is_complex():
            raise ValueError(f"bool_masked_pos must be bool (or 0/1 ints), got dtype {m.dtype}")
        m = m != 0
    h, w = grid_size
    if tuple(m.shape) not in ((batch, h, w), (batch, h * w)):
        raise ValueError(f"bool_masked_pos must be [{batch}, {h}, {w}] or [{batch}, {h * w}] for "
                         f"{grid_name.format(h=h, w=w)}, got {tuple(m.shape)}")
    return m.reshape(batch, h * w).to(device, non_blocking=True)


def check_cls_pretraining(depth: int, early_layers: int, head_layers: int) -> None:
    """The CLS branch reads an intermediate block (1 <= early_layers < depth) through at least one head block."""
    if not 1 <= early_layers < depth:
        raise ValueError(f"early_layers {early_layers} must name an intermediate block, 1 to depth - 1 = {depth - 1} "
                         "(0: depth - 3, the reference's 9 of 12 for base and 21 of 24 for large, which needs depth "
                         ">= 4)")
    if head_layers < 1:
        raise ValueError(f"head_layers must be >= 1 (the CLS branch's blocks; the reference uses 2), got {head_layers}")


def _masked_rows(m: torch.Tensor) -> torch.Tensor | None:
    """[B, K] token indices (after the cls token) of each sample's masked patches in ascending order when every
    sample has the same count K, else None; the step's one host sync (the output size depends on the mask)."""
    counts = m.sum(1).tolist()
    if min(counts) != max(counts):
        return None
    return torch.argsort((~m).to(torch.uint8), dim=1, stable=True)[:, :counts[0]] + 1


class BeitPretrainModel(nn.Module):
    """ViT encoder + mask token + ``lm_head`` over the masked positions (BEiT pretraining).

    forward(images, bool_masked_pos) -> logits [M, vocab_size], M = number of masked patches in the
    batch, ordered like ``tokens.flatten(1)[bool_masked_pos.flatten(1)]``. With ``cls_pretraining`` (BEiT v2)
    it returns ``{"mim": logits, "cls_pt": the CLS branch's logits}``, both [M, vocab_size] in that order.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, vocab_size=8192, init_values=0.1, drop_path_rate=0.1, init_std=0.02,
                 cls_pretraining=False, early_layers=0, head_layers=2, shared_lm_head=True):
        super().__init__()
        img_hw, patch_hw = to_2tuple(img_size), to_2tuple(patch_size)
        if any(int(v) != v or v < 1 for v in (*img_hw, *patch_hw)):
            raise ValueError(f"img_size {img_size!r} and patch_size {patch_size!r} must be positive ints")
        if img_hw[0] % patch_hw[0] or img_hw[1] % patch_hw[1]:
            raise ValueError(f"img_size {img_hw} must be divisible by patch_size {patch_hw}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        for name, v in (("depth", depth), ("vocab_size", vocab_size), ("in_chans", in_chans)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, vocab_size=vocab_size,
                           init_values=init_values, drop_path_rate=drop_path_rate, init_std=init_std)
        if cls_pretraining:
            early_layers = early_layers or depth - 3
            check_cls_pretraining(depth, early_layers, head_layers)
            self.config.update(cls_pretraining=True, early_layers=early_layers, head_layers=head_layers,
                               shared_lm_head=bool(shared_lm_head))
        self.early_layers = early_layers if cls_pretraining else 0
        self.embed_dim, self.vocab_size, self.in_chans = embed_dim, vocab_size, in_chans
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=img_hw, patch_size=patch_hw, in_chans=in_chans, embed_dim=embed_dim)
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.rel_pos_bias = RelativePositionBias(window_size=self.grid_size, num_heads=num_heads)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            BeitBlock(dim=embed_dim, num_heads=num_heads, qkv_bias=True, mlp_ratio=mlp_ratio, drop_path=dpr[i],
                  init_values=init_values, norm_layer=LayerNorm, window_size=None)
            for i in range(depth)])
        self.norm = LayerNorm(embed_dim)  # eps 1e-6
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        self._init_weights(init_std)
        self.cls_pt_layers = None
        if cls_pretraining:
            self._build_cls_pt(head_layers, shared_lm_head, drop_path_rate, init_std)

    @torch.no_grad()
    def _init_weights(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                _trunc_normal(m.weight, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        _trunc_normal(self.cls_token, std)
        _trunc_normal(self.mask_token, std)
        nn.init.zeros_(self.rel_pos_bias.relative_position_bias_table)
        for layer_id, blk in enumerate(self.blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    @torch.no_grad()
    def _build_cls_pt(self, head_layers: int, shared_lm_head: bool, drop_path_rate: float, init_std: float) -> None:
        """The CLS-pretraining head, initialised as unilm beit2 does: its blocks are built after the encoder's
        trunc-normal init and keep PyTorch's default Linear init (only proj/fc2 rescaled, by their depth counted
        on from ``early_layers``); drop path continues the encoder's schedule from ``early_layers``."""
        cfg = self.config
        depth, early = cfg["depth"], self.early_layers
        dpr = torch.linspace(0, drop_path_rate, max(depth, early + head_layers)).tolist()
        self.cls_pt_layers = nn.ModuleList([
            BeitBlock(dim=cfg["embed_dim"], num_heads=cfg["num_heads"], qkv_bias=True, mlp_ratio=cfg["mlp_ratio"],
                      drop_path=dpr[i], init_values=cfg["init_values"], norm_layer=LayerNorm, window_size=None)
            for i in range(early, early + head_layers)])
        for layer_id, blk in enumerate(self.cls_pt_layers, start=early + 1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))
        if not shared_lm_head:
            self.cls_pt_norm = LayerNorm(cfg["embed_dim"])
            self.cls_pt_lm_head = nn.Linear(cfg["embed_dim"], cfg["vocab_size"])
            _trunc_normal(self.cls_pt_lm_head.weight, init_std)
            nn.init.zeros_(self.cls_pt_lm_head.bias)

    @property
    def branches(self) -> tuple[str, ...]:
        """Names of the predictions ``forward`` returns (one per loss): ``mim``, and ``cls_pt`` with the CLS branch."""
        return ("mim",) if self.cls_pt_layers is None else ("mim", "cls_pt")

    def _check_images(self, images: torch.Tensor) -> None:
        expect = (self.in_chans, *self.patch_embed.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expect:
            raise ValueError(f"images must be [B, {expect[0]}, {expect[1]}, {expect[2]}], got {tuple(images.shape)}; "
                             "resize to the model's img_size or build the model for your size")

    def _flat_mask(self, bool_masked_pos, batch: int, device) -> torch.Tensor:
        return flat_mask(bool_masked_pos, batch, self.grid_size, device, "this model's {h}x{w} patch grid")

    def _embed(self, images: torch.Tensor, m) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_images(images)
        x = self.patch_embed(images)
        b = x.shape[0]
        if m is not None:
            # same values as x * (1 - w) + mask_token * w, but no path at all from masked pixels
            x = torch.where(m.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat((self.cls_token.to(x.dtype).expand(b, -1, -1), x), dim=1)
        return x, self.rel_pos_bias()

    def _run_block(self, blk, x, rel_pos_bias, rows=None):
        fn = blk if rows is None else blk.forward_rows
        args = (x, rel_pos_bias) if rows is None else (x, rel_pos_bias, rows)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward_features(self, images: torch.Tensor, bool_masked_pos=None) -> torch.Tensor:
        """Encoder output after the final norm, [B, 1 + num_patches, D]; masked patches see only the mask token."""
        m = None if bool_masked_pos is None else self._flat_mask(bool_masked_pos, images.shape[0], images.device)
        x, rel_pos_bias = self._embed(images, m)
        for blk in self.blocks:
            x = self._run_block(blk, x, rel_pos_bias)
        return self.norm(x)

    def forward(self, images: torch.Tensor, bool_masked_pos) -> torch.Tensor:
        """Logits [M, vocab_size] for the masked positions only.

        When every sample has the same number of masked patches (BEiT's masking draws an exact
        count), the last block, the norm and the head run on the masked rows only (their keys and
        values still come from every token): the same outputs as the full encoder gathered at the
        mask, up to float rounding, for about half the last block's work."""
        b = images.shape[0]
        m = self._flat_mask(bool_masked_pos, b, images.device)
        if self.cls_pt_layers is not None:
            return self._forward_with_cls_pt(images, m)
        x, rel_pos_bias = self._embed(images, m)
        *body, last = self.blocks
        for blk in body:
            x = self._run_block(blk, x, rel_pos_bias)
        rows = _masked_rows(m)
        if rows is not None:
            x = self.norm(self._run_block(last, x, rel_pos_bias, rows)).flatten(0, 1)
        else:
            x = self.norm(self._run_block(last, x, rel_pos_bias))[:, 1:][m]
        return self.lm_head(x)

    def _forward_with_cls_pt(self, images: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
        """BEiT v2: the main prediction as ``forward``, and the CLS branch's (the last block's CLS token + the
        patch tokens after block ``early_layers``, through ``cls_pt_layers``) at the same masked positions. With
        equal mask counts the last block of each path runs on the rows it must output only."""
        x, rel_pos_bias = self._embed(images, m)
        *body, last = self.blocks
        for i, blk in enumerate(body, start=1):
            x = self._run_block(blk, x, rel_pos_bias)
            if i == self.early_layers:
                early = x[:, 1:]
        rows = _masked_rows(m)
        if rows is not None:  # the cls token (row 0) and the masked rows
            x = self._run_block(last, x, rel_pos_bias, F.pad(rows, (1, 0)))
            main = x[:, 1:].flatten(0, 1)
        else:
            x = self._run_block(last, x, rel_pos_bias)
            main = x[:, 1:][m]
        h = torch.cat((x[:, :1], early), dim=1)
        *head, head_last = self.cls_pt_layers
        for blk in head:
            h = self._run_block(blk, h, rel_pos_bias)
        if rows is not None:
            h = self._run_block(head_last, h, rel_pos_bias, rows).flatten(0, 1)
        else:
            h = self._run_block(head_last, h, rel_pos_bias)[:, 1:][m]
        norm, lm_head = (self.norm, self.lm_head) if self.config["shared_lm_head"] else \
            (self.cls_pt_norm, self.cls_pt_lm_head)
        return {"mim": self.lm_head(self.norm(main)), "cls_pt": lm_head(norm(h))}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay (as timm's Beit, plus the mask token)."""
        nwd = {"cls_token", "mask_token"}
        nwd.update(n for n, _ in self.named_parameters() if "relative_position_bias_table" in n)
        return nwd

    def compile_blocks(self, **kw) -> None:
        """``torch.compile`` every transformer block in place (state-dict keys unchanged). The masked
        gather and the head stay eager: their shapes depend on the mask.

        Each block is its own compiled frame (their drop-path rates differ), so dynamo's
        recompile limit (8 by default) is raised to the depth: past it the rest would run eager."""
        import torch._dynamo.config as dynamo_config
        blocks = [*self.blocks, *(self.cls_pt_layers or ())]
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, len(blocks) + 1)
        for blk in blocks:
            blk.compile(**kw)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (saves memory, costs ~1/3 more compute)."""
        self.grad_checkpointing = bool(enable)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict without the pretraining-only ``mask_token``, ``lm_head`` and CLS-pretraining branch
        (reference/timm key names)."""
        return {k: v for k, v in self.state_dict().items()
                if k != "mask_token" and not k.startswith(("lm_head.", "cls_pt_"))}

    def timm_beit_kwargs(self) -> dict[str, Any]:
        """kwargs for ``timm.models.beit.Beit`` with this encoder's architecture (see module function)."""
        return timm_beit_kwargs(**{k: self.config[k] for k in _ENCODER_ARGS})


DIM_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "init_values")


def beit_dims(size: str | None = None, found: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """embed_dim / depth / num_heads / mlp_ratio / init_values of a BEiT encoder: the constructor's defaults <
    the named size (``BEIT_SIZES``) < ``found`` (read off a checkpoint) < ``overrides`` (0 or None: unset).
    The one place where a size preset meets its overrides (pretraining, fine-tuning, ``create_pretrain_model``)."""
    if size is not None and size not in BEIT_SIZES:
        raise ValueError(f"unknown BEiT size {size!r}; choose one of {sorted(BEIT_SIZES)} or size=None with explicit "
                         "dims")
    unknown = sorted(set(overrides) - set(DIM_KEYS))
    if unknown:
        raise ValueError(f"unknown BEiT dimension(s) {unknown}; valid: {list(DIM_KEYS)}")
    defaults = inspect.signature(BeitPretrainModel.__init__).parameters
    dims = {k: defaults[k].default for k in DIM_KEYS}
    dims.update(BEIT_SIZES[size] if size else {})
    dims.update({k: v for k, v in (found or {}).items() if k in DIM_KEYS})
    dims.update({k: v for k, v in overrides.items() if v})
    if dims["embed_dim"] % dims["num_heads"]:
        raise ValueError(f"embed_dim {dims['embed_dim']} is not divisible by num_heads {dims['num_heads']}")
    return dims


def _resolve(size: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Constructor defaults < named size < overrides (an explicit 0 kept); unknown names are an error."""
    defaults = {k: p.default for k, p in inspect.signature(BeitPretrainModel.__init__).parameters.items()
                if k != "self"}
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; valid: {sorted(defaults)}")
    return {**defaults, **beit_dims(size, **{k: v for k, v in overrides.items() if k in DIM_KEYS}), **overrides}


def create_pretrain_model(size: str | None = "base", **overrides) -> BeitPretrainModel:
    """A ``BeitPretrainModel`` of a named size (tiny/small/base/large); ``overrides`` set any constructor arg."""
    return BeitPretrainModel(**_resolve(size, overrides))


def timm_beit_kwargs(size: str | None = None, **overrides) -> dict[str, Any]:
    """kwargs that build a ``timm.models.beit.Beit`` whose encoder matches ours key for key.

    Shared relative position bias, no absolute position embedding, no per-block bias tables, so
    ``Beit(**timm_beit_kwargs(...), num_classes=K).load_state_dict(model.encoder_state_dict(), strict=False)``
    misses only the new head (and ``fc_norm`` with mean pooling, where ``norm.*`` is then unused).
    Pretraining-only options (vocab_size, init_std, drop_path_rate) are ignored.
    """
    cfg = _resolve(size, overrides)
    out = {k: cfg[k] for k in _ENCODER_ARGS}
    out.update(qkv_bias=True, use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    return out
