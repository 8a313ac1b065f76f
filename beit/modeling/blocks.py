"""timm's BEiT ``Block`` with a faster CPU attention and a forward that outputs chosen rows only.

Same parameters, buffers and state-dict keys as ``timm.models.beit.Block`` / ``Attention`` (they
are subclasses; hooks on ``block.attn`` still fire), the same maths up to float rounding:

- on CPU the attention is written out (``q @ k^T``, bias added in place, softmax, ``@ v``). torch's
  SDPA with a float mask that needs a gradient falls back to its math backend there, which also
  scales q and k separately and runs a "safe softmax" (``isneginf``/``all``/``where`` passes over
  every score matrix) that a finite relative-position bias never needs. Elsewhere (CUDA) SDPA runs.
- q, k and v are split off the fused projection along its own (token-major) layout, so backward
  assembles the fused gradient without an extra transposed copy.
- ``BeitBlock.forward_rows`` computes the block for a fixed number of rows per sample (keys and
  values still from every token): BEiT's last block only has to produce the masked positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.beit import Attention, Block


class BeitAttention(Attention):
    """timm's BEiT attention (shared relative position bias only) with the CPU path above and
    optional query ``rows`` ([B, R] token indices per sample)."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias=None, rows: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv_bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias).view(b, n, 3, self.num_heads, -1)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [b, heads, n, head_dim] views
        bias = shared_rel_pos_bias
        if rows is not None:  # the query rows of each sample, and the bias rows of those positions
            q = torch.gather(q, 2, rows[:, None, :, None].expand(-1, self.num_heads, -1, q.shape[-1]))
            if bias is not None:
                bias = bias.reshape(self.num_heads, n, n)[:, rows].transpose(0, 1)  # [b, heads, R, n]
        if x.device.type == "cpu":
            s = torch.matmul(q * self.scale, k.transpose(-2, -1))
            if bias is not None:
                s.add_(bias)  # matmul's backward does not need its output: in place is safe
            out = torch.matmul(s.softmax(dim=-1), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, -1, c)))


class BeitBlock(Block):
    """``timm.models.beit.Block`` with ``BeitAttention`` and ``forward_rows``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.attn.relative_position_bias_table is not None or self.attn.attn_drop.p:
            raise ValueError("BeitBlock takes the shared relative position bias only, without attention dropout")
        # same module, same tensors and init draws as timm's: only the forward differs
        self.attn.__class__ = BeitAttention

    def forward_rows(self, x: torch.Tensor, shared_rel_pos_bias, rows: torch.Tensor) -> torch.Tensor:
        """The block's output at ``rows`` ([B, R] token indices per sample) only: [B, R, D], equal to
        ``forward(x)`` gathered at ``rows`` (drop path draws the same per-sample mask)."""
        attn_out = self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias, rows=rows)
        x = torch.gather(x, 1, rows[:, :, None].expand(-1, -1, x.shape[-1]))
        if self.gamma_1 is None:
            x = x + self.drop_path1(attn_out)
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        x = x + self.drop_path1(self.gamma_1 * attn_out)
        return x + self.drop_path2(self.gamma_2 * self.mlp(self.norm2(x)))
