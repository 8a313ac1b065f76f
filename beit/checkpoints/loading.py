"""Load BEiT encoder weights into a timm ``Beit`` for fine-tuning, whatever format they come in.

Accepted sources (always local files, never unpickled objects):

* our pretraining output: ``pretrained.safetensors`` (reference key names, shared
  ``rel_pos_bias.relative_position_bias_table``, ``mask_token``, ``lm_head.*``) or an Accelerate
  checkpoint directory holding ``model.safetensors``;
* official BEiT (unilm) files: a dict under ``model`` / ``module`` / ``state_dict`` (optionally
  ``model_ema``) with a shared or per-block relative position table;
* timm BEiT weights: per-block ``blocks.i.attn.relative_position_bias_table``, ``fc_norm``, ``head``;
* Hugging Face transformers BEiT (``save_pretrained`` folders or their ``model.safetensors``): key names
  mapped by :mod:`beit.checkpoints.formats`; the settings of its ``config.json`` that change the
  math (``layer_norm_eps``, a classifier's pooling, ...) read by :mod:`beit.checkpoints.hf_config`.

Pickled ``.pth`` files are read under the one policy of :mod:`beit.checkpoints.safe_pickle` (weights-only
plus plain data records; anything else only with ``trust_pickle``). :func:`read_checkpoint` also
returns the head count recorded beside the weights (config.json, unilm ``args``), and
:func:`infer_beit_layout` the position-embedding type and layer scale, so a model can be built to fit.

:func:`load_beit_weights` copies a shared relative position table into every block, resizes the
tables (geometric-progression grid, linear interpolation, via timm) and the patch embedding when the
patch grid or patch size changes, drops what a classifier does not use (``mask_token``, ``lm_head``,
derived ``relative_position_index`` buffers) and returns a :class:`LoadReport` naming every key
that was missing, unexpected, dropped, resized or freshly initialised. Shapes that cannot be made
to fit raise :class:`CheckpointMismatchError` saying why and how to fix it.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import warnings
from pathlib import Path

import torch
from torch import nn

# Keys a classifier may legitimately lack in a checkpoint: they are initialised fresh.
_NEW_KEYS = re.compile(r"^(head|fc_norm|norm)\.")
# Keys that exist only for pretraining or are derived buffers; dropped without complaint.
# (BEiT v2's CLS-pretraining branch: cls_pt_layers / cls_pt_norm / cls_pt_lm_head.)
_PRETRAIN_ONLY = re.compile(r"(^mask_token$|^lm_head\.|relative_position_index$|^rel_pos_bias\.|^cls_pt_)")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
_DIR_CANDIDATES = ("pretrained.safetensors", "model.safetensors", "pytorch_model.bin", "model.pth",
                   "checkpoint.pth")


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors cannot be made to fit the model."""


