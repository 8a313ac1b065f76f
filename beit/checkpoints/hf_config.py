"""What a transformers BEiT ``config.json`` says about the math of its weights, field by field.

``BeitConfig`` fields and how loading into timm's ``Beit`` treats them:

* ``layer_norm_eps`` (transformers' default 1e-12; BEiT, unilm and timm use 1e-6): honoured, every LayerNorm
  of the encoder is built with it (on a 2-block model the logits move by ~1e-5 to 1e-4 otherwise).
* ``use_mean_pooling`` (default true): a classifier's pooling is part of its function, so a classifier
  checkpoint (``classifier.*``) with ``false`` is built with CLS pooling after the final norm (timm
  ``global_pool="token"``); for encoders and MIM checkpoints pooling is the fine-tune recipe's choice.
* ``hidden_act`` (default ``gelu``, exact erf GELU as timm's ``Beit``): any other activation is refused.
* ``head_dim`` (absent by default: hidden_size / heads): any other value is refused.
* ``layer_scale_init_value``, ``use_absolute_position_embeddings``, ``use_relative_position_bias``,
  ``use_shared_relative_position_bias``, ``use_mask_token``, sizes: the tensors themselves say it
  (``lambda_1``, ``position_embeddings``, the position tables; see checkpoint_loading.infer_beit_layout).
* q/k/v: transformers' BEiT always has a query and a value bias and no key bias, as timm's fused ``qkv``.
* dropout / drop path rates: training regularisation, set by the fine-tune options, not part of the function.
* segmentation heads (``pool_scales``, ``auxiliary_*``, ``out_indices``, ``add_fpn``): not loaded.
"""
from __future__ import annotations

import json
from pathlib import Path

TRANSFORMERS_DEFAULTS = dict(layer_norm_eps=1e-12, hidden_act="gelu", use_mean_pooling=True)


def read_config(weights_file: Path) -> tuple[dict, str]:
    """(config.json beside ``weights_file`` or {}, a description of where the values come from)."""
    path = weights_file.parent / "config.json"
    if not path.is_file():
        return {}, f"no config.json beside {weights_file}: transformers' defaults assumed"
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it holds the model's settings "
                         "(layer_norm_eps, ...)") from None


def hf_settings(weights_file: Path, has_classifier: bool) -> dict:
    """``{"layer_norm_eps", "pooling" (None unless a classifier's), "source"}`` of a transformers BEiT checkpoint;
    raises ValueError for settings timm's ``Beit`` cannot compute."""
    raw, source = read_config(weights_file)
    cfg = {**TRANSFORMERS_DEFAULTS, **raw}
    if cfg["hidden_act"] != "gelu":
        raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r}; timm's BEiT (which this fine-tunes) has an "
                         "exact GELU MLP ('gelu'), so these weights would compute something else")
    heads, width = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    if cfg.get("head_dim") and heads and width and cfg["head_dim"] * heads != width:
        raise ValueError(f"{source}: head_dim {cfg['head_dim']} x {heads} heads != hidden_size {width}; timm's BEiT "
                         "splits the width evenly over the heads")
    pooling = ("avg" if cfg["use_mean_pooling"] else "token") if has_classifier else None
    return dict(layer_norm_eps=float(cfg["layer_norm_eps"]), pooling=pooling, source=source)
