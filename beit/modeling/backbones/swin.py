"""timm's Swin Transformer (``--arch`` / ``--model swin_*``): masked-token pretraining (beit.modeling.swin_mim),
classification and UperNet segmentation (beit.modeling.swin_segmenter), loading our Swin pretraining."""
from __future__ import annotations

from torch import nn

from beit.modeling.backbones.timm_models import TimmBackbone

# pretraining option -> timm SwinTransformer argument
OPTION_TO_TIMM = {"image_size": "img_size", "swin_patch_size": "patch_size", "embed_dim": "embed_dim",
                  "swin_depths": "depths", "swin_heads": "num_heads", "swin_window_size": "window_size",
                  "mlp_ratio": "mlp_ratio"}


def timm_kwargs(options: dict) -> dict:
    """The timm constructor arguments of the Swin that ``beit pretrain`` options describe (unset ones left out)."""
    unknown = sorted(set(options) - set(OPTION_TO_TIMM))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for a Swin; valid: {sorted(OPTION_TO_TIMM)}")
    return {OPTION_TO_TIMM[k]: v for k, v in options.items() if v not in (None, 0, (), [])}


def load_swin_encoder(model: nn.Module, source):
    """Copy a Swin pretraining (or plain timm Swin) state dict into a timm SwinTransformer; see
    beit.checkpoints.timm_loading."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    from beit.checkpoints.timm_loading import load_timm_encoder
    from beit.modeling.swin_mim import is_mim_only_key
    return load_timm_encoder(model, source, kind="Swin", pretraining_only=is_mim_only_key,
                             filter_fn=checkpoint_filter_fn)


class SwinBackbone(TimmBackbone):
    kind = "Swin"
    pretrains = segments = True

    @property
    def arch_args(self) -> tuple[str, ...]:
        from beit.modeling.swin_mim import SWIN_ARGS
        return SWIN_ARGS

    def claims(self, name: str) -> bool:
        return name.startswith("swin")

    def check_name(self, name: str) -> None:
        import timm

        from beit.modeling.swin_mim import is_swin
        if not is_swin(name):
            raise ValueError(f"{name!r} is not a timm Swin Transformer name; e.g. {timm.list_models('swin*')[:8]}")

    def build_mim(self, cfg, vocab_size: int) -> nn.Module:
        from beit.modeling.swin_mim import SwinMimModel
        options = {k: getattr(cfg, k) for k in OPTION_TO_TIMM}
        return SwinMimModel(cfg.arch, token_grid=cfg.grid, vocab_size=vocab_size, head=cfg.swin_head,
                            drop_path_rate=cfg.drop_path, **timm_kwargs(options))

    def load_encoder(self, model: nn.Module, source):
        return load_swin_encoder(model, source)

    def build_segmenter(self, cfg, num_classes: int, log=print) -> nn.Module:
        """timm's Swin as the backbone of the UperNet segmenter; with ``--init`` of our Swin pretraining its sizes
        come from that run's pretrained.json (``--model_kwargs`` override them) and every encoder tensor is loaded;
        a plain timm Swin state dict loads the same way."""
        from beit.modeling.swin_segmenter import SwinSegmenter
        pre = self.own_pretraining(cfg) or {}
        model = SwinSegmenter(num_classes, arch=cfg.model, img_size=cfg.image_size, in_chans=cfg.in_chans,
                              drop_path_rate=cfg.drop_path, channels=cfg.seg_channels,
                              aux_channels=max(1, cfg.seg_channels // 2),
                              **{**self.encoder_kwargs(pre), **cfg.model_kwargs})
        if cfg.init:
            log(load_swin_encoder(model.backbone, cfg.init).summary())
        return model

    def finetune_options(self, name: str, options: dict) -> dict:
        sizes = {k: v for k, v in options.items() if k not in ("image_size", "patch_size", "arch")}
        return {"model": name, "image_size": options["image_size"], "model_kwargs": timm_kwargs(sizes)}
