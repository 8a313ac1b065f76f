"""Attention weights of BEiT blocks, recomputed: timm's fused attention never materialises them.

A forward pre-hook on a block's ``attn`` sees its input (the block's normed tokens) and the shared
relative position bias; from them it recomputes softmax(q k^T * scale + per-block bias + shared
bias) with the block's own qkv weights and q/v biases, as timm's unfused path would. The block
itself still runs its normal (fused) forward, so the model's outputs are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def encoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a pretraining model, a timm Beit classifier, a linear probe or a segmenter."""
    for owner in (model, getattr(model, "encoder", None), getattr(model, "backbone", None)):
        blocks = getattr(owner, "blocks", None) if owner is not None else None
        if isinstance(blocks, nn.ModuleList) and len(blocks) and hasattr(blocks[0], "attn"):
            return blocks
    raise ValueError(f"{type(model).__name__} has no BEiT transformer blocks to take attention from")


def attention_weights(attn: nn.Module, x: torch.Tensor,
                      shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
    """[B, heads, N, N] attention probabilities of a timm BEiT ``Attention`` module for its input ``x``."""
    b, n, _ = x.shape
    if attn.q_bias is not None:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias)
    else:
        qkv = attn.qkv(x)
    q, k, _ = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if getattr(attn, "relative_position_bias_table", None) is not None:
        logits = logits + attn._get_rel_pos_bias()
    if shared_rel_pos_bias is not None:
        logits = logits + shared_rel_pos_bias
    return logits.float().softmax(-1)


class AttentionRecorder:
    """``with AttentionRecorder(model, [0, 5]) as rec: model(...)`` -> ``rec.maps[i]``: head-mean attention
    [B, N, N] of block i (0-based) during that forward."""

    def __init__(self, model: nn.Module, block_ids: list[int]):
        self.blocks = encoder_blocks(model)
        bad = [i for i in block_ids if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"blocks {[i + 1 for i in bad]} do not exist: the model has blocks 1..{len(self.blocks)}")
        self.block_ids, self.maps, self._handles = list(block_ids), {}, []

    def _hook(self, i: int):
        def pre_hook(module, args, kwargs):
            shared = kwargs.get("shared_rel_pos_bias", args[1] if len(args) > 1 else None)
            with torch.no_grad():
                self.maps[i] = attention_weights(module, args[0], shared).mean(1).cpu()
        return pre_hook

    def __enter__(self) -> "AttentionRecorder":
        for i in self.block_ids:
            self._handles.append(self.blocks[i].attn.register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def prefix_tokens(n_tokens: int, grid: tuple[int, int]) -> int:
    """Number of tokens (CLS first) before the patch tokens."""
    extra = n_tokens - grid[0] * grid[1]
    if extra < 0:
        raise ValueError(f"{n_tokens} tokens cannot hold a {grid[0]}x{grid[1]} patch grid")
    return extra
