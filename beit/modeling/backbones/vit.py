"""A plain timm Vision Transformer (``--arch`` / ``--model vit_*``): absolute position embeddings, no relative
position bias, no layer scale. Pretraining wraps timm's own ``VisionTransformer`` with a mask token and the
masked-token head; fine-tuning builds the same timm model and loads every encoder tensor."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from beit.modeling.backbones.timm_models import TimmBackbone
from beit.modeling.mim import flat_mask

VIT_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
OPTION_TO_TIMM = {"image_size": "img_size", "patch_size": "patch_size", "embed_dim": "embed_dim", "depth": "depth",
                  "num_heads": "num_heads", "mlp_ratio": "mlp_ratio"}


def is_vit(name: str) -> bool:
    """True if ``name`` is a timm model built by ``timm.models.vision_transformer``."""
    import timm
    from timm.models.vision_transformer import VisionTransformer
    return name in timm.list_models("vit_*") and \
        timm.models.model_entrypoint(name).__module__ == VisionTransformer.__module__


class VitMimModel(nn.Module):
    """timm ViT encoder (``self.encoder``, timm's key names) + mask token + ``lm_head`` over the masked patches.

    forward(images, bool_masked_pos [B, h, w]) -> logits [M, vocab_size] for the masked patches, ordered like
    ``tokens.flatten(1)[bool_masked_pos.flatten(1)]``; a masked patch's embedding is replaced by the mask token
    before the position embedding is added, so no block sees its pixels."""

    def __init__(self, arch: str = "vit_small_patch16_224", vocab_size: int = 8192, drop_path_rate: float = 0.1,
                 init_std: float = 0.02, **vit_kwargs):
        super().__init__()
        import timm
        kw = {k: v for k, v in vit_kwargs.items() if v not in (None, 0)}
        unknown = sorted(set(kw) - set(VIT_ARGS))
        if unknown:
            raise ValueError(f"unknown ViT option(s) {unknown}; valid: {list(VIT_ARGS)}")
        self.encoder = timm.create_model(arch, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **kw)
        enc = self.encoder
        if enc.cls_token is None or enc.num_prefix_tokens != 1:
            raise ValueError(f"--arch {arch}: BEiT pretraining reads one class token and the patch tokens; this ViT "
                             f"has {enc.num_prefix_tokens} prefix token(s)")
        self.grid_size = tuple(enc.patch_embed.grid_size)
        self.vocab_size, self.in_chans = int(vocab_size), int(enc.patch_embed.proj.in_channels)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, enc.embed_dim))
        self.lm_head = nn.Linear(enc.embed_dim, self.vocab_size)
        nn.init.trunc_normal_(self.mask_token, std=init_std)
        nn.init.trunc_normal_(self.lm_head.weight, std=init_std)
        nn.init.zeros_(self.lm_head.bias)
        self.grad_checkpointing = False
        pe = enc.patch_embed
        self.config = dict(arch=arch, vocab_size=self.vocab_size, drop_path_rate=drop_path_rate, init_std=init_std,
                           token_grid=list(self.grid_size), img_size=int(pe.img_size[0]),
                           patch_size=int(pe.patch_size[0]),
                           in_chans=self.in_chans, embed_dim=int(enc.embed_dim), depth=len(enc.blocks),
                           num_heads=int(enc.blocks[0].attn.num_heads),
                           mlp_ratio=enc.blocks[0].mlp.fc1.out_features / enc.embed_dim)

    @property
    def cls_token(self) -> nn.Parameter:
        return self.encoder.cls_token

    def forward_features(self, images: torch.Tensor, bool_masked_pos=None) -> torch.Tensor:
        """Encoder output after the final norm, [B, 1 + num_patches, D]; masked patches see only the mask token."""
        enc = self.encoder
        x = enc.patch_embed(images)
        if bool_masked_pos is not None:
            m = flat_mask(bool_masked_pos, x.shape[0], self.grid_size, x.device, "this model's {h}x{w} patch grid")
            x = torch.where(m.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = enc.norm_pre(enc.patch_drop(enc._pos_embed(x)))
        for blk in enc.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                else blk(x)
        return enc.norm(x)

    def forward(self, images: torch.Tensor, bool_masked_pos) -> torch.Tensor:
        m = flat_mask(bool_masked_pos, images.shape[0], self.grid_size, images.device, "this model's {h}x{w} patch "
                                                                                       "grid")
        return self.lm_head(self.forward_features(images, m)[:, 1:][m])

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"encoder.{k}" for k in self.encoder.no_weight_decay()}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def compile_blocks(self, **kw) -> None:
        """``torch.compile`` every block in place (state-dict keys unchanged)."""
        import torch._dynamo.config as dynamo_config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, len(self.encoder.blocks) + 1)
        for blk in self.encoder.blocks:
            blk.compile(**kw)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """timm ``VisionTransformer`` key names and tensors (no mask token, no head)."""
        return self.encoder.state_dict()


def _pretraining_only(key: str) -> bool:
    return key == "mask_token" or key.startswith("lm_head.")


def _filter(state_dict: dict, model: nn.Module) -> dict:
    """timm's ViT checkpoint filter (position embeddings resampled to the model's grid) on our key names."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    return checkpoint_filter_fn({k.removeprefix("encoder."): v for k, v in state_dict.items()}, model)


class VitBackbone(TimmBackbone):
    kind = "ViT"
    arch_args = VIT_ARGS
    pretrains = patch_tokens = compiles = True

    def claims(self, name: str) -> bool:
        return name.startswith("vit_")

    def check_name(self, name: str) -> None:
        import timm
        if not is_vit(name):
            raise ValueError(f"{name!r} is not a timm Vision Transformer name; e.g. {timm.list_models('vit_*')[:8]}")

    def build_mim(self, cfg, vocab_size: int) -> nn.Module:
        kw = {OPTION_TO_TIMM[k]: getattr(cfg, k) for k in OPTION_TO_TIMM}
        return VitMimModel(cfg.arch, vocab_size=vocab_size, drop_path_rate=cfg.drop_path, **kw)

    def load_encoder(self, model: nn.Module, source):
        from beit.checkpoints.timm_loading import load_timm_encoder
        return load_timm_encoder(model, source, kind="ViT", pretraining_only=_pretraining_only, filter_fn=_filter)

    def finetune_options(self, name: str, options: dict) -> dict:
        sizes = {OPTION_TO_TIMM[k]: v for k, v in options.items() if k in OPTION_TO_TIMM and k != "image_size" and v}
        return {"model": name, "image_size": options["image_size"], "model_kwargs": sizes}
