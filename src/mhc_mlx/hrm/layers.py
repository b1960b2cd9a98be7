"""HRM's transformer parts: Linear (truncated LeCun init), RoPE, non-causal attention, SwiGLU,
weight-free float32 RMSNorm and the post-norm block (original: models/layers.py and the Block
of models/hrm/hrm_act_v1.py).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..modules import HyperConnection
from .config import HRMConfig
from .initializers import trunc_normal


def rms_norm(x: mx.array, eps: float) -> mx.array:
    """Weight-free RMSNorm over the last axis, computed in float32, returned in x's dtype."""
    return mx.fast.rms_norm(x.astype(mx.float32), None, eps).astype(x.dtype)


def swiglu_width(hidden_size: int, expansion: float, multiple_of: int = 256) -> int:
    """The original's rule: round(expansion * hidden * 2/3), rounded up to a multiple of 256."""
    width = round(expansion * hidden_size * 2 / 3)
    return -(width // -multiple_of) * multiple_of


class Linear(nn.Module):
    """y = x W^T (+ b): weight truncated-normal with std 1/sqrt(in), bias zero (CastedLinear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = trunc_normal((out_features, in_features), std=1.0 / math.sqrt(in_features))
        if bias:
            self.bias = mx.zeros((out_features,))

    def __call__(self, x: mx.array) -> mx.array:
        # Weights are kept in float32 and cast to the activations' dtype, as the original does.
        y = x @ self.weight.astype(x.dtype).T
        if "bias" in self:
            y = y + self.bias.astype(x.dtype)
        return y


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the rotate-half layout (the original's cat(freqs, freqs)).

    Takes [B, heads, L, head_dim]; position p rotates feature pair (i, i + head_dim/2) by
    p * base^(-2i/head_dim).
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.base = base

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.base, scale=1.0, offset=0)


class Attention(nn.Module):
    """Non-causal multi-head self-attention: fused qkv projection, RoPE on q and k."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(hidden_size, 3 * hidden_size)
        self.o_proj = Linear(hidden_size, hidden_size)

    def __call__(self, x: mx.array, rope: RotaryEmbedding | None = None) -> mx.array:
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).reshape(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, heads, L, hd]
        if rope is not None:
            q, k = rope(q), rope(k)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, expansion: float, multiple_of: int = 256):
        super().__init__()
        width = swiglu_width(hidden_size, expansion, multiple_of)
        self.gate_up_proj = Linear(hidden_size, 2 * width)
        self.down_proj = Linear(width, hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.silu(gate) * up)


class HRMBlock(nn.Module):
    """Post-norm transformer block: x = norm(x + attn(x)); x = norm(x + mlp(x)).

    With residual "mhc" or "hc" the state is [B, L, n, C] (n streams) and each residual
    connection is a hyper-connection site followed by the same norm over every stream:
    x = norm(H_res x + H_post (x) attn(H_pre x)). At identity init (streams equal, H_res
    doubly stochastic or I, sum H_pre = 1, H_post = 1) this is exactly the plain block.
    """

    def __init__(self, config: HRMConfig):
        super().__init__()
        self.norm_eps = config.rms_norm_eps
        self.self_attn = Attention(config.hidden_size, config.num_heads)
        self.mlp = SwiGLU(config.hidden_size, config.expansion, config.ffn_multiple_of)
        self.uses_streams = False

    def add_residual_sites(self, config: HRMConfig) -> None:
        """Turn both residual connections into hyper-connection sites (residual "mhc"/"hc").

        Called by the model after every other parameter is drawn, so a plain and an mHC model
        made from the same seed share all their plain weights.
        """
        site = dict(
            dims=config.hidden_size,
            n=config.streams,
            dynamic=config.mhc_dynamic,
            sinkhorn_iters=config.sinkhorn_iters,
            variant=config.residual,
        )
        self.attn_site = HyperConnection(**site)
        self.mlp_site = HyperConnection(**site)
        self.uses_streams = True

    def __call__(self, x: mx.array, rope: RotaryEmbedding | None = None) -> mx.array:
        if not self.uses_streams:
            x = rms_norm(x + self.self_attn(x, rope), self.norm_eps)
            return rms_norm(x + self.mlp(x), self.norm_eps)
        x = rms_norm(self.attn_site(x, lambda h: self.self_attn(h, rope)), self.norm_eps)
        return rms_norm(self.mlp_site(x, self.mlp), self.norm_eps)
