"""Export a fine-tuned model as timm-loadable safetensors + a config JSON.

The weights are the timm model's own state dict, so either of these loads them with no missing keys::

    timm.create_model(cfg["architecture"], pretrained=False, checkpoint_path="model.safetensors",
                      **cfg["model_kwargs"])
    timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_kwargs"],
                      pretrained_cfg_overlay=dict(file="model.safetensors", num_classes=cfg["num_classes"]))

CLI (re-export from a fine-tune run's newest checkpoint, e.g. with its EMA weights)::

    python -m beit.export --run_dir output/finetune --out exported/model.safetensors [--ema]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from beit.runtime.checkpointing import load_weights, save_weights


def _beit_kwargs(cfg, model: nn.Module) -> dict:
    pe = model.patch_embed
    return dict(img_size=pe.img_size[0], patch_size=pe.patch_size[0], in_chans=pe.proj.in_channels,
                embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=model.blocks[0].attn.num_heads,
                mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim,
                use_abs_pos_emb=False, use_rel_pos_bias=True, use_shared_rel_pos_bias=False,
                num_classes=model.num_classes, global_pool=model.global_pool,
                init_values=cfg.init_values)


def export_model(model: nn.Module, path: str | Path, cfg, class_names: list[str] | None = None,
                 metrics: dict | None = None) -> Path:
    """Write ``model`` (a timm classifier, or a LinearProbe) to ``path`` + ``<stem>.json``.

    A linear probe is exported as its frozen BEiT encoder with the probe's linear head, i.e. a
    plain timm Beit is NOT equivalent (the probe reads an intermediate block); its JSON says so and
    :func:`load_exported` rebuilds the probe.
    """
    from beit.modeling.classifier import BEIT_TIMM_NAME, LinearProbe
    probe_block = None
    if isinstance(model, LinearProbe):
        probe_block, model_sd = model.block, model.state_dict()
        model = model.encoder
    else:
        model_sd = model.state_dict()
    if cfg.model == "beit":
        arch, kwargs = BEIT_TIMM_NAME, _beit_kwargs(cfg, model)
    else:
        arch = cfg.model
        kwargs = dict(getattr(model, "create_kwargs", None) or dict(num_classes=cfg.num_classes, in_chans=cfg.in_chans))
    config = {
        "architecture": arch,
        "model_kwargs": kwargs,
        "num_classes": cfg.num_classes,
        "class_names": class_names,
        "input_size": [cfg.in_chans, cfg.img_size, cfg.img_size],
        "mean": list(cfg.mean), "std": list(cfg.std),
        "interpolation": cfg.interpolation, "crop_pct": cfg.crop_pct,
        "linear_probe_block": probe_block,
        "metrics": metrics or {},
        "timm_load": (f"timm.create_model({arch!r}, pretrained=False, checkpoint_path=<this file>, **model_kwargs)"
                      if probe_block is None else "beit.export.load_exported(<this file>)"),
    }
    return save_weights(model_sd, path, config)


def load_exported(path: str | Path) -> nn.Module:
    """Rebuild an exported model from ``path`` and its JSON (through timm; a probe as a LinearProbe)."""
    import timm
    from beit.modeling.classifier import LinearProbe
    sd, config = load_weights(path)
    if config is None:
        raise FileNotFoundError(f"{Path(path).with_suffix('.json')} (the export's config) is missing")
    kwargs = dict(config["model_kwargs"])
    if config.get("linear_probe_block"):
        enc = timm.create_model(config["architecture"], pretrained=False, **kwargs)
        model = LinearProbe(enc, config["num_classes"], config["linear_probe_block"])
        model.load_state_dict(sd)
        return model.eval()
    model = timm.create_model(config["architecture"], pretrained=False, checkpoint_path=str(path), **kwargs)
    return model.eval()


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", required=True, help="a beit.finetune output_dir")
    p.add_argument("--out", required=True, help="output .safetensors path (a .json is written beside it)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights of the newest checkpoint")
    args = p.parse_args(argv)
    from safetensors.torch import load_file

    from beit.runtime.checkpointing import find_latest_complete
    from beit.config import load_yaml
    from beit.modeling.build import build_model
    from beit.options.finetune import FinetuneConfig
    run = Path(args.run_dir)
    ckpt = find_latest_complete(run)
    if ckpt is None:
        raise SystemExit(f"{run} has no complete checkpoint (checkpoints/step_*/COMPLETE)")
    cfg = load_yaml(FinetuneConfig, run / "config.yaml")
    cfg.init = ""  # the checkpoint supplies every weight
    model = build_model(cfg, cfg.num_classes, log=lambda m: None)
    if args.ema:
        ema_files = sorted(ckpt.glob("custom_checkpoint_*.*"))
        if not ema_files:
            raise SystemExit(f"{ckpt} holds no EMA weights (was the run started with --model_ema true?)")
        state = torch.load(ema_files[0], map_location="cpu", weights_only=True)
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    else:
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    final = run / "final.json"
    metrics = json.loads(final.read_text()) if final.is_file() else None
    names = (metrics or {}).get("class_names")
    out = export_model(model, args.out, cfg, class_names=names, metrics=metrics)
    print(f"exported {ckpt} -> {out} (+ {out.with_suffix('.json')})")
    return out


if __name__ == "__main__":
    main()
