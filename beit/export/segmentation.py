"""Export a fine-tuned segmenter (BEiT or Swin UperNet) as safetensors + JSON, and rebuild it from them.

The JSON names the class (``architecture``, kept as the module path it had when the format was made, so old
exports load) and its constructor arguments (``model_kwargs``)."""
from __future__ import annotations

from torch import nn

from beit.modeling.segmenter import BeitSegmenter


def seg_model_kwargs(model: BeitSegmenter) -> dict:
    """Constructor arguments that rebuild ``model`` (what the export's JSON records)."""
    bb = model.backbone
    return dict(num_classes=model.num_classes, img_size=model.img_size, patch_size=bb.patch_embed.patch_size[0],
                in_chans=bb.patch_embed.proj.in_channels, embed_dim=bb.embed_dim, depth=len(bb.blocks),
                num_heads=bb.blocks[0].attn.num_heads, mlp_ratio=bb.blocks[0].mlp.fc1.out_features / bb.embed_dim,
                channels=model.decode.lateral[0][0].out_channels, aux_channels=model.aux.body[0][0].out_channels)


BEIT_SEG = "beit.modeling.segmenter.BeitSegmenter"
SWIN_SEG = "beit.modeling.swin_segmenter.SwinSegmenter"


def export_seg_model(model: nn.Module, path, cfg, metrics: dict | None = None, provenance: dict | None = None):
    """The fine-tuned segmenter (BEiT or Swin) as safetensors + JSON (``load_seg_model`` rebuilds it)."""
    from beit.checkpoints.checkpointing import save_weights

    if isinstance(model, BeitSegmenter):
        arch, kwargs = BEIT_SEG, seg_model_kwargs(model)
    else:
        arch, kwargs = SWIN_SEG, model.constructor_kwargs()
    config = {"architecture": arch, "model_kwargs": kwargs,
              "mean": list(cfg.mean), "std": list(cfg.std), "reduce_zero_label": cfg.reduce_zero_label,
              "image_size": cfg.image_size, "seg_stride": cfg.seg_stride or max(1, cfg.image_size * 2 // 3),
              "eval": f"short side rescaled to {cfg.image_size}, sliding {cfg.image_size} px windows",
              "metrics": metrics or {}, "provenance": provenance}
    return save_weights(model.state_dict(), path, config)


def load_seg_model(path) -> nn.Module:
    """Rebuild an exported segmenter (BEiT or Swin; eval mode) from its safetensors file and JSON."""
    from beit.checkpoints.checkpointing import load_weights
    sd, config = load_weights(path)
    arch = (config or {}).get("architecture")
    if arch == BEIT_SEG:
        model = BeitSegmenter(**config["model_kwargs"], drop_path_rate=0.0)
    elif arch == SWIN_SEG:
        from beit.modeling.swin_segmenter import SwinSegmenter
        model = SwinSegmenter(**config["model_kwargs"], drop_path_rate=0.0)
    else:
        raise ValueError(f"{path} is not an exported segmenter (its JSON is missing or names another model)")
    model.load_state_dict(sd)
    return model.eval()
