"""A whole BEiT pretraining model -- mask token, LM head and BEiT v2's CLS-pretraining branch kept -- from a file.

Sources: our ``pretrained.safetensors`` (its ``.json`` holds the model's config), a unilm pretraining checkpoint
(beit's ``run_beit_pretraining.py`` / beit2's ``run_beitv2_pretraining.py``: ``{'model': ..., 'args': ...}``, read
weights-only) or a run folder holding either. For unilm's files the architecture is read off the tensors; the
CLS branch's ``head_layers`` and ``shared_lm_head`` from its keys, and ``early_layers`` (the one thing the
tensors cannot tell) from the saved ``args``, else ``early_layers=``, else depth - 3 (the reference's 9 of 12 for
base and 21 of 24 for large) with a note. Every tensor must fit: the load is strict.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from beit.checkpoints.loading import Checkpoint, CheckpointMismatchError, LoadReport, describe_format, read_checkpoint

_INDEX = "rel_pos_bias.relative_position_index"
_TABLE = "rel_pos_bias.relative_position_bias_table"


def load_pretrain_model(source: str | Path, *, early_layers: int = 0, trust_pickle: bool = False):
    """(``BeitPretrainModel`` in eval mode with every weight of ``source``, ``LoadReport``); see the module doc."""
    from beit.modeling.backbones.base import pretraining_config
    from beit.modeling.mim import BeitPretrainModel

    ckpt = read_checkpoint(source, trust_pickle=trust_pickle)
    sd = dict(ckpt.tensors)
    report = LoadReport(source=str(ckpt.file), kind=describe_format(sd))
    config = pretraining_config(ckpt.file)
    if config is None:
        config = unilm_mim_config(ckpt, early_layers, report)
    elif early_layers and config.get("early_layers") != early_layers:
        raise CheckpointMismatchError(f"{ckpt.file} was pretrained with early_layers {config.get('early_layers')} "
                                      f"(its .json), not {early_layers}")
    model = BeitPretrainModel(**config)
    index = sd.pop(_INDEX, None)
    if index is not None:
        if not torch.equal(index.long(), model.rel_pos_bias.relative_position_index.cpu()):
            raise CheckpointMismatchError(f"{ckpt.file}: its {_INDEX} is not the one of a "
                                          f"{model.grid_size[0]}x{model.grid_size[1]} patch grid")
        report.dropped.append(_INDEX)
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointMismatchError(
            f"{ckpt.file} ({report.kind}) does not fit the pretraining model built for it: missing "
            f"{sorted(result.missing_keys)[:6]}, unexpected {sorted(result.unexpected_keys)[:6]}")
    report.loaded = sorted(sd)
    return model.eval(), report


def unilm_mim_config(ckpt: Checkpoint, early_layers: int, report: LoadReport) -> dict:
    """``BeitPretrainModel`` arguments that fit a unilm pretraining checkpoint (see the module doc)."""
    from beit.checkpoints.loading import infer_beit_dims

    sd, name, args = ckpt.tensors, ckpt.file, ckpt.args
    if "lm_head.weight" not in sd or "mask_token" not in sd:
        raise CheckpointMismatchError(f"{name} ({describe_format(sd)}) has no mask_token / lm_head: not a "
                                      "pretraining checkpoint; fine-tune from it with --init instead")
    if ckpt.hf:
        raise CheckpointMismatchError(f"{name}: a transformers BEiT is read for fine-tuning (--init) only")
    if "pos_embed" in sd or _TABLE not in sd:
        raise CheckpointMismatchError(
            f"{name} ({describe_format(sd)}): our pretraining model has the shared relative position bias only (the "
            "reference's default); checkpoints pretrained with --abs_pos_emb / --disable_rel_pos_bias fine-tune "
            "(--init) but do not load here")
    dims = infer_beit_dims(sd)
    cells = sd[_TABLE].shape[0] - 3           # (2h - 1) * (2w - 1) relative offsets (+3 for the cls token)
    side = (math.isqrt(cells) + 1) // 2
    if (2 * side - 1) ** 2 != cells:
        raise CheckpointMismatchError(f"{name}: its relative position table ({cells} offsets) is not a square patch "
                                      "grid's")
    config = dict(img_size=side * dims["patch_size"], patch_size=dims["patch_size"], in_chans=dims["in_chans"],
                  embed_dim=dims["embed_dim"], depth=dims["depth"], num_heads=dims["num_heads"],
                  mlp_ratio=dims.get("mlp_ratio", 4.0), vocab_size=int(sd["lm_head.weight"].shape[0]),
                  init_values=(args.get("layer_scale_init_value") or 0.1) if "blocks.0.gamma_1" in sd else 0.0,
                  drop_path_rate=float(args.get("drop_path", 0.1)))
    heads = [int(m.group(1)) for k in sd if (m := re.match(r"cls_pt_layers\.(\d+)\.", k))]
    if heads:
        recorded = int(args.get("early_layers") or 0)
        if early_layers and recorded and early_layers != recorded:
            raise CheckpointMismatchError(f"{name} was pretrained with early_layers {recorded} (its args), not "
                                          f"{early_layers}")
        early = early_layers or recorded or config["depth"] - 3
        if not (early_layers or recorded):
            report.notes.append(f"early_layers is not recorded in {name}: {early} (depth - 3) assumed, as the "
                                "reference's base and large recipes; pass early_layers if it was pretrained otherwise")
        config.update(cls_pretraining=True, early_layers=early, head_layers=1 + max(heads),
                      shared_lm_head="cls_pt_lm_head.weight" not in sd)
    return config
