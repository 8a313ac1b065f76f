"""Export a fine-tuned BEiT classifier as a Hugging Face transformers folder: ``config.json`` +
``model.safetensors`` (transformers key names, labels in ``id2label``) + ``preprocessor_config.json``;
``BeitForImageClassification.from_pretrained`` loads it and gives the same logits."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from beit.export.timm_export import beit_kwargs_of


def export_hf(model: nn.Module, out_dir: str | Path, cfg, class_names: list[str] | None = None) -> Path:
    """Write ``model`` (a fine-tuned BEiT classifier) as a transformers ``BeitForImageClassification`` folder."""
    from beit.modeling.classifier import LinearProbe
    from beit.checkpoints.hf_import import transformers_names
    from beit.checkpoints.formats import reference_to_hf
    if isinstance(model, LinearProbe) or cfg.model != "beit":
        raise ValueError("--format hf exports a fine-tuned BEiT classifier (not a linear probe or a timm baseline); "
                         "use --format timm")
    if model.global_pool != "avg":
        raise ValueError(f"--format hf: transformers' BEiT pools by mean or CLS+final norm; got {model.global_pool!r}")
    BeitConfig, BeitForImageClassification, BeitImageProcessor = transformers_names(
        "BeitConfig", "BeitForImageClassification", "BeitImageProcessor")
    kw = beit_kwargs_of(cfg, model)
    names = list(class_names) if class_names else [str(i) for i in range(model.num_classes)]
    config = BeitConfig(
        image_size=kw["img_size"], patch_size=kw["patch_size"], num_channels=kw["in_chans"],
        hidden_size=kw["embed_dim"], num_hidden_layers=kw["depth"], num_attention_heads=kw["num_heads"],
        intermediate_size=model.blocks[0].mlp.fc1.out_features, hidden_act="gelu", layer_norm_eps=1e-6,
        use_absolute_position_embeddings=kw["use_abs_pos_emb"], use_relative_position_bias=kw["use_rel_pos_bias"],
        use_shared_relative_position_bias=False, use_mean_pooling=True, use_mask_token=False,
        layer_scale_init_value=kw["init_values"] or 0.0, num_labels=model.num_classes,
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    out = Path(out_dir)
    BeitForImageClassification(config).save_pretrained(out)   # config.json (+ weights, replaced next)
    from safetensors.torch import save_file
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    # transformers' on-disk key names (every version reads them; 5.x renames in memory on load)
    save_file({k: v.contiguous() for k, v in reference_to_hf(model.state_dict()).items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    _, info = BeitForImageClassification.from_pretrained(out, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not k.endswith("relative_position_index")]
    if missing or info["unexpected_keys"]:
        raise ValueError(f"--format hf: transformers' BEiT does not take these weights: missing {missing[:8]}, "
                         f"unexpected {sorted(info['unexpected_keys'])[:8]}")
    scale = int(cfg.image_size / cfg.crop_pct)
    BeitImageProcessor(do_resize=True, size={"height": scale, "width": scale}, resample=_pil_resample(cfg.interpolation),
                       do_center_crop=True, crop_size={"height": cfg.image_size, "width": cfg.image_size},
                       do_normalize=True, image_mean=list(cfg.mean), image_std=list(cfg.std),
                       do_reduce_labels=False).save_pretrained(out)
    return out


def _pil_resample(name: str) -> int:
    from PIL import Image
    return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS}.get(name, Image.BICUBIC)
