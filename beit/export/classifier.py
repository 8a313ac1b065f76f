"""Export a fine-tuned classifier for timm (safetensors + a config JSON, loaded back by ``load_exported``) or
Hugging Face transformers (a folder).

timm: the weights are the timm model's own state dict; the JSON holds the timm entrypoint (a template:
``model_kwargs`` set every dimension, so ``architecture`` names the real size, e.g. ``beit_e192_d4_h3_p8_32``),
a timm ``pretrained_cfg`` (input size, mean/std, interpolation, crop_pct, num_classes, label names) and a BEiT
encoder's ``layer_norm_eps`` (timm's BEiT builds 1e-6 and takes no argument for it: a model fine-tuned from a
transformers checkpoint keeps that file's 1e-12, which ``load_exported`` sets again). Loaded like this,
``timm.data.resolve_data_config`` and ``timm.data.create_transform`` give exactly the fine-tune run's evaluation
preprocessing::

    conf = json.load(open("model.json"))
    model = timm.create_model(conf["timm_entrypoint"], pretrained=True, **conf["model_kwargs"],
                              pretrained_cfg_overlay=dict(conf["pretrained_cfg"], file="model.safetensors"))
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))

Hugging Face (``export_hf``): a folder with ``config.json`` (the model's own ``layer_norm_eps`` and pooling, never
transformers' defaults) + ``model.safetensors`` (transformers key names, labels
in ``id2label``) + ``preprocessor_config.json``; ``BeitForImageClassification.from_pretrained`` loads it and gives
the same logits.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from beit.checkpoints.checkpointing import load_weights, save_weights


def beit_kwargs_of(cfg, model: nn.Module) -> dict:
    """timm ``Beit`` constructor arguments that rebuild ``model`` exactly (size and layout read off it)."""
    pe, block = model.patch_embed, model.blocks[0]
    return dict(img_size=pe.img_size[0], patch_size=pe.patch_size[0], in_chans=pe.proj.in_channels,
                embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=block.attn.num_heads,
                mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
                use_abs_pos_emb=model.pos_embed is not None,
                use_rel_pos_bias=block.attn.relative_position_bias_table is not None, use_shared_rel_pos_bias=False,
                num_classes=model.num_classes, global_pool=model.global_pool,
                init_values=(cfg.init_values or 0.1) if block.gamma_1 is not None else 0.0)  # timm drops None


def beit_arch_name(kw: dict) -> str:
    """timm's registered name when the dims are exactly one of its BEiT models, else a name that says the size."""
    import timm
    for name in timm.list_models("beit_*"):
        size = "base" if "_base_" in name else "large" if "_large_" in name else None
        ref = {"base": (768, 12, 12), "large": (1024, 24, 16)}.get(size)
        if ref and ref == (kw["embed_dim"], kw["depth"], kw["num_heads"]) and \
                name.endswith(f"patch{kw['patch_size']}_{kw['img_size']}"):
            return name
    return f"beit_e{kw['embed_dim']}_d{kw['depth']}_h{kw['num_heads']}_p{kw['patch_size']}_{kw['img_size']}"


def timm_pretrained_cfg(cfg, class_names: list[str] | None, num_classes: int) -> dict:
    """What timm's data config is resolved from: the fine-tune run's evaluation preprocessing."""
    return dict(input_size=(cfg.in_chans, cfg.image_size, cfg.image_size), fixed_input_size=True,
                mean=tuple(cfg.mean), std=tuple(cfg.std), interpolation=cfg.interpolation,
                crop_pct=cfg.crop_pct, crop_mode="center", num_classes=num_classes,
                label_names=list(class_names) if class_names else None,
                first_conv="patch_embed.proj", classifier="head")


def export_model(model: nn.Module, path: str | Path, cfg, class_names: list[str] | None = None,
                 metrics: dict | None = None, provenance: dict | None = None) -> Path:
    """Write ``model`` (a timm classifier, or a LinearProbe) to ``path`` + ``<stem>.json`` (with ``provenance``,
    what the model card is written from: ``beit.export.provenance``).

    A linear probe is exported as its frozen BEiT encoder with the probe's linear head, i.e. a
    plain timm Beit is NOT equivalent (the probe reads an intermediate block); its JSON says so and
    :func:`load_exported` rebuilds the probe.
    """
    from beit.modeling.backbones import backbone_for
    from beit.modeling.classifier import LinearProbe, layer_norm_eps_of
    probe_block = None
    if isinstance(model, LinearProbe):
        probe_block, model_sd = model.block, model.state_dict()
        model = model.encoder
    else:
        model_sd = model.state_dict()
    entry, arch, kwargs = backbone_for(cfg.model).timm_export(cfg, model)
    eps = layer_norm_eps_of(model) if cfg.model == "beit" else None
    pcfg = timm_pretrained_cfg(cfg, class_names, cfg.num_classes)
    config = {
        "architecture": arch,
        "timm_entrypoint": entry,
        "model_kwargs": kwargs,
        "pretrained_cfg": pcfg,
        "num_classes": cfg.num_classes,
        "class_names": class_names,
        "input_size": [cfg.in_chans, cfg.image_size, cfg.image_size],
        "mean": list(cfg.mean), "std": list(cfg.std),
        "interpolation": cfg.interpolation, "crop_pct": cfg.crop_pct,
        "linear_probe_block": probe_block,
        "layer_norm_eps": eps,
        "metrics": metrics or {},
        "provenance": provenance,
        "timm_load": (f"timm.create_model({entry!r}, pretrained=True, **model_kwargs, "
                      "pretrained_cfg_overlay=dict(pretrained_cfg, file=<this file>))"
                      + (f", then set every LayerNorm's eps to {eps:g} (or beit.export.load_exported(<this file>))"
                         if eps not in (None, 1e-6) else "")
                      if probe_block is None else "beit.export.load_exported(<this file>)"),
    }
    return save_weights(model_sd, path, config)