@dataclasses.dataclass
class LoadReport:
    """What happened to every key when a checkpoint was loaded."""

    source: str
    kind: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)      # model keys with no value: new init
    unexpected: list[str] = dataclasses.field(default_factory=list)   # checkpoint keys the model lacks
    dropped: list[str] = dataclasses.field(default_factory=list)      # pretraining-only keys, removed on purpose
    resized: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        def fmt(keys: list[str], n: int = 12) -> str:
            groups = _group_keys(keys)
            return ", ".join(groups[:n]) + (f" ... (+{len(groups) - n} more)" if len(groups) > n else "")
        lines = [f"loaded {len(self.loaded)} tensors from {self.source} ({self.kind})"]
        for name in ("missing", "unexpected", "dropped", "resized"):
            keys = getattr(self, name)
            if keys:
                label = {"missing": "missing (newly initialised)", "unexpected": "unexpected (ignored)",
                         "dropped": "dropped (pretraining only / derived)", "resized": "resized"}[name]
                lines.append(f"  {label}: {fmt(keys)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _group_keys(keys: list[str]) -> list[str]:
    """Each key once; many keys under one module or one per-block name collapse into ``name (N tensors)``."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        g = re.sub(r"\.\d+\.", ".*.", k)
        g = g.split(".", 1)[0] + ".*" if g.startswith(("cls_pt_", "lm_head", "decoder")) else g
        groups.setdefault(g, []).append(k)
    return [v[0] if len(v) == 1 else f"{g} ({len(v)} tensors)" for g, v in groups.items()]


# ----------------------------------------------------------------------------------------- reading
def _resolve_file(path: Path) -> Path:
    if path.is_dir():
        for name in _DIR_CANDIDATES:
            if (path / name).is_file():
                return path / name
        found = sorted(p.name for p in path.iterdir())[:20]
        raise FileNotFoundError(
            f"{path} is a directory without a weights file; expected one of {list(_DIR_CANDIDATES)}, "
            f"found {found}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint's tensors (reference key names) with what is recorded beside them."""

    tensors: dict[str, torch.Tensor]
    file: Path
    num_heads: int | None = None
    heads_source: str = ""
    hf: bool = False
    layer_norm_eps: float | None = None   # None: not recorded, the BEiT / timm value (1e-6) is the weights'
    pooling: str | None = None            # a classifier's pooling (avg | token) when its config says so
    settings_source: str = ""
    args: dict = dataclasses.field(default_factory=dict)   # the plain values unilm saves as ``args``


def read_checkpoint(path: str | Path, key: str | None = None, use_ema: bool = False,
                    trust_pickle: bool = False) -> Checkpoint:
    """Read a checkpoint file or folder into reference key names (see the module doc).

    ``key`` picks the entry of a wrapping dict (default: ``model_ema`` if ``use_ema``, else the first
    of ``model``, ``module``, ``state_dict``); wrapper prefixes (``module.``, ``_orig_mod.``) are stripped.
    """
    from beit.checkpoints.formats import hf_to_reference, is_hf_beit, recorded_num_heads
    from beit.checkpoints.safe_pickle import load_torch_file
    path = _resolve_file(Path(path))
    raw = load_torch_file(path, trust_pickle=trust_pickle)
    if not isinstance(raw, dict):
        raise CheckpointMismatchError(f"{path}: expected a dict of tensors, got {type(raw).__name__}")
    obj = raw
    if key is None:
        order = (["model_ema"] if use_ema else []) + ["model", "module", "state_dict"]
        key = next((k for k in order if isinstance(obj.get(k), dict)), None)
    if key is not None:
        if not isinstance(obj.get(key), dict):
            raise CheckpointMismatchError(f"{path}: no state dict under key {key!r}; keys: {sorted(obj)[:20]}")
        obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointMismatchError(f"{path}: no tensors found (top-level keys: {sorted(obj)[:20]})")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    hf = is_hf_beit(tensors)
    settings: dict = {}
    if hf:
        from beit.checkpoints.hf_config import hf_settings
        tensors = hf_to_reference(tensors)
        try:
            settings = hf_settings(path, has_classifier="head.weight" in tensors)
        except ValueError as e:
            raise CheckpointMismatchError(str(e)) from None
    width = tensors["cls_token"].shape[-1] if "cls_token" in tensors else 0
    heads, source = recorded_num_heads(path, raw, int(width))
    args = raw.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    return Checkpoint(tensors, path, heads, source, hf, layer_norm_eps=settings.get("layer_norm_eps"),
                      pooling=settings.get("pooling"), settings_source=settings.get("source", ""), args=args)


def read_state_dict(path: str | Path, key: str | None = None, use_ema: bool = False,
                    trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of :func:`read_checkpoint` (reference key names)."""
    return read_checkpoint(path, key=key, use_ema=use_ema, trust_pickle=trust_pickle).tensors


def describe_format(sd: dict[str, torch.Tensor]) -> str:
    """A short human name for the checkpoint layout."""
    shared = "rel_pos_bias.relative_position_bias_table" in sd
    per_block = any(k.endswith("attn.relative_position_bias_table") for k in sd)
    if "mask_token" in sd or any(k.startswith(("lm_head.", "cls_pt_")) for k in sd):
        kind = "BEiT pretraining"
    elif "head.weight" in sd or "fc_norm.weight" in sd:
        kind = "BEiT classifier"
    else:
        kind = "BEiT encoder"
    pos = [n for n, on in (("shared rel-pos", shared), ("per-block rel-pos", per_block),
                           ("absolute pos-emb", "pos_embed" in sd)) if on] or ["no position embedding"]
    scale = "layer scale" if any(k.endswith(".gamma_1") for k in sd) else "no layer scale"
    return f"{kind}: {', '.join(pos)}, {scale}"


def infer_beit_dims(sd: dict[str, torch.Tensor]) -> dict:
    """embed_dim / depth / num_heads / mlp_ratio / patch_size / in_chans read off a BEiT state dict,
    so a model can be built to match a checkpoint instead of guessing its size."""
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        raise CheckpointMismatchError(
            "not a BEiT/ViT state dict: no cls_token / patch_embed.proj.weight (read: unilm / timm BEiT names, "
            f"transformers BEiT names, our pretraining output); its keys start {sorted(sd)[:6]}")
    pe = sd["patch_embed.proj.weight"]
    dims = dict(embed_dim=int(pe.shape[0]), in_chans=int(pe.shape[1]), patch_size=int(pe.shape[-1]),
                depth=1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))))
    table = sd.get("rel_pos_bias.relative_position_bias_table", sd.get("blocks.0.attn.relative_position_bias_table"))
    if table is not None:
        dims["num_heads"] = int(table.shape[1])
    if "blocks.0.mlp.fc1.weight" in sd:
        dims["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / dims["embed_dim"]
    return dims


def infer_beit_layout(sd: dict[str, torch.Tensor]) -> dict:
    """Position embedding type and layer scale of a BEiT state dict: ``use_abs_pos_emb`` (a ``pos_embed``),
    ``use_rel_pos_bias`` (a shared or per-block relative position table), ``layer_scale`` (``gamma_1``)."""
    return dict(use_abs_pos_emb="pos_embed" in sd,
                use_rel_pos_bias=any(k.endswith("relative_position_bias_table") for k in sd),
                layer_scale=any(k.endswith(".gamma_1") for k in sd))


# ------------------------------------------------------------------------------------- resizing
# timm 1.0's RegularGridInterpolator (timm/layers/interpolate.py) triggers these on recent torch, once per process;
# the results are checked by tests/test_finetune_loading.py.
TIMM_RESIZE_WARNINGS = (r"torch\.searchsorted\(\): input value tensor is non-contiguous",
                        r"Using a non-tuple sequence for multidimensional indexing is deprecated")
def _resize_rel_table(table: torch.Tensor, window: tuple[int, int], target_shape: torch.Size,
                      key: str, source_window: tuple[int, int] | None) -> torch.Tensor:
    from timm.layers import resize_rel_pos_bias_table
    if table.ndim != 2 or table.shape[1] != target_shape[1]:
        raise CheckpointMismatchError(
            f"{key}: relative position table has {table.shape[-1]} heads, the model has {target_shape[1]}; "
            "build the model with the checkpoint's num_heads")
    with warnings.catch_warnings():  # two torch warnings about timm's own interpolator code; nothing a user can change
        for message in TIMM_RESIZE_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        return resize_rel_pos_bias_table(table, new_window_size=tuple(window), new_bias_shape=tuple(target_shape),
                                         old_window_size=source_window)


def _attn_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Prefix -> module for every module that owns a relative position table."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "relative_position_bias_table", None), torch.Tensor)}


def adapt_state_dict(sd: dict[str, torch.Tensor], model: nn.Module, report: LoadReport,
                     interpolation: str = "bicubic",
                     source_grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Map ``sd`` onto ``model``'s keys and shapes (see module doc); records every change in ``report``."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed
    target = model.state_dict()
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    if "cls_token" in sd and "cls_token" in target and sd["cls_token"].shape[-1] != target["cls_token"].shape[-1]:
        raise CheckpointMismatchError(
            f"embedding dim mismatch: checkpoint has {sd['cls_token'].shape[-1]}, model has "
            f"{target['cls_token'].shape[-1]}; build the model with the checkpoint's size (embed_dim/depth/num_heads)")
    ck_depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    md_depth = 1 + max((int(m.group(1)) for k in target if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if ck_depth and md_depth and ck_depth != md_depth:
        raise CheckpointMismatchError(
            f"depth mismatch: checkpoint has {ck_depth} blocks, model has {md_depth}; "
            f"build the model with depth={ck_depth}")

    rel_modules = _attn_modules(model)
    shared = sd.pop("rel_pos_bias.relative_position_bias_table", None)
    if shared is not None:
        for prefix in rel_modules:
            k = f"{prefix}.relative_position_bias_table"
            if k not in sd:
                sd[k] = shared.clone()
        if rel_modules and "rel_pos_bias" not in rel_modules:
            report.notes.append(f"shared relative position table copied into {len(rel_modules)} blocks")
    if not rel_modules and any(k.endswith("relative_position_bias_table") for k in sd):
        report.notes.append("model has no relative position bias; the checkpoint's tables are ignored")

    for k, v in sd.items():
        if k not in target:
            if _PRETRAIN_ONLY.search(k):
                report.dropped.append(k)
            elif _NEW_KEYS.match(k):
                # final norm / pooling norm / classifier head the model does not have (mean pooling uses a fresh
                # fc_norm as the reference does; a segmentation backbone has neither)
                report.dropped.append(k)
            else:
                report.unexpected.append(k)
            continue
        want = target[k].shape
        if k.endswith("relative_position_bias_table") and v.shape != want:
            prefix = k[: -len(".relative_position_bias_table")]
            v = _resize_rel_table(v, rel_modules[prefix].window_size, want, k, source_grid)
            report.resized.append(k)
        elif k == "patch_embed.proj.weight" and v.shape != want:
            if v.shape[:2] != want[:2]:
                raise CheckpointMismatchError(
                    f"patch embedding: checkpoint maps {v.shape[1]} channels to {v.shape[0]}, the model "
                    f"{want[1]} to {want[0]}; use in_chans={v.shape[1]} and the checkpoint's embed_dim")
            v = resample_patch_embed(v, list(want[-2:]), interpolation=interpolation, antialias=True)
            report.resized.append(k)
        elif k == "pos_embed" and v.shape != want:
            v = resample_abs_pos_embed(v, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=1,
                                       interpolation=interpolation, antialias=True)
            report.resized.append(k)
        elif k.startswith("head.") and v.shape != want:
            report.dropped.append(k)
            report.notes.append(f"{k}: checkpoint shape {tuple(v.shape)} != model {tuple(want)}; head re-initialised")
            continue
        if v.shape != want:
            raise CheckpointMismatchError(
                f"{k}: checkpoint shape {tuple(v.shape)} cannot fit the model's {tuple(want)}; "
                "check embed_dim / num_heads / mlp_ratio / in_chans against the checkpoint")
        out[k] = v.to(target[k].dtype)
    return out


def load_beit_weights(model: nn.Module, source: str | Path | dict[str, torch.Tensor] | Checkpoint, *,
                      strict: bool = True, key: str | None = None, use_ema: bool = False,
                      interpolation: str = "bicubic", source_grid: tuple[int, int] | None = None,
                      name: str | None = None, trust_pickle: bool = False) -> LoadReport:
    """Load a BEiT checkpoint (any supported format) into a timm ``Beit``; see the module doc.

    With ``strict`` (default) every encoder tensor of the model must come from the checkpoint; only
    ``head``, ``fc_norm`` and ``norm`` may be new. Raises :class:`CheckpointMismatchError` otherwise.
    """
    if isinstance(source, Checkpoint):
        sd, name = dict(source.tensors), name or str(source.file)
    elif isinstance(source, dict):
        sd, name = dict(source), name or "<state dict>"
    else:
        ckpt = read_checkpoint(source, key=key, use_ema=use_ema, trust_pickle=trust_pickle)
        sd, name = ckpt.tensors, name or str(ckpt.file)
    report = LoadReport(source=name, kind=describe_format(sd))
    sd = adapt_state_dict(sd, model, report, interpolation=interpolation, source_grid=source_grid)
    head = {int(m.group(1)) for k in report.dropped if (m := re.match(r"cls_pt_layers\.(\d+)\.", k))}
    if head:
        report.notes.append(f"BEiT v2's CLS-pretraining branch ({len(head)} head block(s)"
                            + (", its own norm and LM head" if "cls_pt_lm_head.weight" in report.dropped else "")
                            + ") serves pretraining only, it is not part of the encoder: dropped (unilm's "
                            "fine-tuning leaves it unused too)")
    if not sd:
        raise CheckpointMismatchError(
            f"{name}: none of its {len(report.unexpected)} tensors match the model (first: "
            f"{report.unexpected[:5]}); is this a BEiT checkpoint?")
    result = model.load_state_dict(sd, strict=False)
    report.loaded = sorted(sd)
    report.missing = sorted(result.missing_keys)
    report.unexpected = sorted(set(report.unexpected) | set(result.unexpected_keys))
    encoder_missing = [k for k in report.missing if not _NEW_KEYS.match(k)]
    if encoder_missing:
        if strict:
            raise CheckpointMismatchError(
                f"{name} ({report.kind}): the model's encoder tensors {', '.join(_group_keys(encoder_missing)[:8])} "
                "are not in "
                "the checkpoint; check the model options against it, or pass --strict false "
                "(Python: strict=False) to initialise them randomly")
        report.notes.append(f"--strict false: {len(encoder_missing)} encoder tensors not in the checkpoint were "
                            "initialised randomly")
    if strict and report.unexpected:
        raise CheckpointMismatchError(
            f"{name} ({report.kind}): its tensors {', '.join(_group_keys(report.unexpected)[:8])} have no place in "
            "the model (built without what they belong to?); check the model options against the checkpoint, or "
            "pass --strict false (Python: strict=False) to skip them")
    if report.unexpected:
        report.notes.append(f"--strict false: {len(report.unexpected)} checkpoint tensors were skipped (unexpected)")
    return report
