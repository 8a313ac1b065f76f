"""BEiT v2's VQ-KD tokenizer: ViT encoder -> Linear-Tanh-Linear -> l2-normalised code, nearest codeword.

Input pre-processing follows unilm's ``VQKD.pre_process`` for its ``process_type``: ``default`` (what the
released tokenizers use, and unilm's default) maps [0, 1] pixels to [-1, 1]; ``imagenet_norm`` applies
ImageNet mean/std; ``dall-e`` passes the pixels unchanged. A training checkpoint's ``args.process_type``
is honoured. The nearest codeword is unilm's: argmin of the squared l2 distance to the stored codebook rows.

Loads the official ``vqkd_encoder_*.pth`` state dicts (unilm ``beit2`` key names, optionally under a
``model`` or ``state_dict`` key) with a weights-only ``torch.load``, or safetensors. The encoder is
a timm ``VisionTransformer`` (mean-pooling variant: no final norm, ``fc_norm`` on patch tokens).
The official names map onto timm's as follows: ``attn.q_bias``/``attn.v_bias`` -> ``attn.qkv.bias``
(k bias zero), ``gamma_1``/``gamma_2`` -> ``ls1.gamma``/``ls2.gamma``, ``quantize.embedding.weight``
-> ``codebook``; the VQ-KD decoder, EMA statistics and teacher are not needed to tokenize.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from beit.tokenizers.base import VisualTokenizer, resolve_stem

PROCESS_TYPES = ("default", "imagenet_norm", "dall-e")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORED_PREFIXES = ("decoder.", "decode_task_layer.", "quantize.embedding.cluster_size", "quantize.embedding.embed_avg",
                    "quantize.embedding.initted", "quantize.cluster_size", "loss", "teacher", "scaling")


class VQKDTokenizer(VisualTokenizer):
    """VQ-KD encoder + codebook (defaults: ViT-B/16 at 224 px, 8192 x 32 codebook)."""

    kind = "vqkd"

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, n_code: int = 8192, code_dim: int = 32,
                 init_values: float | None = None, interpolation: str = "bicubic", process_type: str = "default"):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if process_type not in PROCESS_TYPES:
            raise ValueError(f"process_type must be one of {PROCESS_TYPES} (unilm VQKD.pre_process), got "
                             f"{process_type!r}")
        self.cfg = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                        num_heads=num_heads, mlp_ratio=mlp_ratio, n_code=n_code, code_dim=code_dim,
                        init_values=init_values, interpolation=interpolation, process_type=process_type)
        self.process_type = process_type
        self.encoder = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0,
                                         global_pool="avg", init_values=init_values)
        self.encode_task_layer = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Linear(embed_dim,
                                                                                                     code_dim))
        self.register_buffer("codebook", F.normalize(torch.randn(n_code, code_dim), dim=-1))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.vocab_size, self.input_size = int(n_code), int(img_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.interpolation = interpolation
        self.freeze()

    def get_config(self) -> dict[str, Any]:
        return dict(self.cfg)

    def pre_process(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the encoder's input, as unilm's ``VQKD.pre_process`` does for ``process_type``."""
        if self.process_type == "default":
            return images * 255.0 / 127.5 - 1.0
        if self.process_type == "imagenet_norm":
            return (images - self.mean) / self.std
        return images

    def code_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """l2-normalised 32-d (code_dim) vectors per patch: [B, h*w, code_dim]."""
        x = self.pre_process(images)
        feats = self.encoder.forward_features(x)[:, self.encoder.num_prefix_tokens:]
        return F.normalize(self.encode_task_layer(self.encoder.fc_norm(feats)), dim=-1)

    def _tokenize(self, images: torch.Tensor) -> torch.Tensor:
        z = self.code_vectors(images)
        # squared l2 distance up to the |z|^2 term, which is the same for every code
        d = self.codebook.pow(2).sum(-1) - 2.0 * z @ self.codebook.T
        return d.argmin(-1).view(images.shape[0], *self.grid_size)


