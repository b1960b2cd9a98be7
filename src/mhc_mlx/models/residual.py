"""Residual connections of a transformer block: plain (baseline) or an hc / mHC site.

`residual_step(site, x, sublayer)` is the one place a block adds a sublayer's output back:
with no site it is `x + sublayer(x)` on a hidden state [..., C]; with a HyperConnection it is
the site's read -> sublayer -> mix-and-write on stream state [..., n, C]. While
`record_residual_matrices()` is active, each site's H_res is appended to a list in network
order, which is how the training dashboard measures the gains of the residual stream.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import mlx.core as mx

from ..modules import HyperConnection

RESIDUAL_MODES = ("baseline", "hc", "mhc")

_recording = threading.local()


def check_mode(mode) -> str:
    if mode not in RESIDUAL_MODES:
        raise ValueError(f"unknown residual mode {mode!r}; choose one of {', '.join(RESIDUAL_MODES)}")
    return mode


def make_site(
    mode: str,
    dims: int,
    n_streams: int = 4,
    dynamic: bool = True,
    sinkhorn_iters: int = 20,
    init: str = "identity",
) -> HyperConnection | None:
    """The site for one residual connection: None for baseline, else a HyperConnection."""
    if check_mode(mode) == "baseline":
        return None
    return HyperConnection(
        dims, n=n_streams, dynamic=dynamic, sinkhorn_iters=sinkhorn_iters, init=init, variant=mode
    )


@contextlib.contextmanager
def record_residual_matrices() -> Iterator[list[mx.array]]:
    """Collect every site's H_res ([..., n, n], or [n, n] for static sites) in call order."""
    previous = getattr(_recording, "matrices", None)
    _recording.matrices = matrices = []
    try:
        yield matrices
    finally:
        _recording.matrices = previous


def residual_step(site: HyperConnection | None, x: mx.array, sublayer: Callable[[mx.array], mx.array]) -> mx.array:
    """x + sublayer(x) (no site), or x_next = H_res x + H_post (x) sublayer(H_pre x)."""
    if site is None:
        return x + sublayer(x)
    h, coeffs = site.pre(x)
    matrices = getattr(_recording, "matrices", None)
    if matrices is not None:
        matrices.append(coeffs.res)
    return site.post(x, sublayer(h), coeffs)
