"""What a backbone family provides to pretraining (``PretrainConfig``) and fine-tuning (``FinetuneConfig``).

Every method has a default here, so a family overrides only what it supports. The pretraining model
(``build_mim``) takes images and a block mask on the token grid and returns logits for the masked cells
(``forward(images, bool_masked_pos) -> [M, vocab]``, or ``{branch: [M, vocab]}`` when it predicts them several
ways, each branch's loss added: BEiT v2's ``mim`` and ``cls_pt``), with ``encoder_state_dict()``, ``no_weight_decay()``,
``set_grad_checkpointing()`` and a ``config`` dict that is saved beside the weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class Backbone:
    pretrains = False      # it has a masked-image-modelling model (``--arch``)
    patch_tokens = False   # forward_features gives ViT tokens [B, 1 + N, D]: kNN health metric, ViT feature methods
    linear_probe = False   # a frozen-encoder linear probe reads its blocks
    compiles = False       # ``--compile`` compiles its blocks
    segments = False       # it has a UperNet segmenter (``--task segmentation``)
    cls_pretraining = False  # its MIM model has BEiT v2's CLS-pretraining branch (``--cls_pretraining``)
    label = ""             # how reports name it ("": by its name)

    def claims(self, name: str) -> bool:
        """True when ``name`` belongs to this family."""
        return False

    def check_name(self, name: str) -> None:
        """Raise ValueError when the family cannot build ``name`` (a typo of one of its names, say)."""

    # ------------------------------------------------------------------------------- pretraining
    def build_mim(self, cfg, vocab_size: int) -> nn.Module:
        raise ValueError(f"--arch {cfg.arch}: this backbone has no masked-image-modelling model")

    def read_mim_init(self, cfg, vocab_size: int):
        """The pretraining checkpoint ``--init`` names, checked against the MIM model these options build (before
        compute); its ``load_into(model)`` puts the weights in."""
        raise ValueError(f"--init continues the pretraining of a BEiT ViT (--arch beit); --arch {cfg.arch} starts "
                         "from scratch: leave --init empty")

    def check_mim(self, cfg, vocab_size: int) -> None:
        """Build the pretraining model on the meta device: sizes, windows and grids are checked before any
        compute, without allocating weights (the library's own checks raise ValueError with their message)."""
        try:
            with torch.device("meta"):
                self.build_mim(cfg, vocab_size)
        except (TypeError, AssertionError, IndexError, RuntimeError) as e:  # timm's own checks
            raise ValueError(f"--arch {cfg.arch} cannot be built with these options: {e}") from None

    # ------------------------------------------------------------------------------- fine-tuning
    def check_finetune(self, cfg) -> None:
        """Option checks of a fine-tune of this backbone that need no files."""
        if cfg.linear_probe and not self.linear_probe:
            raise ValueError(f"--linear_probe is for BEiT encoders (--model beit): it reads their blocks, and "
                             f"--model {cfg.model} has none to read")

    def build_classifier(self, cfg, num_classes: int, log=print) -> nn.Module:
        raise ValueError(f"--model {cfg.model}: this backbone has no classifier")

    def build_segmenter(self, cfg, num_classes: int, log=print) -> nn.Module:
        raise ValueError(f"--task segmentation fine-tunes a BEiT encoder (--model beit) or a timm Swin "
                         f"(--model swin_tiny_patch4_window7_224, ...), got --model {cfg.model}")

    def built_options(self, cfg, model: nn.Module) -> dict:
        """Options to record in the run's config.yaml because the model was built with them (e.g. read off
        --init's weights) although the flags left them open."""
        return {}

    def timm_export(self, cfg, model: nn.Module) -> tuple[str, str, dict]:
        """(timm entrypoint, architecture name, constructor kwargs) that rebuild ``model`` with timm."""
        kwargs = getattr(model, "create_kwargs", None) or dict(num_classes=cfg.num_classes, in_chans=cfg.in_chans)
        return cfg.model, cfg.model, dict(kwargs)

    def finetune_options(self, name: str, options: dict) -> dict:
        """``beit finetune`` options that build the encoder pretrained with ``options`` (``beit pretrain``
        option names; ``beit compare`` uses this to fine-tune what it pretrained)."""
        return {"model": name, "image_size": options["image_size"]}


def pretraining_config(path: str | Path) -> dict | None:
    """The ``model`` config recorded beside a pretraining checkpoint (``<stem>.json`` of our
    ``pretrained.safetensors``, or of a folder holding one), or None."""
    p = Path(path)
    if p.is_dir():
        p = p / "pretrained.safetensors"
    meta = p.with_suffix(".json")
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("model") or None
    except (ValueError, AttributeError):
        return None
