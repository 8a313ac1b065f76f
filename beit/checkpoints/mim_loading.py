"""A whole BEiT pretraining model -- mask token, LM head and BEiT v2's CLS-pretraining branch kept -- from a file.

Sources: our ``pretrained.safetensors`` (its ``.json`` holds the model's config), a unilm pretraining checkpoint
(beit's ``run_beit_pretraining.py`` / beit2's ``run_beitv2_pretraining.py``: ``{'model': ..., 'args': ...}``, read
weights-only) or a run folder holding either. For unilm's files the architecture is read off the tensors; the
CLS branch's ``head_layers`` and ``shared_lm_head`` from its keys, and ``early_layers`` (the one thing the
tensors cannot tell) from the saved ``args``, else ``early_layers=``, else depth - 3 (the reference's 9 of 12 for
base and 21 of 24 for large) with a note. Every tensor must fit: the load is strict.

``read_init`` is pretraining's ``--init``: such a checkpoint checked against the model a run's options build,
whose weights the run starts from (BEiT v2's branch kept, or started fresh on a checkpoint without it).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.models.beit import gen_relative_position_index

from beit.checkpoints.loading import Checkpoint, CheckpointMismatchError, LoadReport, describe_format, read_checkpoint

_INDEX = "rel_pos_bias.relative_position_index"
_TABLE = "rel_pos_bias.relative_position_bias_table"


def load_pretrain_model(source: str | Path, *, early_layers: int = 0, trust_pickle: bool = False):
    """(``BeitPretrainModel`` in eval mode with every weight of ``source``, ``LoadReport``); see the module doc."""
    from beit.modeling.mim import BeitPretrainModel

    config, sd, report = read_pretrain_checkpoint(source, early_layers=early_layers, trust_pickle=trust_pickle)
    model = BeitPretrainModel(**config)
    load_pretrain_weights(model, sd, report)
    return model.eval(), report


def read_pretrain_checkpoint(source: str | Path, *, early_layers: int = 0,
                             trust_pickle: bool = False) -> tuple[dict, dict[str, torch.Tensor], LoadReport]:
    """(``BeitPretrainModel`` arguments, its state dict, ``LoadReport``) of a pretraining checkpoint; the relative
    position index unilm saves is checked against the patch grid and left out (timm derives it)."""
    import inspect

    from beit.modeling.backbones.base import pretraining_config
    from beit.modeling.mim import BeitPretrainModel

    ckpt = read_checkpoint(source, trust_pickle=trust_pickle)
    sd = dict(ckpt.tensors)
    report = LoadReport(source=str(ckpt.file), kind=describe_format(sd))
    config = pretraining_config(ckpt.file)
    if config is None:
        config = unilm_mim_config(ckpt, early_layers, report)
    else:
        unknown = set(config) - set(inspect.signature(BeitPretrainModel).parameters)
        if unknown:
            raise CheckpointMismatchError(f"{ckpt.file} is not a BEiT ViT (--arch beit) pretraining model: its .json "
                                          f"records {sorted(unknown)}")
        if early_layers and config.get("early_layers", early_layers) != early_layers:
            raise CheckpointMismatchError(f"{ckpt.file} was pretrained with early_layers {config['early_layers']} "
                                          f"(its .json), not {early_layers}")
    index = sd.pop(_INDEX, None)
    if index is not None:
        grid = (config["img_size"] // config["patch_size"],) * 2
        if not torch.equal(index.long(), gen_relative_position_index(grid)):
            raise CheckpointMismatchError(f"{ckpt.file}: its {_INDEX} is not the one of a {grid[0]}x{grid[1]} patch "
                                          "grid")
        report.dropped.append(_INDEX)
    return config, sd, report


def load_pretrain_weights(model, sd: dict[str, torch.Tensor], report: LoadReport, *,
                          fresh: tuple[str, ...] = ()) -> None:
    """Load ``sd`` into ``model`` strictly: every tensor must fit and every weight must come from it, except
    parameters under the prefixes ``fresh``, which keep their initialisation (listed in ``report.missing``)."""
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(fresh)] if fresh else result.missing_keys
    if missing or result.unexpected_keys:
        raise CheckpointMismatchError(
            f"{report.source} ({report.kind}) does not fit the pretraining model built for it: missing "
            f"{sorted(missing)[:6]}, unexpected {sorted(result.unexpected_keys)[:6]}")
    report.missing = sorted(set(result.missing_keys) - set(missing))
    report.loaded = sorted(sd)


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


# --------------------------------------------------------------------------- --init of a pretraining run
# what a checkpoint must share with the model the run's options build, and the option that sets each
_MUST_MATCH = {"img_size": "--image_size", "patch_size": "--patch_size", "in_chans": "", "embed_dim":
               "--model_size / --embed_dim", "depth": "--model_size / --depth", "num_heads": "--num_heads",
               "mlp_ratio": "--mlp_ratio", "vocab_size": "the tokenizer (the checkpoint's targets)",
               "early_layers": "--early_layers", "head_layers": "--head_layers", "shared_lm_head": "--shared_lm_head"}
_BRANCH = "cls_pt_"


@dataclass
class PretrainInit:
    """A checked ``--init``: its state dict and report; ``fresh`` are prefixes that keep their initialisation (BEiT
    v2's branch when continuing a checkpoint without it)."""
    state_dict: dict[str, torch.Tensor]
    report: LoadReport
    fresh: tuple[str, ...] = ()

    def load_into(self, model) -> LoadReport:
        load_pretrain_weights(model, self.state_dict, self.report, fresh=self.fresh)
        return self.report


def read_init(source: str | Path, expected: dict, *, trust_pickle: bool = False) -> PretrainInit:
    """``source`` (ours or unilm's BEiT v1 / v2 pretraining checkpoint) checked against ``expected``, the
    ``BeitPretrainModel`` arguments of the run: every size, the vocabulary, layer scale and the CLS-pretraining
    branch must agree (a mismatch names the option to set). A checkpoint without the branch may start a run with
    it: the branch then keeps its initialisation, with a note."""
    import inspect

    from beit.modeling.mim import BeitPretrainModel
    defaults = {k: v.default for k, v in inspect.signature(BeitPretrainModel).parameters.items()}
    want = {**defaults, **expected}
    branch = bool(want.get("cls_pretraining"))
    try:  # an early_layers set explicitly is the one an unrecorded checkpoint was pretrained with
        config, sd, report = read_pretrain_checkpoint(source, early_layers=want.get("early_layers") or 0,
                                                      trust_pickle=trust_pickle)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"--init: {e}") from None
    has = {**defaults, **config}
    if branch:
        want["early_layers"] = want.get("early_layers") or want["depth"] - 3
    if has.get("cls_pretraining") and not branch:
        raise CheckpointMismatchError(
            f"--init {source} has BEiT v2's CLS-pretraining branch: continue it with --cls_pretraining true "
            f"--early_layers {has['early_layers']} --head_layers {has['head_layers']} --shared_lm_head "
            f"{str(has['shared_lm_head']).lower()} (beit finetune --init takes its encoder without it)")
    keys = [k for k in _MUST_MATCH if k not in ("early_layers", "head_layers", "shared_lm_head")
            or (branch and has.get("cls_pretraining"))]
    differ = [f"{k} {has.get(k)} (this run: {want.get(k)}; {_MUST_MATCH[k] or k})" for k in keys
              if has.get(k) != want.get(k)]
    if bool(has.get("init_values")) != bool(want.get("init_values")):
        differ.append(f"layer scale {'on' if has.get('init_values') else 'off'} (this run: "
                      f"{'on' if want.get('init_values') else 'off'}; --init_values)")
    if differ:
        raise CheckpointMismatchError(f"--init {source} does not fit the model these options build: "
                                      + "; ".join(differ))
    fresh = ()
    if branch and not has.get("cls_pretraining"):
        fresh = (_BRANCH,)
        report.notes.append("the checkpoint has no CLS-pretraining branch: the branch starts from its initialisation")
    return PretrainInit(sd, report, fresh)
