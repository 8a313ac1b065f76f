"""Models for fine-tuning: the BEiT classifier (timm ``Beit``), any timm baseline, the linear probe,
and layer-wise lr decay parameter groups."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

BEIT_TIMM_NAME = "beit_base_patch16_224"  # architecture name; dims are overridden by the config


def build_beit_classifier(num_classes: int, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                          embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                          init_values: float | None = 0.1, drop_path_rate: float = 0.1,
                          head_init_scale: float = 0.001, global_pool: str = "avg", use_abs_pos_emb: bool = False,
                          use_rel_pos_bias: bool = True, layer_norm_eps: float = 1e-6) -> nn.Module:
    """A timm ``Beit`` as BEiT fine-tunes it: per-block relative position tables, no absolute
    position embedding (by default; a checkpoint's layout may ask otherwise), mean pooling + ``fc_norm``
    (``global_pool="avg"``; ``"token"``: the CLS token after the final norm), head scaled by
    ``head_init_scale``; ``init_values=0``: no layer scale; ``layer_norm_eps``: every LayerNorm's epsilon."""
    model = timm.create_model(
        BEIT_TIMM_NAME, pretrained=False, num_classes=num_classes, img_size=img_size, patch_size=patch_size,
        in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        init_values=init_values, drop_path_rate=drop_path_rate, head_init_scale=head_init_scale,
        use_abs_pos_emb=use_abs_pos_emb, use_rel_pos_bias=use_rel_pos_bias, use_shared_rel_pos_bias=False,
        global_pool=global_pool)
    return set_layer_norm_eps(model, layer_norm_eps)


def set_layer_norm_eps(model: nn.Module, eps: float) -> nn.Module:
    """Every LayerNorm of ``model`` computes with ``eps`` (timm's ``Beit`` takes no eps argument; 1e-6 built in)."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = float(eps)
    return model


def layer_norm_eps_of(model: nn.Module) -> float:
    """The epsilon of ``model``'s LayerNorms (the first one's)."""
    return float(next(m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)))


def build_timm_model(name: str, num_classes: int, *, weights: str | None = None, img_size: int | None = None,
                     in_chans: int = 3, drop_path_rate: float = 0.0, model_kwargs: dict | None = None) -> nn.Module:
    """Any timm model (Swin, MobileViT, ViT, DeiT, ...) from scratch or from a local weights file.

    ``weights`` goes through timm's own pretrained path (``pretrained_cfg_overlay=dict(file=...)``),
    so the model's checkpoint filter and classifier adaptation apply. ``model_kwargs`` are further
    constructor arguments (e.g. a small Swin's ``embed_dim``/``depths``/``num_heads``/``window_size``).
    """
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise ValueError(f"unknown timm model {name!r}; similar names: {close}")
    extra = {k: tuple(v) if isinstance(v, list) else v for k, v in (model_kwargs or {}).items()}
    kw: dict = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate, **extra)
    if weights:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"--init weights file {weights} does not exist")
        kw.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    if img_size:
        kw["img_size"] = img_size
    try:
        model = timm.create_model(name, **kw)
    except TypeError as e:
        if any(k in str(e) for k in extra):
            raise ValueError(f"--model_kwargs {model_kwargs} do not fit timm's {name}: {e}") from None
        # Models without an img_size / drop_path_rate argument (e.g. MobileViT's img_size).
        optional = next((o for o in ("img_size", "drop_path_rate") if o in str(e) and o in kw), None)
        if optional is None:
            raise
        kw.pop(optional)
        model = timm.create_model(name, **kw)
    # what export needs to rebuild it with timm.create_model(name, **create_kwargs)
    model.create_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()
                           if k in ("num_classes", "in_chans", "img_size", *extra)}
    return model


class LinearProbe(nn.Module):
    """Frozen encoder -> mean of patch tokens after block ``block`` (1-based; 0 = last) ->
    parameter-free LayerNorm -> linear classifier. No BatchNorm, so nothing depends on batch statistics."""

    def __init__(self, encoder: nn.Module, num_classes: int, block: int = 0):
        super().__init__()
        depth = len(encoder.blocks)
        if not 0 <= block <= depth:
            raise ValueError(f"probe_block must be in 0..{depth} (0 = last block), got {block}")
        self.block = block or depth
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        dim = encoder.embed_dim
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # no dropout / drop path in the frozen encoder
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        inter = self.encoder.forward_intermediates(x, indices=[self.block - 1], stop_early=True,
                                                   intermediates_only=True, output_fmt="NLC")
        return inter[0].mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x)))


def layer_decay_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with ``lr_scale = layer_decay ** (L + 1 - layer_id)`` (timm's
    ``param_groups_layer_decay``): id 0 = patch embed / cls / pos / rel-pos, block i -> i + 1, the rest
    (final norm, fc_norm, head) L + 1. No weight decay on 1-d tensors and ``model.no_weight_decay()``.
    The scale is applied by ``beit.optim.WarmupCosineSchedule``."""
    from timm.optim import param_groups_layer_decay
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                    layer_decay=layer_decay)

