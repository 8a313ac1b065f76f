"""Key layouts of BEiT checkpoints and the configs written beside them.

* Hugging Face transformers (``BeitModel`` / ``BeitForMaskedImageModeling`` / ``BeitForImageClassification``)
  names are mapped to the reference (unilm / timm ``Beit``) names by :func:`hf_to_reference` and back by
  :func:`reference_to_hf`; q/k/v are separate Linear layers there (no k bias), one fused ``qkv`` here.
* unilm's pretraining models (beit ``VisionTransformerForMaskedImageModeling``, beit2's ``...CLS`` with the
  CLS-pretraining branch) use our key names plus the derived ``rel_pos_bias.relative_position_index``:
  :func:`unilm_mim_state_dict` writes that layout, :func:`unilm_mim_kwargs` the constructor arguments.
* :func:`recorded_num_heads` reads the head count -- the one dimension a state dict without relative
  position tables cannot tell -- from a transformers ``config.json``, a timm ``config.json``
  (``model_args`` or a registered architecture) or unilm's saved ``args`` (its model name's size).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

_HF_BLOCK = {
    "attention.attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.attention.relative_position_bias.relative_position_index": "attn.relative_position_index",
    "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
    "layernorm_before.weight": "norm1.weight", "layernorm_before.bias": "norm1.bias",
    "layernorm_after.weight": "norm2.weight", "layernorm_after.bias": "norm2.bias",
    "intermediate.dense.weight": "mlp.fc1.weight", "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight", "output.dense.bias": "mlp.fc2.bias",
    "lambda_1": "gamma_1", "lambda_2": "gamma_2",
    "attention.attention.query.bias": "attn.q_bias", "attention.attention.value.bias": "attn.v_bias",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "encoder.relative_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
    "encoder.relative_position_bias.relative_position_index": "rel_pos_bias.relative_position_index",
    "pooler.layernorm.weight": "fc_norm.weight", "pooler.layernorm.bias": "fc_norm.bias",
}
_HF_HEADS = {"classifier.weight": "head.weight", "classifier.bias": "head.bias",
             "lm_head.weight": "lm_head.weight", "lm_head.bias": "lm_head.bias",
             "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
_QKV = ("query", "key", "value")


def is_hf_beit(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in sd)


def hf_to_reference(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers BEiT keys -> reference keys (the ``beit.`` prefix of the task models is removed)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        base = k.removeprefix("beit.")
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)$", base)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            q = re.match(r"attention\.attention\.(query|key|value)\.weight$", rest)
            if q:
                qkv.setdefault(i, {})[q.group(1)] = v
            elif rest in _HF_BLOCK:
                out[f"blocks.{i}.{_HF_BLOCK[rest]}"] = v
            else:
                out[k] = v          # unknown: reported as unexpected under its own name
        elif base in _HF_TOP:
            out[_HF_TOP[base]] = v
        elif base in _HF_HEADS:
            # BeitModel(use_mean_pooling=False).layernorm and the MIM model's own layernorm are both the final norm
            out[_HF_HEADS[base]] = v
        else:
            out[k] = v
    for i, parts in qkv.items():
        if set(parts) != set(_QKV):
            raise ValueError(f"transformers checkpoint: block {i} has attention weights {sorted(parts)}, "
                             "needs query, key and value")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts[n] for n in _QKV])
    return out


def reference_to_hf(sd: dict[str, torch.Tensor], prefix: str = "beit.") -> dict[str, torch.Tensor]:
    """Reference / timm ``Beit`` keys -> transformers keys (``prefix`` for the task models' encoder)."""
    top = {v: k for k, v in _HF_TOP.items()}
    block = {v: k for k, v in _HF_BLOCK.items()}
    heads = {"head.weight": "classifier.weight", "head.bias": "classifier.bias",
             "lm_head.weight": "lm_head.weight", "lm_head.bias": "lm_head.bias"}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith(("relative_position_index", "k_bias")):
            continue   # derived buffers
        m = re.match(r"blocks\.(\d+)\.(.+)$", k)
        if m:
            i, rest = m.group(1), m.group(2)
            b = f"{prefix}encoder.layer.{i}."
            if rest == "attn.qkv.weight":
                for name, part in zip(_QKV, v.chunk(3)):
                    out[f"{b}attention.attention.{name}.weight"] = part
            elif rest in block:
                out[b + block[rest]] = v
            else:
                raise ValueError(f"{k}: no transformers equivalent")
        elif k in top:
            out[prefix + top[k]] = v
        elif k in heads:
            out[heads[k]] = v
        elif k in ("norm.weight", "norm.bias"):
            out[prefix + "layernorm." + k.split(".")[1]] = v
        else:
            raise ValueError(f"{k}: no transformers equivalent")
    return out


# ------------------------------------------------------------------------------ unilm pretraining
UNILM_MIM_CLASSES = ("VisionTransformerForMaskedImageModeling", "VisionTransformerForMaskedImageModelingCLS")


def unilm_mim_state_dict(model) -> dict[str, torch.Tensor]:
    """A ``BeitPretrainModel``'s weights in unilm's pretraining layout: every key of ours (the same names) and the
    relative position index buffer unilm saves (timm keeps it out of the state dict)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    sd["rel_pos_bias.relative_position_index"] = model.rel_pos_bias.relative_position_index.detach().cpu().clone()
    return sd


def unilm_mim_kwargs(config: dict) -> tuple[str, dict]:
    """(unilm class name, its constructor arguments but ``norm_layer``: LayerNorm with eps 1e-6) that build the
    pretraining model of our ``BeitPretrainModel.config``: BEiT v1's, or beit2's with the CLS-pretraining branch."""
    kw = dict(img_size=config["img_size"], patch_size=config["patch_size"], in_chans=config.get("in_chans", 3),
              vocab_size=config["vocab_size"], embed_dim=config["embed_dim"], depth=config["depth"],
              num_heads=config["num_heads"], mlp_ratio=config["mlp_ratio"], qkv_bias=True,
              drop_path_rate=config["drop_path_rate"], init_values=config["init_values"] or None,
              use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
              init_std=config.get("init_std", 0.02))
    if not config.get("cls_pretraining"):
        return UNILM_MIM_CLASSES[0], kw
    kw.update(early_layers=config["early_layers"], head_layers=config["head_layers"],
              shared_lm_head=config["shared_lm_head"])
    return UNILM_MIM_CLASSES[1], kw


# ------------------------------------------------------------------------------------ head counts
_UNILM_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16), "huge": (1280, 16)}


def _timm_arch_heads(arch: str) -> int | None:
    import timm
    if arch not in timm.list_models():
        return None
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    blocks = getattr(model, "blocks", None)
    return int(blocks[0].attn.num_heads) if blocks is not None else None


def recorded_num_heads(weights_file: Path, checkpoint: object, embed_dim: int) -> tuple[int | None, str]:
    """(num_heads, where it came from) from a config beside ``weights_file`` or the checkpoint's ``args``;
    (None, why not) when nothing trustworthy records it."""
    cfg_file = weights_file.parent / "config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            return None, f"{cfg_file} is not valid JSON ({e})"
        if "num_attention_heads" in cfg:
            return int(cfg["num_attention_heads"]), f"{cfg_file} (transformers num_attention_heads)"
        args = cfg.get("model_args") or {}
        if "num_heads" in args:
            return int(args["num_heads"]), f"{cfg_file} (timm model_args.num_heads)"
        arch = cfg.get("architecture")
        if arch and not args.get("embed_dim"):
            heads = _timm_arch_heads(arch)
            if heads:
                return heads, f"{cfg_file} (timm architecture {arch})"
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    model_name = getattr(args, "model", None)
    if isinstance(model_name, str):
        for size, (width, heads) in _UNILM_SIZES.items():
            if re.search(rf"(^|_){size}(_|$)", model_name):
                if width == embed_dim:
                    return heads, f"the checkpoint's args.model {model_name!r}"
                return None, (f"the checkpoint's args.model {model_name!r} names a {width}-wide {size} model, "
                              f"but the weights are {embed_dim} wide")
        return None, f"the checkpoint's args.model {model_name!r} names no known size"
    return None, "no config.json beside the weights and no args record in the checkpoint"
