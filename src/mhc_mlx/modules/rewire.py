"""MHCRewire: any [..., dims] -> [..., dims] module as the sublayer of an mHC site."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import _checks, ops
from .hyper_connection import HyperConnection


class MHCRewire(nn.Module):
    """Wrap `module` (Linear, channels-last Conv2d, QuantizedLinear, a whole block) in an mHC site.

    Which input it takes is decided by `stream_state`, never guessed from shapes:

    - stream_state=False (default): x is a hidden state [..., dims]. It is expanded to n
      streams, run through the site and reduced (mean) back to [..., dims]. With the default
      init this returns exactly x + module(x).
    - stream_state=True: x is stream state [..., n, dims] and so is the result, so rewired
      modules chain; put expand_streams before the first and reduce_streams after the last.

    Other arguments are HyperConnection's.
    """

    def __init__(
        self,
        module: nn.Module,
        dims: int,
        n: int = 4,
        dynamic: bool = True,
        sinkhorn_iters: int = 20,
        init: str = "identity",
        stream_state: bool = False,
        variant: str = "mhc",
    ):
        super().__init__()
        if not callable(module):
            raise TypeError(f"module must be callable [..., dims] -> [..., dims], got {type(module).__name__}")
        self.module = module
        self.hc = HyperConnection(dims, n=n, dynamic=dynamic, sinkhorn_iters=sinkhorn_iters, init=init, variant=variant)
        self.stream_state = bool(stream_state)

    def _extra_repr(self) -> str:
        return f"stream_state={self.stream_state}"

    def __call__(self, x: mx.array) -> mx.array:
        n, dims = self.hc.n, self.hc.dims
        if self.stream_state:
            _checks.check_streams(x, "x", n=n, C=dims)
            return self.hc(x, self.module)
        _checks.check_float(x, "x")
        if x.ndim < 1 or x.shape[-1] != dims:
            raise ValueError(
                f"x must be a hidden state [..., {dims}], got shape {tuple(x.shape)} "
                "(pass stream_state=True for stream state [..., n, dims])"
            )
        return ops.reduce_streams(self.hc(ops.expand_streams(x, n), self.module))
