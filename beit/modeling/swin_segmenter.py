"""A timm Swin Transformer for semantic segmentation: the backbone's own stages are the feature pyramid
(strides 4, 8, 16, 32 for Swin-T at 4 px patches; the last one after the final norm), fed to the same
UperNet head and auxiliary FCN head (on the second-coarsest stage) as the BEiT segmenter. The backbone is
timm's ``SwinTransformer`` with its key names, so our Swin BEiT pretraining (or any timm Swin weights)
loads into ``backbone`` with every encoder tensor filled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from beit.modeling.segmenter import FCNHead, UperHead
from beit.modeling.swin_mim import create_swin_encoder, swin_kwargs_of


class SwinSegmenter(nn.Module):
    """``images [B,3,S,S] -> logits [B,num_classes,S,S]``; in training mode ``(logits, aux_logits)``.

    ``arch`` is a timm Swin name; ``swin_kwargs`` override its sizes (``img_size`` is the crop)."""

    def __init__(self, num_classes: int, *, arch: str = "swin_tiny_patch4_window7_224", img_size: int = 512,
                 drop_path_rate: float = 0.1, channels: int = 512, aux_channels: int = 256, **swin_kwargs):
        super().__init__()
        self.backbone = create_swin_encoder(arch, num_classes=0, drop_path_rate=drop_path_rate, img_size=img_size,
                                            **swin_kwargs)
        dims = [int(f["num_chs"]) for f in self.backbone.feature_info]
        self.decode = UperHead(dims, channels, num_classes)
        self.aux = FCNHead(dims[-2], aux_channels, num_classes)
        self.arch, self.num_classes, self.img_size = arch, num_classes, img_size

    def constructor_kwargs(self) -> dict:
        """Arguments that rebuild this model (what the export's JSON records)."""
        sizes = {k: v for k, v in swin_kwargs_of(self.backbone).items() if k != "img_size"}
        return dict(num_classes=self.num_classes, arch=self.arch, img_size=self.img_size,
                    channels=self.decode.lateral[0][0].out_channels, aux_channels=self.aux.body[0][0].out_channels,
                    **sizes)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{k}" for k in self.backbone.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's Swin block order under ``backbone.`` (for layer-wise lr decay); the heads come last."""
        return dict(stem=r"^backbone\.patch_embed",
                    blocks=[(r"^backbone\.layers\.(\d+)\.downsample", (0,)),
                            (r"^backbone\.layers\.(\d+)\.\w+\.(\d+)", None),
                            (r"^backbone\.norm", (99999,))])

    def layer_decay_groups(self, weight_decay: float, layer_decay: float) -> list[dict]:
        """AdamW groups with ``lr_scale`` decaying from the heads (1) down the Swin blocks to the patch embedding."""
        from timm.optim import param_groups_layer_decay
        return param_groups_layer_decay(self, weight_decay=weight_decay, no_weight_decay_list=self.no_weight_decay(),
                                        layer_decay=layer_decay)

    def forward(self, images: torch.Tensor):
        levels = self.backbone.forward_intermediates(images, norm=True, intermediates_only=True)
        size = images.shape[2:]
        logits = F.interpolate(self.decode(levels), size=size, mode="bilinear", align_corners=False)
        if not self.training:
            return logits
        return logits, F.interpolate(self.aux(levels[-2]), size=size, mode="bilinear", align_corners=False)
