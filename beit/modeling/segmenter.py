"""BEiT for semantic segmentation, as the BEiT paper fine-tunes it on ADE20K: the ViT encoder's
features after 4 evenly spaced blocks, turned into a 4-level pyramid (strides 4, 8, 16, 32 for
16 px patches: two transposed convolutions, one, identity, max-pooling), a UperNet head (pyramid
pooling on the coarsest level + FPN, all levels fused at stride 4) and an auxiliary FCN head on the
third level, used for an extra loss term during training only. Logits come out at the input size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from beit.modeling.classifier import BEIT_TIMM_NAME, set_layer_norm_eps


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def feature_blocks(depth: int) -> list[int]:
    """0-based block indices whose outputs feed the pyramid: 3, 5, 7, 11 for 12 blocks (as BEiT)."""
    if depth < 4:
        raise ValueError(f"segmentation needs an encoder with at least 4 blocks, got depth {depth}")
    return [round(depth * f) - 1 for f in (1 / 3, 1 / 2, 2 / 3, 1)]


class Pyramid(nn.Module):
    """Single-scale ViT features (stride = patch size) -> 4 levels at 4x, 2x, 1x and 1/2x that resolution."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.up4(feats[0]), self.up2(feats[1]), feats[2], self.down2(feats[3])]


class UperHead(nn.Module):
    """UperNet: pyramid pooling (bins 1, 2, 3, 6) on the coarsest level, top-down FPN, fusion at the finest.

    ``in_dim``: the channels of each level, one int for 4 levels of the same width (the ViT pyramid) or a
    list, finest first (a hierarchical backbone's stages, e.g. Swin's 96, 192, 384, 768)."""

    def __init__(self, in_dim: int | list[int], channels: int, num_classes: int, bins=(1, 2, 3, 6),
                 dropout: float = 0.1):
        super().__init__()
        dims = [in_dim] * 4 if isinstance(in_dim, int) else list(in_dim)
        if len(dims) < 2:
            raise ValueError(f"UperNet needs at least 2 feature levels, got {len(dims)}")
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(dims[-1], channels,
                                                                                     1)) for b in bins)
        self.ppm_out = conv_bn_relu(dims[-1] + len(bins) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(d, channels, 1) for d in dims[:-1])
        self.smooth = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in dims[:-1])
        self.fuse = conv_bn_relu(len(dims) * channels, channels, 3)
        self.classify = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        top, n = levels[-1], len(levels)
        pooled = [F.interpolate(p(top), size=top.shape[2:], mode="bilinear", align_corners=False) for p in self.ppm]
        maps = [lat(x) for lat, x in zip(self.lateral, levels[:-1])] + [self.ppm_out(torch.cat([top, *pooled], 1))]
        for i in range(n - 1, 0, -1):  # top-down: each level gets the coarser one added
            maps[i - 1] = maps[i - 1] + F.interpolate(maps[i], size=maps[i - 1].shape[2:], mode="bilinear",
                                                      align_corners=False)
        outs = [s(m) for s, m in zip(self.smooth, maps[:-1])] + [maps[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.classify(self.fuse(torch.cat(outs, 1)))


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 conv block and a 1x1 classifier."""

    def __init__(self, in_dim: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(in_dim, channels, 3), nn.Dropout2d(dropout), nn.Conv2d(channels,
                                                                                                      num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class BeitSegmenter(nn.Module):
    """``images [B,3,S,S] -> logits [B,num_classes,S,S]``; in training mode ``(logits, aux_logits)``."""

    def __init__(self, num_classes: int, *, img_size: int = 640, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 init_values: float | None = 0.1, drop_path_rate: float = 0.1, channels: int = 512,
                 aux_channels: int = 256, use_abs_pos_emb: bool = False, use_rel_pos_bias: bool = True,
                 layer_norm_eps: float = 1e-6):
        super().__init__()
        import timm
        self.backbone = timm.create_model(
            BEIT_TIMM_NAME, pretrained=False, num_classes=0, img_size=img_size, patch_size=patch_size,
            in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            init_values=init_values, drop_path_rate=drop_path_rate, use_abs_pos_emb=use_abs_pos_emb,
            use_rel_pos_bias=use_rel_pos_bias, use_shared_rel_pos_bias=False)
        # the final norms serve classification; left in, they would be parameters without gradients,
        # which DDP refuses
        self.backbone.norm, self.backbone.fc_norm = nn.Identity(), nn.Identity()
        set_layer_norm_eps(self.backbone, layer_norm_eps)
        self.blocks_used = feature_blocks(depth)
        self.pyramid = Pyramid(embed_dim)
        self.decode = UperHead(embed_dim, channels, num_classes)
        self.aux = FCNHead(embed_dim, aux_channels, num_classes)
        self.num_classes, self.img_size = num_classes, img_size

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{k}" for k in self.backbone.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor):
        feats = self.backbone.forward_intermediates(images, indices=self.blocks_used, stop_early=True,
                                                    intermediates_only=True)
        levels = self.pyramid(feats)
        size = images.shape[2:]
        logits = F.interpolate(self.decode(levels), size=size, mode="bilinear", align_corners=False)
        if not self.training:
            return logits
        return logits, F.interpolate(self.aux(levels[2]), size=size, mode="bilinear", align_corners=False)


class SegLoss(nn.Module):
    """Cross-entropy over labelled pixels (``ignore_index`` left out) + ``aux_weight`` x the aux head's."""

    def __init__(self, aux_weight: float = 0.4, ignore_index: int = 255):
        super().__init__()
        self.aux_weight, self.ignore_index = aux_weight, ignore_index

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        main, aux = output if isinstance(output, tuple) else (output, None)
        loss = F.cross_entropy(main.float(), target, ignore_index=self.ignore_index)
        if aux is not None and self.aux_weight > 0:
            loss = loss + self.aux_weight * F.cross_entropy(aux.float(), target, ignore_index=self.ignore_index)
        return loss


def seg_layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with ``lr_scale = layer_decay ** (L + 1 - id)``: id 0 = patch embed / cls token,
    block i -> i + 1, everything else (pyramid, heads) L + 1. No weight decay on 1-d tensors or the
    backbone's ``no_weight_decay`` entries. A Swin segmenter's groups follow timm's Swin block order."""
    if not isinstance(model, BeitSegmenter):
        return model.layer_decay_groups(weight_decay, layer_decay)
    depth = len(model.backbone.blocks)
    skip = model.no_weight_decay()
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("backbone.patch_embed", "backbone.cls_token", "backbone.pos_embed")):
            layer = 0
        else:
            layer = depth + 1
        decay = p.ndim > 1 and name not in skip and not name.endswith(".bias")
        g = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                               "lr_scale": layer_decay ** (depth + 1 - layer)})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]