def load_exported(path: str | Path) -> nn.Module:
    """Rebuild an exported model from ``path`` and its JSON (through timm; a probe as a LinearProbe)."""
    import timm

    from beit.modeling.classifier import LinearProbe, set_layer_norm_eps
    sd, config = load_weights(path)
    if config is None:
        raise FileNotFoundError(f"{Path(path).with_suffix('.json')} (the export's config) is missing")
    kwargs = dict(config["model_kwargs"])
    entry = config.get("timm_entrypoint", config["architecture"])
    eps = config.get("layer_norm_eps")
    if config.get("linear_probe_block"):
        enc = timm.create_model(entry, pretrained=False, **kwargs)
        if eps:
            set_layer_norm_eps(enc, eps)
        model = LinearProbe(enc, config["num_classes"], config["linear_probe_block"])
        model.load_state_dict(sd)
        return model.eval()
    model = timm.create_model(entry, pretrained=False, checkpoint_path=str(path), **kwargs)
    if eps:
        set_layer_norm_eps(model, eps)
    if config.get("pretrained_cfg"):
        model.pretrained_cfg = dict(model.pretrained_cfg, **config["pretrained_cfg"])
    return model.eval()


def export_hf(model: nn.Module, out_dir: str | Path, cfg, class_names: list[str] | None = None) -> Path:
    """Write ``model`` (a fine-tuned BEiT classifier) as a transformers ``BeitForImageClassification`` folder."""
    from timm.models.beit import Beit

    from beit.checkpoints.formats import reference_to_hf
    from beit.checkpoints.hf_import import transformers_names
    from beit.modeling.classifier import layer_norm_eps_of
    if not isinstance(model, Beit):
        raise ValueError("--format hf exports a fine-tuned BEiT classifier (not a linear probe or a timm baseline); "
                         "use --format timm")
    if model.global_pool not in ("avg", "token"):
        raise ValueError(f"--format hf: transformers' BEiT pools by mean or CLS+final norm; got {model.global_pool!r}")
    BeitConfig, BeitForImageClassification, BeitImageProcessor = transformers_names(
        "BeitConfig", "BeitForImageClassification", "BeitImageProcessor")
    kw = beit_kwargs_of(cfg, model)
    names = list(class_names) if class_names else [str(i) for i in range(model.num_classes)]
    config = BeitConfig(
        image_size=kw["img_size"], patch_size=kw["patch_size"], num_channels=kw["in_chans"],
        hidden_size=kw["embed_dim"], num_hidden_layers=kw["depth"], num_attention_heads=kw["num_heads"],
        intermediate_size=model.blocks[0].mlp.fc1.out_features, hidden_act="gelu",
        layer_norm_eps=layer_norm_eps_of(model),
        use_absolute_position_embeddings=kw["use_abs_pos_emb"], use_relative_position_bias=kw["use_rel_pos_bias"],
        use_shared_relative_position_bias=False, use_mean_pooling=model.global_pool == "avg", use_mask_token=False,
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
    BeitImageProcessor(do_resize=True, size={"height": scale, "width": scale},
                       resample=_pil_resample(cfg.interpolation),
                       do_center_crop=True, crop_size={"height": cfg.image_size, "width": cfg.image_size},
                       do_normalize=True, image_mean=list(cfg.mean), image_std=list(cfg.std),
                       do_reduce_labels=False).save_pretrained(out)
    return out


def _pil_resample(name: str) -> int:
    from PIL import Image
    return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS}.get(name, Image.BICUBIC)


def model_of_run(run_dir: str | Path, ema: bool = False, trust_pickle: bool = False):
    """(model, config, checkpoint folder): a fine-tune run's model rebuilt from its config.yaml with the weights
    of its newest complete checkpoint (the EMA weights with ``ema``). A missing piece ends with SystemExit."""
    from safetensors.torch import load_file

    from beit.checkpoints.checkpointing import find_latest_complete
    from beit.checkpoints.safe_pickle import load_torch_file
    from beit.config import load_yaml
    from beit.options.finetune import FinetuneConfig
    from beit.tasks import build_model
    run = Path(run_dir)
    ckpt = find_latest_complete(run)
    if ckpt is None:
        raise SystemExit(f"{run} has no complete checkpoint (checkpoints/step_*/COMPLETE)")
    cfg = load_yaml(FinetuneConfig, run / "config.yaml")
    # the checkpoint supplies every weight (the returned config keeps the run's --init: the model card names it)
    model = build_model(dataclasses.replace(cfg, init=""), cfg.num_classes, log=lambda m: None)
    if ema:
        ema_files = sorted(ckpt.glob("custom_checkpoint_*.*"))
        if not ema_files:
            raise SystemExit(f"{ckpt} holds no EMA weights (was the run started with --model_ema true?)")
        try:
            state = load_torch_file(ema_files[0], trust_pickle=trust_pickle)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    else:
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    return model, cfg, ckpt