# ---- the official state-dict format ---------------------------------------------------------------
def _unwrap(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict"):
        if key in sd and isinstance(sd[key], dict):
            return sd[key]
    return sd


def infer_config(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """Architecture of an official VQ-KD state dict from its tensor shapes."""
    need = ("encoder.patch_embed.proj.weight", "encoder.pos_embed", "quantize.embedding.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not a VQ-KD state dict (unilm beit2 format): missing {missing}; "
                         f"found keys like {sorted(sd)[:6]}")
    w = sd["encoder.patch_embed.proj.weight"]
    embed_dim, patch = int(w.shape[0]), int(w.shape[-1])
    n_pos = int(sd["encoder.pos_embed"].shape[1]) - 1
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        raise ValueError(f"pos_embed has {n_pos} patch positions, not a square grid")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.blocks\.(\d+)\.", k)))
    mlp_hidden = int(sd["encoder.blocks.0.mlp.fc1.weight"].shape[0])
    n_code, code_dim = (int(s) for s in sd["quantize.embedding.weight"].shape)
    return dict(img_size=side * patch, patch_size=patch, embed_dim=embed_dim, depth=depth,
                num_heads=num_heads or max(1, embed_dim // 64), mlp_ratio=mlp_hidden / embed_dim,
                n_code=n_code, code_dim=code_dim,
                init_values=1.0 if "encoder.blocks.0.gamma_1" in sd else None)


def convert_official_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """unilm beit2 VQ-KD keys -> VQKDTokenizer keys (see module docstring)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in sd.items():
        if k.startswith(IGNORED_PREFIXES) or k.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        if k == "quantize.embedding.weight":
            out["codebook"] = v.float()  # as stored: unilm's nearest-code search uses the rows unchanged
        elif k.startswith("encode_task_layer."):
            out[k] = v
        elif k.startswith("encoder."):
            k2 = k.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
            if k2 == "encoder.norm.weight" or k2 == "encoder.norm.bias" or k2.startswith("encoder.head."):
                unknown.append(k)  # only the mean-pooling (fc_norm) encoder of the tokenizers is supported
            else:
                out[k2] = v
        else:
            unknown.append(k)
    for k in sd:
        m = re.match(r"(encoder\.blocks\.\d+\.attn\.)q_bias$", k)
        if m:
            q, v = sd[k], sd[m.group(1) + "v_bias"]
            out[m.group(1) + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    if unknown:
        raise ValueError(f"unexpected keys for a VQ-KD tokenizer: {unknown[:8]}")
    return {k: v.float() for k, v in out.items()}


def read_state_dict(path: Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, options recorded beside it): a training checkpoint's ``args`` give ``process_type``."""
    from beit.checkpoints.safe_pickle import load_torch_file
    obj = load_torch_file(path, trust_pickle=trust_pickle)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    recorded = {}
    args = obj.get("args")
    if getattr(args, "process_type", None) is not None:
        recorded["process_type"] = args.process_type
    return _unwrap(obj), recorded


def _written_beside(p: Path, num_heads: int | None) -> dict[str, Any]:
    """What ``beit tokenizer train vqkd`` wrote beside its unilm-layout file (``<stem>.json``): the head count
    (not readable from the tensors), process type and interpolation."""
    side = p.with_suffix(".json")
    if p.suffix == ".json" or not side.is_file():
        return {}
    try:
        meta = json.loads(side.read_text())
    except ValueError:
        return {}
    if not isinstance(meta, dict) or meta.get("kind") != "vqkd" or not isinstance(meta.get("config"), dict):
        return {}
    keep = ("process_type", "interpolation") + (() if num_heads else ("num_heads",))
    return {k: meta["config"][k] for k in keep if k in meta["config"]}


def load_vqkd(path: str | Path | None = None, *, num_heads: int | None = None, trust_pickle: bool = False,
              **overrides: Any) -> VQKDTokenizer:
    """``load_tokenizer("vqkd", path)``: an official ``vqkd_encoder_*.pth`` (or its safetensors), or our saved pair."""
    if path is None:
        raise ValueError("the VQ-KD tokenizer needs BEiT v2's weights, e.g. vqkd_encoder_base_decoder_1x768x12_clip "
                         "from https://github.com/microsoft/unilm/tree/master/beit2 (TOKENIZER.md); pass the "
                         ".pth path: load_tokenizer('vqkd', 'vqkd_encoder_base_decoder_1x768x12_clip-d93179da.pth')")
    p = Path(path)
    stem = resolve_stem(p)
    pair = stem.with_suffix(".json").is_file() and stem.with_suffix(".safetensors").is_file()
    if pair and not (p.is_file() and p.suffix not in (".json", ".safetensors")):
        if overrides or num_heads:
            raise TypeError("options cannot change a saved VQ-KD tokenizer; edit its JSON instead")
        return VQKDTokenizer.load(stem)
    if not p.is_file():
        raise FileNotFoundError(f"VQ-KD weights {p} do not exist")
    sd, recorded = read_state_dict(p, trust_pickle)
    cfg = {**infer_config(sd, num_heads), **recorded, **_written_beside(p, num_heads), **overrides}
    tok = VQKDTokenizer(**cfg)
    converted = convert_official_state_dict(sd)
    missing, unexpected = tok.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"{p}: weights do not fit the inferred architecture {cfg}: missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")
    return tok.freeze()
