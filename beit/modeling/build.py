"""Build the fine-tune model (BEiT classifier or segmenter, timm baseline, linear probe) from its options."""
from __future__ import annotations

from beit.options.finetune import POSITIONS, FinetuneConfig
from beit.checkpoints.swin_loading import swin_pretrain_config


def _read_init(cfg: FinetuneConfig):
    from beit.checkpoints.loading import read_checkpoint
    if not cfg.init:
        return None
    return read_checkpoint(cfg.init, key=cfg.init_key or None, trust_pickle=cfg.trust_pickle)


def beit_arch(cfg: FinetuneConfig, ckpt, log=print) -> dict:
    """Size and layout of the BEiT encoder: explicit flags, else what ``--init``'s tensors (and the config
    beside them) say, else ``--model_size`` / the BEiT defaults. Never guesses a head count for a checkpoint."""
    from beit.checkpoints.loading import infer_beit_dims, infer_beit_layout
    if ckpt is None:
        position = cfg.position or "relative"
        dims = cfg.beit_dims(None)
        layer_scale = bool(cfg.init_values)
    else:
        init_dims = infer_beit_dims(ckpt.tensors)
        if "num_heads" not in init_dims and not cfg.num_heads:
            if ckpt.num_heads is None:
                raise ValueError(
                    f"--init {ckpt.file}: its head count cannot be read from the tensors (no relative position "
                    f"table) and {ckpt.heads_source}; pass --num_heads N (12 for a 768-wide base model, 16 for "
                    "a 1024-wide large one)")
            init_dims["num_heads"] = ckpt.num_heads
            log(f"num_heads {ckpt.num_heads} from {ckpt.heads_source}")
        dims = cfg.beit_dims(init_dims)
        lay = infer_beit_layout(ckpt.tensors)
        found = {(False, True): "relative", (True, False): "absolute", (True, True): "both",
                 (False, False): "none"}[(lay["use_abs_pos_emb"], lay["use_rel_pos_bias"])]
        if cfg.position and cfg.position != found:
            raise ValueError(f"--position {cfg.position}, but --init {ckpt.file} has '{found}' position embeddings; "
                             "leave --position out to use the checkpoint's")
        position, layer_scale = found, lay["layer_scale"]
    return dict(dims, use_abs_pos_emb=position in ("absolute", "both"), use_rel_pos_bias=position in ("relative", "both"),
                init_values=(cfg.init_values or 0.1) if layer_scale else 0.0)  # 0, not None: timm drops None kwargs


def build_model(cfg: FinetuneConfig, num_classes: int, log=print):
    """The model to train (BEiT classifier or segmenter, timm baseline, or linear probe) with its initial weights."""
    from beit.checkpoints.loading import load_beit_weights
    from beit.modeling.classifier import LinearProbe, build_beit_classifier, build_timm_model
    if cfg.task == "segmentation":
        return build_seg_model(cfg, num_classes, log)
    if cfg.model != "beit":
        swin_pre = swin_pretrain_config(cfg.init) if cfg.init else None
        if swin_pre is not None:
            return build_swin_from_pretraining(cfg, num_classes, swin_pre, log)
        return build_timm_model(cfg.model, num_classes, weights=cfg.init or None, img_size=cfg.image_size,
                                in_chans=cfg.in_chans, drop_path_rate=cfg.drop_path, model_kwargs=cfg.model_kwargs)
    ckpt = _read_init(cfg)
    model = build_beit_classifier(
        num_classes, img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        drop_path_rate=0.0 if cfg.linear_probe else cfg.drop_path, head_init_scale=cfg.head_init_scale,
        **beit_arch(cfg, ckpt, log))
    if ckpt is not None:
        log(load_beit_weights(model, ckpt, strict=cfg.strict).summary())
    elif cfg.linear_probe:
        log("warning: linear probe on a randomly initialised encoder (no --init)")
    return LinearProbe(model, num_classes, cfg.probe_block) if cfg.linear_probe else model


def build_seg_model(cfg: FinetuneConfig, num_classes: int, log=print):
    """BEiT encoder + pyramid + UperNet/aux heads; --init's weights go into the encoder (rel-pos tables
    and patch embedding resized to --image_size / --patch_size as for classification)."""
    from beit.checkpoints.loading import load_beit_weights
    from beit.modeling.segmenter import BeitSegmenter
    if cfg.model != "beit":
        return build_swin_seg_model(cfg, num_classes, log)
    ckpt = _read_init(cfg)
    model = BeitSegmenter(num_classes, img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                          drop_path_rate=cfg.drop_path, channels=cfg.seg_channels,
                          aux_channels=max(1, cfg.seg_channels // 2), **beit_arch(cfg, ckpt, log))
    if ckpt is not None:
        log(load_beit_weights(model.backbone, ckpt, strict=cfg.strict).summary())
    return model


def build_swin_seg_model(cfg: FinetuneConfig, num_classes: int, log=print):
    """timm's Swin (``--model``) as the backbone of the UperNet segmenter. With ``--init`` of our Swin BEiT
    pretraining its sizes come from that run's pretrained.json (``--model_kwargs`` override them) and every
    encoder tensor is loaded; a plain timm Swin state dict loads the same way."""
    from beit.modeling.swin_segmenter import SwinSegmenter
    from beit.checkpoints.swin_loading import load_swin_encoder, swin_timm_kwargs
    pre = swin_pretrain_config(cfg.init) if cfg.init else None
    if pre is not None and cfg.model != pre["arch"]:
        raise ValueError(f"--init {cfg.init} is a BEiT pretraining of {pre['arch']}, but --model is {cfg.model}; "
                         f"pass --model {pre['arch']}")
    sizes = {k: v for k, v in swin_timm_kwargs(pre or {}).items() if k not in ("img_size", "in_chans")}
    model = SwinSegmenter(num_classes, arch=cfg.model, img_size=cfg.image_size, in_chans=cfg.in_chans,
                          drop_path_rate=cfg.drop_path, channels=cfg.seg_channels,
                          aux_channels=max(1, cfg.seg_channels // 2), **{**sizes, **cfg.model_kwargs})
    if cfg.init:
        log(load_swin_encoder(model.backbone, cfg.init).summary())
    return model


def build_swin_from_pretraining(cfg: FinetuneConfig, num_classes: int, pre: dict, log=print):
    """A timm Swin classifier with the architecture of a Swin BEiT pretraining run (its pretrained.json;
    ``--model_kwargs`` override it) and that run's encoder weights, every encoder key filled."""
    from beit.modeling.classifier import build_timm_model
    from beit.checkpoints.swin_loading import load_swin_encoder, swin_timm_kwargs
    if cfg.model != pre["arch"]:
        raise ValueError(f"--init {cfg.init} is a BEiT pretraining of {pre['arch']}, but --model is {cfg.model}; "
                         f"pass --model {pre['arch']}")
    kwargs = {**{k: v for k, v in swin_timm_kwargs(pre).items() if k not in ("img_size", "in_chans")},
              **cfg.model_kwargs}
    model = build_timm_model(cfg.model, num_classes, img_size=cfg.image_size, in_chans=cfg.in_chans,
                             drop_path_rate=cfg.drop_path, model_kwargs=kwargs)
    report = load_swin_encoder(model, cfg.init)
    log(report.summary())
    return model


__all__ = ["build_model", "build_seg_model", "beit_arch", "POSITIONS", "build_swin_from_pretraining",
           "build_swin_seg_model"]
