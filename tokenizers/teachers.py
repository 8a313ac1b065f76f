"""Teachers for VQ-KD: any model a user has, behind one interface.

``teacher = load_teacher(kind, path, grid=(h, w), ...)``; ``teacher(images)`` takes float images
[B, 3, S, S] in [0, 1] (any S) and returns its features [B, h, w, C] on the tokenizer's grid. Each teacher
applies its own preprocessing (resize to its input size, its mean/std) and is frozen (eval, no grad).

Kinds (``TEACHER_KINDS``):
  hf    a Hugging Face folder (``save_pretrained``): CLIP (``CLIPModel`` or a CLIP vision model; the features
        are unilm's CLIP target: ``post_layernorm`` of the patch tokens times the visual projection when the
        folder has one), DINO (``ViTModel``) or DINOv2 (with or without registers): the last layer's normed
        patch tokens. Mean/std from ``preprocessor_config.json``, else the model family's.
  timm  a timm model name (``model``, with ``model_kwargs`` for a non-standard size) plus a local checkpoint
        (safetensors, or a weights-only ``.pth``, read through timm's own pretrained-file path):
        ``forward_features`` (patch tokens without prefix tokens, ``fc_norm`` applied for mean-pooling
        models; feature maps NHWC or NCHW). Mean/std from the model's timm config.
  run   our own run folder: a pretraining run of any registered backbone (BEiT, Swin, ViT; ``pretrained.safetensors``,
        rebuilt from the options saved beside it: the encoder's features on its patch / token grid) or a fine-tune
        run (``model.safetensors`` + its JSON; a timm model as above).

Grid: a teacher that can take any input size (HF ViT / CLIP / DINOv2) is fed ``grid x its patch`` px, so its
patch grid is the tokenizer's. Otherwise (or with ``input_size`` set) a feature map of another size is
resampled to the grid (bilinear), or refused with a message when ``resample`` is False.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


class Teacher(nn.Module):
    """A frozen feature model with its preprocessing; ``forward(images in [0,1]) -> [B, h, w, C]``.

    ``features`` maps normalised [B, 3, input_size, input_size] to [B, h0, w0, C]; the native grid
    (h0, w0) and C are measured with one forward at construction."""

    def __init__(self, features: nn.Module, *, name: str, input_size: int, mean, std, grid: tuple[int, int],
                 resample: bool = True, interpolation: str = "bicubic"):
        super().__init__()
        self.features, self.name = features.eval().requires_grad_(False), name
        self.input_size, self.interpolation, self.grid = int(input_size), interpolation, tuple(grid)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            out = self.features(torch.zeros(1, 3, self.input_size, self.input_size))
        if out.ndim != 4:
            raise ValueError(f"teacher {name} gives features of shape {tuple(out.shape)} at {self.input_size} px, "
                             "not a spatial map [B, h, w, C]: VQ-KD needs one feature vector per patch")
        self.native_grid, self.dim = (int(out.shape[1]), int(out.shape[2])), int(out.shape[3])
        if self.native_grid != self.grid and not resample:
            raise ValueError(
                f"teacher {name} gives a {self.native_grid[0]}x{self.native_grid[1]} feature map at its "
                f"{self.input_size} px input, the tokenizer's grid is {self.grid[0]}x{self.grid[1]}: pass "
                f"--teacher_input_size with {self.grid[0]} x the teacher's patch size, or --teacher_resample true "
                "to resample its features to the grid")

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # always frozen

    def describe(self) -> str:
        how = "" if self.native_grid == self.grid else \
            f", resampled from {self.native_grid[0]}x{self.native_grid[1]}"
        return f"{self.name}: {self.input_size} px in, {self.grid[0]}x{self.grid[1]}x{self.dim} features{how}"

    def fingerprint(self) -> str:
        """Hash of the teacher's weights (a resumed run must keep its teacher)."""
        h = hashlib.sha256(self.name.encode())
        for k, v in sorted(self.features.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size,) * 2, mode=self.interpolation, align_corners=False,
                              antialias=True).clamp_(0, 1)
        feats = self.features((x - self.mean) / self.std).float()
        if tuple(feats.shape[1:3]) != self.grid:
            feats = F.interpolate(feats.permute(0, 3, 1, 2), size=self.grid, mode="bilinear", align_corners=False,
                                  antialias=True).permute(0, 2, 3, 1)
        return feats


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Patch tokens [B, N, C] -> [B, h, w, C] (``grid``, else the square side sqrt(N))."""
    b, n, c = tokens.shape
    if grid is None or grid[0] * grid[1] != n:
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"{n} patch tokens do not form a square grid")
        grid = (side, side)
    return tokens.reshape(b, grid[0], grid[1], c)


# ---- Hugging Face ----------------------------------------------------------------------------------
class HFClipFeatures(nn.Module):
    """unilm's CLIP target: post-layernorm of the patch tokens, times the visual projection (if any)."""

    def __init__(self, vision: nn.Module, projection: nn.Module | None):
        super().__init__()
        self.vision, self.projection = vision, projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.vision(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
        h = self.vision.post_layernorm(h)
        return tokens_to_grid(self.projection(h) if self.projection is not None else h)


class HFViTFeatures(nn.Module):
    """DINO (ViTModel) / DINOv2: the last layer's normed patch tokens (after CLS and register tokens)."""

    def __init__(self, model: nn.Module, prefix: int, interpolate: bool):
        super().__init__()
        self.model, self.prefix, self.interpolate = model, prefix, interpolate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kw = {"interpolate_pos_encoding": True} if self.interpolate else {}
        return tokens_to_grid(self.model(pixel_values=x, **kw).last_hidden_state[:, self.prefix:])


def _hf_weight_names(folder: Path) -> set[str]:
    """Tensor names of a save_pretrained folder (safetensors, sharded or not), read without loading them."""
    from safetensors import safe_open
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    names: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names |= set(st.keys())
    return names


HF_TYPES = ("clip", "clip_vision_model", "vit", "dinov2", "dinov2_with_registers")


def load_hf_teacher(path: str | Path, *, grid, input_size: int = 0, resample: bool = True, **_) -> Teacher:
    from beit.checkpoints.hf_import import transformers_names
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--teacher_path {folder}: no config.json there (a Hugging Face save_pretrained "
                                "folder is expected for --teacher hf)")
    config = json.loads((folder / "config.json").read_text())
    mtype = config.get("model_type")
    if mtype not in HF_TYPES:
        raise ValueError(f"--teacher_path {folder} holds a {mtype!r} model; --teacher hf takes {list(HF_TYPES)} "
                         "(CLIP, DINO ViT, DINOv2); for another model use --teacher timm or your own run")
    if mtype == "clip":
        (cls,) = transformers_names("CLIPModel")
        model = cls.from_pretrained(folder)
        features, vcfg = HFClipFeatures(model.vision_model, model.visual_projection), model.config.vision_config
        family = OPENAI_CLIP
    elif mtype == "clip_vision_model":
        has_proj = any(k.startswith("visual_projection.") for k in _hf_weight_names(folder))
        (cls,) = transformers_names("CLIPVisionModelWithProjection" if has_proj else "CLIPVisionModel")
        model = cls.from_pretrained(folder)
        features = HFClipFeatures(getattr(model, "vision_model", model), model.visual_projection if has_proj else None)
        vcfg, family = model.config, OPENAI_CLIP
    else:
        name = {"vit": "ViTModel", "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}[mtype]
        (cls,) = transformers_names(name)
        model = cls.from_pretrained(folder, **({"add_pooling_layer": False} if mtype == "vit" else {}))
        vcfg, family = model.config, IMAGENET
        features = HFViTFeatures(model, 1 + int(getattr(vcfg, "num_register_tokens", 0) or 0), mtype == "vit")
    mean, std = family
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
    size = input_size or grid[0] * int(vcfg.patch_size)
    return Teacher(features, name=f"{type(model).__name__} from {folder}", input_size=size, mean=mean, std=std,
                   grid=grid, resample=resample)


# ---- timm (and our fine-tuned models, which are timm models) ---------------------------------------
class TimmFeatures(nn.Module):
    """``forward_features`` of a timm model as [B, h, w, C] (see module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        norm, fc_norm = getattr(model, "norm", None), getattr(model, "fc_norm", None)
        self.fc_norm = fc_norm if isinstance(norm, nn.Identity) and isinstance(fc_norm, nn.LayerNorm) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_features(x)
        if out.ndim == 3:
            tokens = out[:, int(getattr(self.model, "num_prefix_tokens", 0)):]
            return tokens_to_grid(self.fc_norm(tokens) if self.fc_norm is not None else tokens)
        if out.ndim == 4 and getattr(self.model, "output_fmt", "NCHW") != "NHWC":
            return out.permute(0, 2, 3, 1)
        return out


def _timm_teacher(model: nn.Module, name: str, *, grid, input_size: int, resample: bool, cfg: dict) -> Teacher:
    from beit.modeling.classifier import LinearProbe
    if isinstance(model, LinearProbe):
        model = model.encoder
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)  # the size the model was built for
    size = input_size or int(fixed[-1] if fixed else cfg.get("input_size", (3, 224, 224))[-1])
    return Teacher(TimmFeatures(model), name=name, input_size=size, mean=tuple(cfg.get("mean", IMAGENET[0])),
                   std=tuple(cfg.get("std", IMAGENET[1])), grid=grid, resample=resample,
                   interpolation=cfg.get("interpolation") if cfg.get("interpolation") in ("bilinear", "bicubic")
                   else "bicubic")


def load_timm_teacher(path: str | Path, *, grid, model: str = "", input_size: int = 0, resample: bool = True,
                      model_kwargs: dict | None = None, **_) -> Teacher:
    from beit.modeling.classifier import build_timm_model
    if not model:
        raise ValueError("--teacher timm needs the timm model name: --teacher_model vit_base_patch16_224 (and the "
                         "checkpoint as --teacher_path)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--teacher_path {path}: no checkpoint file there (--teacher timm takes a local "
                                "safetensors / .pth file of the model named by --teacher_model)")
    net = build_timm_model(model, num_classes=0, weights=str(path), img_size=input_size or None,
                           model_kwargs=model_kwargs)
    return _timm_teacher(net.eval(), f"timm {model} from {path}", grid=grid, input_size=input_size,
                         resample=resample, cfg=dict(net.pretrained_cfg))


# ---- our own runs -----------------------------------------------------------------------------------
class RunFeatures(nn.Module):
    """Our pretraining model's encoder features on its patch / token grid (no masking)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_features(x)
        return tokens_to_grid(out[:, 1:], self.model.grid_size) if out.ndim == 3 else out


def load_run_teacher(path: str | Path, *, grid, input_size: int = 0, resample: bool = True, **_) -> Teacher:
    from beit.checkpoints.checkpointing import load_weights
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in ("model.safetensors", "pretrained.safetensors") if (p / n).is_file()]
        if not found:
            raise FileNotFoundError(f"--teacher_path {p}: neither model.safetensors (a fine-tune run) nor "
                                    "pretrained.safetensors (a pretraining run) is there")
        p = found[0]
    if not p.with_suffix(".json").is_file():
        raise FileNotFoundError(f"--teacher_path {p}: its config {p.with_suffix('.json').name} is missing")
    meta = json.loads(p.with_suffix(".json").read_text())
    if "model_kwargs" in meta:  # a fine-tune export: a timm model
        from beit.export import load_exported
        cfg = {"input_size": meta.get("input_size"), "mean": meta.get("mean"), "std": meta.get("std"),
               "interpolation": meta.get("interpolation")}
        return _timm_teacher(load_exported(p), f"fine-tuned {meta.get('architecture')} from {p}", grid=grid,
                             input_size=input_size, resample=resample, cfg={k: v for k, v in cfg.items() if v})
    saved = meta.get("pretrain_config")
    if not isinstance(saved, dict) or not isinstance(meta.get("model"), dict):
        raise ValueError(f"--teacher_path {p}: {p.with_suffix('.json').name} is neither a pretraining run's nor a "
                         "fine-tune export's config")
    from beit.config import from_dict
    from beit.modeling.backbones import backbone_for
    from beit.options.pretrain import PretrainConfig
    cfg = from_dict(PretrainConfig, saved, source=str(p.with_suffix(".json")))
    model = backbone_for(cfg.arch, pretraining=True).build_mim(cfg, int(meta["model"]["vocab_size"]))
    sd, _ = load_weights(p)
    model.load_state_dict(sd)
    if input_size and input_size != cfg.image_size:
        raise ValueError(f"--teacher_input_size {input_size}: the pretraining run {p} takes {cfg.image_size} px only")
    return Teacher(RunFeatures(model), name=f"{cfg.arch} pretraining run {p}", input_size=cfg.image_size,
                   mean=IMAGENET[0], std=IMAGENET[1], grid=grid, resample=resample)


# ---- registry -----------------------------------------------------------------------------------------
TEACHER_KINDS: dict[str, tuple[Callable[..., Teacher], str]] = {
    "hf": (load_hf_teacher, "a Hugging Face folder: CLIP, DINO (ViT) or DINOv2"),
    "timm": (load_timm_teacher, "a timm model name (--teacher_model) + a local checkpoint"),
    "run": (load_run_teacher, "our own pretraining or fine-tune run folder"),
}


def detect_kind(path: str | Path, model: str = "") -> str:
    """The kind of teacher at ``path``: hf (config.json), run (our weights + JSON), timm (a file + model name)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return "hf"
    if p.is_dir() or p.suffix == ".safetensors" and p.with_suffix(".json").is_file() and not model:
        return "run"
    if model:
        return "timm"
    raise ValueError(f"cannot tell what kind of teacher {path} is: pass --teacher hf|timm|run "
                     f"({'; '.join(f'{k}: {v[1]}' for k, v in TEACHER_KINDS.items())})")


def load_teacher(kind: str, path: str | Path, *, grid: tuple[int, int], model: str = "", input_size: int = 0,
                 resample: bool = True, model_kwargs: dict | None = None) -> Teacher:
    """A frozen ``Teacher`` of ``kind`` (one of TEACHER_KINDS, or "auto") giving [B, h, w, C] on ``grid``."""
    if not path:
        raise ValueError("VQ-KD distils a teacher's features: pass --teacher_path (a Hugging Face CLIP/DINO folder, "
                         "a timm checkpoint with --teacher_model, or one of your BEiT/Swin runs)")
    if not Path(path).exists():
        raise FileNotFoundError(f"--teacher_path {path} does not exist")
    kind = detect_kind(path, model) if kind == "auto" else kind
    if kind not in TEACHER_KINDS:
        raise ValueError(f"unknown teacher kind {kind!r}; choose auto or one of {list(TEACHER_KINDS)}")
    loader: Callable[..., Any] = TEACHER_KINDS[kind][0]
    return loader(path, grid=tuple(grid), model=model, input_size=input_size, resample=resample,
                  model_kwargs=model_kwargs)
