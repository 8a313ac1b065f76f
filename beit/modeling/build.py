"""Build the fine-tune model (BEiT classifier or segmenter, timm baseline, linear probe) from its options."""
from __future__ import annotations

from beit.options.finetune import FinetuneConfig


def build_model(cfg: FinetuneConfig, num_classes: int, log=print):
    """The model to train (BEiT classifier or segmenter, timm baseline, or linear probe) with its initial weights."""
    from beit.runtime.checkpoint_loading import infer_beit_dims, load_beit_weights, read_state_dict
    from beit.modeling.classifier import LinearProbe, build_beit_classifier, build_timm_model
    if cfg.task == "segmentation":
        return build_seg_model(cfg, num_classes, log)
    if cfg.model != "beit":
        return build_timm_model(cfg.model, num_classes, weights=cfg.init or None, img_size=cfg.img_size,
                                in_chans=cfg.in_chans, drop_path_rate=cfg.drop_path)
    state = read_state_dict(cfg.init, key=cfg.init_key or None) if cfg.init else None
    model = build_beit_classifier(
        num_classes, img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        init_values=cfg.init_values, drop_path_rate=0.0 if cfg.linear_probe else cfg.drop_path,
        head_init_scale=cfg.head_init_scale, **cfg.beit_dims(infer_beit_dims(state) if state else None))
    if state is not None:
        report = load_beit_weights(model, state)
        report.source = cfg.init
        log(report.summary())
    elif cfg.linear_probe:
        log("warning: linear probe on a randomly initialised encoder (no --init)")
    return LinearProbe(model, num_classes, cfg.probe_block) if cfg.linear_probe else model


def build_seg_model(cfg: FinetuneConfig, num_classes: int, log=print):
    """BEiT encoder + pyramid + UperNet/aux heads; --init's weights go into the encoder (rel-pos tables
    and patch embedding resized to --img_size / --patch_size as for classification)."""
    from beit.runtime.checkpoint_loading import infer_beit_dims, load_beit_weights, read_state_dict
    from beit.modeling.segmenter import BeitSegmenter
    state = read_state_dict(cfg.init, key=cfg.init_key or None) if cfg.init else None
    model = BeitSegmenter(num_classes, img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                          init_values=cfg.init_values, drop_path_rate=cfg.drop_path, channels=cfg.seg_channels,
                          aux_channels=max(1, cfg.seg_channels // 2),
                          **cfg.beit_dims(infer_beit_dims(state) if state else None))
    if state is not None:
        report = load_beit_weights(model.backbone, state)
        report.source = cfg.init
        log(report.summary())
    return model
