"""A pretraining run's model in unilm's layout (``beit export --format unilm``), for unilm's own scripts.

``OUT.pth`` is ``{'model': state dict, 'args': {...}}`` as unilm's ``utils.save_model`` stores it (the state dict
with BEiT v2's CLS-pretraining branch when the run had one; ``args`` records, under run_beitv2_pretraining.py's
option names, what the tensors cannot tell, ``early_layers`` above all, as a plain dict rather than unilm's
Namespace, so torch's default weights-only load reads the file), and ``OUT.json`` the
unilm class and constructor arguments that take it strictly (``norm_layer``: LayerNorm with ``layer_norm_eps``)
and, for the sizes unilm registers, its model name (``--model`` of run_beitv2_pretraining.py)::

    conf = json.load(open("beitv2_unilm.json"))
    model = getattr(modeling_pretrain, conf["unilm_class"])(
        **conf["kwargs"], norm_layer=partial(nn.LayerNorm, eps=conf["layer_norm_eps"]))
    model.load_state_dict(torch.load("beitv2_unilm.pth")["model"])

unilm's fine-tuning (``run_class_finetuning.py --finetune beitv2_unilm.pth``) reads the same file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from beit.checkpoints.formats import unilm_mim_kwargs, unilm_mim_state_dict

_UNILM_SIZES = {(768, 12, 12): "base", (1024, 24, 16): "large"}


def unilm_model_name(kwargs: dict, cls_pretraining: bool) -> str | None:
    """unilm's registered name of a pretraining model of these sizes (224 px, 16 px patches), else None."""
    size = _UNILM_SIZES.get((kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"]))
    if size is None or kwargs["img_size"] != 224 or kwargs["patch_size"] != 16:
        return None
    return f"beit_{size}_patch16_224_8k_vocab" + ("_cls_pt" if cls_pretraining else "")


def unilm_args(config: dict) -> dict:
    """The run_beitv2_pretraining.py options (its names) of our model's ``config`` that unilm saves as ``args``."""
    cls, kwargs = unilm_mim_kwargs(config)
    args = dict(model=unilm_model_name(kwargs, cls.endswith("CLS")), input_size=kwargs["img_size"],
                drop_path=kwargs["drop_path_rate"], layer_scale_init_value=kwargs["init_values"] or 0.0,
                rel_pos_bias=True, abs_pos_emb=False, codebook_size=kwargs["vocab_size"])
    if cls.endswith("CLS"):
        args.update(early_layers=kwargs["early_layers"], head_layers=kwargs["head_layers"],
                    shared_lm_head=kwargs["shared_lm_head"])
    return args


def _check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix != ".pth":
        raise ValueError(f"--out {out}: unilm's scripts read a .pth file; name it <something>.pth")
    return out


def write_unilm(model, out: str | Path, source: str = "") -> Path:
    """``model`` (a ``BeitPretrainModel``) as ``out`` (.pth) + ``out``.json in unilm's layout (see the module doc)."""
    out = _check_out(out)
    cls, kwargs = unilm_mim_kwargs(model.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"model": unilm_mim_state_dict(model), "args": unilm_args(model.config)}, tmp)
    os.replace(tmp, out)
    meta = dict(unilm_class=cls, kwargs=kwargs, layer_norm_eps=1e-6,
                unilm_model=unilm_model_name(kwargs, cls.endswith("CLS")), source=source)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def export_pretraining_run(run_dir: str | Path, out: str | Path) -> tuple[Path, str]:
    """(written .pth, what was exported): the newest complete checkpoint of a BEiT pretraining run (else its
    pretrained.safetensors) in unilm's layout."""
    from beit.viz.run_folder import load_model, open_run, resolve_weights

    _check_out(out)
    run = open_run(run_dir)
    if run.stage != "pretrain" or run.cfg.arch != "beit":
        raise ValueError(f"--format unilm exports a BEiT pretraining run (--arch beit); {run_dir} is a "
                         f"{run.stage} run" + (f" of --arch {run.cfg.arch}" if run.stage == "pretrain" else ""))
    weights, label = resolve_weights(run)
    model = load_model(run, weights, "cpu")
    return write_unilm(model, out, source=str(weights)), f"{run_dir} ({label})"
