"""Any timm model by name (MobileViT, DeiT, ConvNeXt, ...): fine-tuned from scratch or from a local timm weights
file. The base of the timm families that also pretrain (``swin``, ``vit``): they add the masked-image-modelling
model and load their own pretraining output (``pretrained.safetensors`` + ``pretrained.json``)."""
from __future__ import annotations

from torch import nn

from beit.modeling.backbones.base import Backbone, pretraining_config


class TimmBackbone(Backbone):
    kind = "timm"
    arch_args: tuple[str, ...] = ()   # timm constructor arguments that shape the encoder (in pretrained.json)

    def claims(self, name: str) -> bool:
        return True

    def check_name(self, name: str) -> None:
        import timm
        if name not in timm.list_models():
            close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
            raise ValueError(f"unknown timm model {name!r}; similar names: {close}")

    def build_classifier(self, cfg, num_classes: int, log=print) -> nn.Module:
        """A timm classifier: from our pretraining of the same architecture (every encoder tensor loaded), from a
        timm weights file through timm's own pretrained path, or from scratch."""
        from beit.modeling.classifier import build_timm_model
        pre = self.own_pretraining(cfg)
        if pre is None:
            return build_timm_model(cfg.model, num_classes, weights=cfg.init or None, img_size=cfg.image_size,
                                    in_chans=cfg.in_chans, drop_path_rate=cfg.drop_path, model_kwargs=cfg.model_kwargs)
        model = build_timm_model(cfg.model, num_classes, img_size=cfg.image_size, in_chans=cfg.in_chans,
                                 drop_path_rate=cfg.drop_path, model_kwargs={**self.encoder_kwargs(pre),
                                                                             **cfg.model_kwargs})
        log(self.load_encoder(model, cfg.init).summary())
        return model

    def own_pretraining(self, cfg) -> dict | None:
        """The model config of ``--init`` when it is a BEiT pretraining of a timm architecture (refused unless it
        is ``--model``'s), else None."""
        pre = pretraining_config(cfg.init) if cfg.init else None
        if not pre or "arch" not in pre:
            return None
        if cfg.model != pre["arch"]:
            raise ValueError(f"--init {cfg.init} is a BEiT pretraining of {pre['arch']}, but --model is {cfg.model}; "
                             f"pass --model {pre['arch']}")
        return pre

    def encoder_kwargs(self, pre: dict) -> dict:
        """The timm constructor overrides recorded in a pretraining config (architecture only)."""
        return {k: pre[k] for k in self.arch_args if k in pre and k not in ("img_size", "in_chans")}

    def load_encoder(self, model: nn.Module, source):
        raise ValueError(f"{source}: no BEiT pretraining of a {self.kind} to load")
