"""A decoder-only transformer whose residual connections are plain, hc or mHC sites.

Written in the style of mlx-lm's `models/llama.py` (a dataclass of arguments, small modules,
`Model(args)(tokens, cache)` -> logits), so mlx-lm's `generate_step` and KV caches work with
it. One site per attention sublayer and one per MLP sublayer; with `residual="hc"|"mhc"` the
embedding is copied into `n_streams` streams before the first block and the streams are
averaged before the final norm. `residual="baseline"` is the same network with `x + F(x)`.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .. import _checks, ops
from ..modules.init import check_init
from .residual import check_mode, make_site, residual_step


@dataclass
class ModelArgs:
    model_type: str = "mhc_transformer"
    vocab_size: int = 256
    hidden_size: int = 64
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    intermediate_size: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    residual: str = "mhc"  # baseline | hc | mhc
    n_streams: int = 4
    dynamic: bool = True
    sinkhorn_iters: int = 20
    site_init: str = "identity"

    def __post_init__(self):
        for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "n_streams", "sinkhorn_iters",
        ):
            _checks.check_positive_int(getattr(self, name), name)
        check_mode(self.residual)
        check_init(self.site_init)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        """Build from a config dict, ignoring keys this model does not use (as mlx-lm does)."""
        known = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def uses_streams(self) -> bool:
        return self.residual != "baseline"


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dims = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.head_dim = dims // self.n_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(dims, dims, bias=False)
        self.k_proj = nn.Linear(dims, dims, bias=False)
        self.v_proj = nn.Linear(dims, dims, bias=False)
        self.o_proj = nn.Linear(dims, dims, bias=False)
        self.rope = nn.RoPE(self.head_dim, base=args.rope_theta)

    def __call__(self, x: mx.array, mask: Optional[Any] = None, cache: Optional[Any] = None) -> mx.array:
        B, L, _ = x.shape
        queries, keys, values = (
            proj(x).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: attention site, then MLP site (each its own residual connection)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dims = args.hidden_size
        self.self_attn = Attention(args)
        self.mlp = MLP(dims, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(dims, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(dims, eps=args.rms_norm_eps)
        site = dict(
            mode=args.residual, dims=dims, n_streams=args.n_streams, dynamic=args.dynamic,
            sinkhorn_iters=args.sinkhorn_iters, init=args.site_init,
        )
        self.attention_site = make_site(**site)
        self.mlp_site = make_site(**site)

    def __call__(self, x: mx.array, mask: Optional[Any] = None, cache: Optional[Any] = None) -> mx.array:
        x = residual_step(self.attention_site, x, lambda h: self.self_attn(self.input_layernorm(h), mask, cache))
        return residual_step(self.mlp_site, x, lambda h: self.mlp(self.post_attention_layernorm(h)))


class MHCTransformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Optional[list] = None) -> mx.array:
        """tokens [B, L] (int) -> logits [B, L, vocab_size]."""
        if inputs.ndim != 2 or not mx.issubdtype(inputs.dtype, mx.integer):
            raise ValueError(f"inputs must be integer token ids of shape [B, L], got {inputs.dtype} {tuple(inputs.shape)}")
        h = self.embed_tokens(inputs)
        if self.args.uses_streams:
            h = ops.expand_streams(h, self.args.n_streams)
        mask = "causal" if inputs.shape[1] > 1 else None
        for layer, layer_cache in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, mask, layer_cache)
        if self.args.uses_streams:
            h = ops.reduce_streams(h)
        h = self.norm(h)
        if self.args.tie_word_embeddings:
            return self.embed_tokens.as_linear(h)
        return self.lm_head(h)


# mlx-lm loads an architecture module's `Model` and `ModelArgs`.
Model = MHCTransformer
