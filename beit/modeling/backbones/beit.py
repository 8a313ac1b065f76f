"""The BEiT ViT (``--arch beit`` / ``--model beit``): the masked-image-modelling model of beit.modeling.mim for
pretraining; timm's ``Beit`` for fine-tuning (classifier, linear probe, UperNet segmenter), with size and
layout read off ``--init``'s weights in any format beit.checkpoints.loading reads."""
from __future__ import annotations

from torch import nn

from beit.modeling.backbones.base import Backbone

POSITIONS = {(False, True): "relative", (True, False): "absolute", (True, True): "both", (False, False): "none"}


def cls_pretraining_options(cfg) -> dict:
    """BEiT v2's CLS-pretraining options of a pretraining config (none when it is off: BEiT v1's model)."""
    if not cfg.cls_pretraining:
        return {}
    return dict(cls_pretraining=True, early_layers=cfg.early_layers, head_layers=cfg.head_layers,
                shared_lm_head=cfg.shared_lm_head)


def mim_kwargs(cfg, vocab_size: int) -> dict:
    """``BeitPretrainModel`` arguments of a pretraining config."""
    from beit.modeling.mim import beit_dims

    dims = beit_dims(cfg.model_size, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                     mlp_ratio=cfg.mlp_ratio, init_values=cfg.init_values)
    return dict(img_size=cfg.image_size, patch_size=cfg.patch_size, vocab_size=vocab_size,
                drop_path_rate=cfg.drop_path, **dims, **cls_pretraining_options(cfg))


