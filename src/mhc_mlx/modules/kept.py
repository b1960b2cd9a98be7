"""What a module keeps between calls: its checks' and dispatch's outcome per input signature."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import dispatch

# Signatures a module keeps before it starts over.
KEPT_SIZE = 32


class KeepsDecisions(nn.Module):
    """An nn.Module that keeps per-input decisions (checks passed, the path chosen) in a small
    dict keyed by signature(x), forgotten when a non-array attribute (a setting: n, C, iters,
    eps, ...) is assigned. Hot paths look up `self._kept.get(key)` themselves and call keep()
    only on a miss."""

    def __init__(self):
        super().__init__()
        # a plain attribute, not one of the module's children (nn.Module files dicts there)
        object.__setattr__(self, "_kept", {})

    def __setattr__(self, key, val):
        super().__setattr__(key, val)
        if not isinstance(val, mx.array) and "_kept" in self.__dict__:
            self._kept.clear()  # a setting changed

    @staticmethod
    def signature(x) -> tuple | None:
        """What a decision about x may depend on: its shape and dtype and dispatch.state()."""
        return (x.shape, x.dtype, dispatch.state()) if isinstance(x, mx.array) else None

    def keep(self, key, value):
        """Keep value for key (starting over when full) and return it."""
        if len(self._kept) >= KEPT_SIZE:
            self._kept.clear()
        self._kept[key] = value
        return value
