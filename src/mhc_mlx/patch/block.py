"""PatchedBlock: an mlx-lm transformer block whose two residual additions are mHC sites."""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .. import ops
from ..models.residual import make_site, residual_step
from .architectures import BlockLayout


class PatchedBlock(nn.Module):
    """Runs `block`'s own sublayers and norms, with `attention_site` and `mlp_site` as residuals.

    The block's children are adopted under their original names (so weight keys, LoRA
    targets and `shard()` still find `self_attn.q_proj` and friends) and its plain attributes
    (`use_sliding`, `args`, ...) are kept. The first block of a model expands the hidden state
    [B, L, C] into n streams, the last one averages them back, so the model around the blocks
    (embedding, masks, final norm, head) runs unchanged.
    """

    def __init__(
        self,
        block: nn.Module,
        layout: BlockLayout,
        architecture: str,
        dims: int,
        n_streams: int,
        dynamic: bool,
        sinkhorn_iters: int,
        variant: str,
        init: str,
        expand_input: bool,
        reduce_output: bool,
    ):
        super().__init__()
        for name, child in block.items():
            self[name] = child
        for name, value in vars(block).items():
            if not name.startswith("_") and name not in self:
                setattr(self, name, value)
        site = dict(
            mode=variant, dims=dims, n_streams=n_streams, dynamic=dynamic,
            sinkhorn_iters=sinkhorn_iters, init=init,
        )
        self.attention_site = make_site(**site)
        self.mlp_site = make_site(**site)
        self.layout = layout
        self.architecture = architecture
        self.n_streams = n_streams
        self.expand_input = expand_input
        self.reduce_output = reduce_output
        self.train(block.training)

    def _extra_repr(self) -> str:
        return f"{self.architecture}, n_streams={self.n_streams}"

    def _norm(self, name: Optional[str], x: mx.array) -> mx.array:
        return x if name is None else self[name](x)

    def __call__(self, x: mx.array, mask: Optional[Any] = None, cache: Optional[Any] = None) -> mx.array:
        lay = self.layout
        if self.expand_input:
            x = ops.expand_streams(x, self.n_streams)

        def attention(h):
            out = self[lay.attention](self[lay.attention_norm](h), mask, cache)
            return self._norm(lay.attention_out_norm, out)

        def mlp(h):
            return self._norm(lay.mlp_out_norm, self[lay.mlp](self[lay.mlp_norm](h)))

        x = residual_step(self.attention_site, x, attention)
        x = residual_step(self.mlp_site, x, mlp)
        return ops.reduce_streams(x) if self.reduce_output else x