class BeitBackbone(Backbone):
    pretrains = patch_tokens = linear_probe = compiles = segments = cls_pretraining = True
    label = "ViT"

    def claims(self, name: str) -> bool:
        return name == "beit"

    def build_mim(self, cfg, vocab_size: int) -> nn.Module:
        from beit.modeling.mim import BeitPretrainModel
        return BeitPretrainModel(**mim_kwargs(cfg, vocab_size))

    def read_mim_init(self, cfg, vocab_size: int):
        from beit.checkpoints.mim_loading import read_init
        return read_init(cfg.init, mim_kwargs(cfg, vocab_size), trust_pickle=cfg.trust_pickle)

    def check_mim(self, cfg, vocab_size: int) -> None:
        from beit.modeling.mim import beit_dims, check_cls_pretraining
        dims = beit_dims(cfg.model_size, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
        if cfg.cls_pretraining:
            check_cls_pretraining(dims["depth"], cfg.early_layers or dims["depth"] - 3, cfg.head_layers)

    # ------------------------------------------------------------------------------- fine-tuning
    def check_finetune(self, cfg) -> None:
        if cfg.model_kwargs:
            raise ValueError("--model_kwargs are for --model <timm name>; a BEiT encoder takes --embed_dim/--depth/...")

    def architecture(self, cfg, ckpt, log=print) -> dict:
        """Size and layout of the encoder: explicit flags, else what ``--init``'s tensors (and the config beside
        them) say, else ``--model_size``. Never guesses a head count for a checkpoint."""
        from beit.checkpoints.loading import infer_beit_dims, infer_beit_layout
        from beit.modeling.mim import beit_dims
        found, position, layer_scale = {}, cfg.position or "relative", bool(cfg.init_values)
        if ckpt is not None:
            found = infer_beit_dims(ckpt.tensors)
            if "num_heads" not in found and not cfg.num_heads:
                if ckpt.num_heads is None:
                    raise ValueError(
                        f"--init {ckpt.file}: its head count cannot be read from the tensors (no relative position "
                        f"table) and {ckpt.heads_source}; pass --num_heads N (12 for a 768-wide base model, 16 for "
                        "a 1024-wide large one)")
                found["num_heads"] = ckpt.num_heads
                log(f"num_heads {ckpt.num_heads} from {ckpt.heads_source}")
            lay = infer_beit_layout(ckpt.tensors)
            position = POSITIONS[(lay["use_abs_pos_emb"], lay["use_rel_pos_bias"])]
            if cfg.position and cfg.position != position:
                raise ValueError(f"--position {cfg.position}, but --init {ckpt.file} has '{position}' position "
                                 "embeddings; leave --position out to use the checkpoint's")
            layer_scale = lay["layer_scale"]
        dims = beit_dims(cfg.model_size, found, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                         mlp_ratio=cfg.mlp_ratio)
        dims.pop("init_values")
        return dict(dims, use_abs_pos_emb=position in ("absolute", "both"),
                    use_rel_pos_bias=position in ("relative", "both"),
                    init_values=(cfg.init_values or 0.1) if layer_scale else 0.0,  # 0, not None: timm drops None
                    **self._numerics(cfg, ckpt, log))

    @staticmethod
    def _numerics(cfg, ckpt, log=print) -> dict:
        """layer_norm_eps and global_pool: the flags, else what a transformers checkpoint's config.json says
        (beit.checkpoints.hf_config), else BEiT's 1e-6 and mean pooling."""
        eps, pool = cfg.layer_norm_eps, cfg.global_pool
        if ckpt is not None and ckpt.layer_norm_eps is not None and not eps:
            eps = ckpt.layer_norm_eps
            log(f"layer_norm_eps {eps:g} from {ckpt.settings_source}" + (
                " (transformers' default; BEiT and timm use 1e-6)" if eps == 1e-12 else ""))
        if ckpt is not None and ckpt.pooling and not pool:
            pool = ckpt.pooling
            what = "mean of the patch tokens" if pool == "avg" else "CLS token"
            log(f"pooling {pool} ({what}) from {ckpt.settings_source}")
        return dict(layer_norm_eps=eps or 1e-6, global_pool=pool or "avg")

    def _init(self, cfg):
        from beit.checkpoints.loading import read_checkpoint
        return read_checkpoint(cfg.init, key=cfg.init_key or None, trust_pickle=cfg.trust_pickle) if cfg.init else None

    def build_classifier(self, cfg, num_classes: int, log=print) -> nn.Module:
        """timm's ``Beit`` with ``--init``'s weights (linear probe: frozen, a linear head on a block's tokens)."""
        from beit.checkpoints.loading import load_beit_weights
        from beit.modeling.classifier import LinearProbe, build_beit_classifier
        ckpt = self._init(cfg)
        model = build_beit_classifier(
            num_classes, img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
            drop_path_rate=0.0 if cfg.linear_probe else cfg.drop_path, head_init_scale=cfg.head_init_scale,
            **self.architecture(cfg, ckpt, log))
        if ckpt is not None:
            log(load_beit_weights(model, ckpt, strict=cfg.strict).summary())
        elif cfg.linear_probe:
            log("warning: linear probe on a randomly initialised encoder (no --init)")
        return LinearProbe(model, num_classes, cfg.probe_block) if cfg.linear_probe else model

    def build_segmenter(self, cfg, num_classes: int, log=print) -> nn.Module:
        """The encoder + pyramid + UperNet/aux heads; --init's weights go into the encoder (rel-pos tables and
        patch embedding resized to --image_size / --patch_size as for classification)."""
        from beit.checkpoints.loading import load_beit_weights
        from beit.modeling.segmenter import BeitSegmenter
        ckpt = self._init(cfg)
        arch = self.architecture(cfg, ckpt, log)
        arch.pop("global_pool")  # the UperNet head reads the blocks, not a pooled feature
        model = BeitSegmenter(num_classes, img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                              drop_path_rate=cfg.drop_path, channels=cfg.seg_channels,
                              aux_channels=max(1, cfg.seg_channels // 2), **arch)
        if ckpt is not None:
            log(load_beit_weights(model.backbone, ckpt, strict=cfg.strict).summary())
        return model

    def built_options(self, cfg, model: nn.Module) -> dict:
        enc = getattr(model, "encoder", None) or getattr(model, "backbone", None) or model
        attn = enc.blocks[0].attn
        return dict(embed_dim=enc.embed_dim, depth=len(enc.blocks), num_heads=attn.num_heads,
                    mlp_ratio=enc.blocks[0].mlp.fc1.out_features / enc.embed_dim,
                    position=POSITIONS[(enc.pos_embed is not None, attn.relative_position_bias_table is not None)],
                    init_values=cfg.init_values if enc.blocks[0].gamma_1 is not None else 0.0,
                    layer_norm_eps=enc.blocks[0].norm1.eps, global_pool=enc.global_pool)

    def timm_export(self, cfg, model: nn.Module) -> tuple[str, str, dict]:
        from beit.export.classifier import beit_arch_name, beit_kwargs_of
        from beit.modeling.classifier import BEIT_TIMM_NAME
        kwargs = beit_kwargs_of(cfg, model)
        return BEIT_TIMM_NAME, beit_arch_name(kwargs), kwargs

    def finetune_options(self, name: str, options: dict) -> dict:
        return {"model": "beit", **{k: options[k] for k in ("image_size", "patch_size", "embed_dim", "depth",
                                                            "num_heads")}}
