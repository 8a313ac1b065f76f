"""The peers our code is measured against: transformers' BEiT MIM model with our config."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[2]


def import_transformers():
    """``transformers``, imported with this repository's root kept off ``sys.path``: its ``tokenizers/``
    folder (our ``beit.tokenizers``) would otherwise shadow Hugging Face's ``tokenizers`` package,
    which happens under ``python -m`` from the repository root."""
    if "transformers.models.beit.modeling_beit" in sys.modules:
        return sys.modules["transformers"]
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _REPO]
    try:
        mod = sys.modules.get("tokenizers")
        if mod is not None and Path(getattr(mod, "__file__", "") or ".").resolve().parents[1] == _REPO:
            for name in [m for m in sys.modules if m == "tokenizers" or m.startswith("tokenizers.")]:
                del sys.modules[name]  # ours, imported under the wrong (top-level) name
        try:
            import transformers
        except ImportError as e:
            raise ImportError("the train_step benchmark compares with transformers' BEiT: pip install -e '.[hf]' "
                              f"({e})") from None
        import transformers.models.beit.modeling_beit  # noqa: F401  (resolve its imports now)
        return transformers
    finally:
        sys.path[:] = saved


def hf_beit_mim(dims: dict, image_size: int, patch_size: int, vocab_size: int, drop_path: float):
    """``BeitForMaskedImageModeling`` with the architecture of our model of ``dims``."""
    transformers = import_transformers()
    cfg = transformers.BeitConfig(
        hidden_size=dims["embed_dim"], num_hidden_layers=dims["depth"], num_attention_heads=dims["num_heads"],
        intermediate_size=int(dims["embed_dim"] * dims.get("mlp_ratio", 4.0)), image_size=image_size,
        patch_size=patch_size, vocab_size=vocab_size, use_mask_token=True, use_absolute_position_embeddings=False,
        use_relative_position_bias=False, use_shared_relative_position_bias=True,
        layer_scale_init_value=dims["init_values"], drop_path_rate=drop_path, layer_norm_eps=1e-6,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BeitForMaskedImageModeling(cfg)
