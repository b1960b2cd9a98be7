"""Sinkhorn–Knopp with an exact backward through mx.custom_function.

Autodiff through the loop keeps a graph of 2*iters normalisations alive from the forward to
the backward. Here the forward keeps only the logits; the backward recomputes the iterates
and walks them in reverse, which gives the same gradient (to rounding) as autodiff.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from ..reference.sinkhorn import TINY


def _start(L):
    m = mx.max(L, axis=(-2, -1), keepdims=True)
    return mx.exp(L - m), m


def _normalise(P, axis):
    s = mx.sum(P, axis=axis, keepdims=True)
    return P / mx.maximum(s, TINY), s


def _forward(L, iters):
    P, _ = _start(L)
    for _ in range(iters):
        P, _ = _normalise(P, -2)
        P, _ = _normalise(P, -1)
    return P


def _normalise_vjp(g, out, s, axis):
    # out = P / max(s, TINY); s = sum(P): dP = (g - sum(g * out)) / s where s > TINY, else g / TINY.
    live = s > TINY
    inner = mx.where(live, mx.sum(g * out, axis=axis, keepdims=True), 0.0)
    return (g - inner) / mx.maximum(s, TINY)


def _backward(L, g, iters):
    P0, m = _start(L)
    steps = []  # (P after the step, the sum it divided by, axis), in forward order
    P = P0
    for _ in range(iters):
        for axis in (-2, -1):
            P, s = _normalise(P, axis)
            steps.append((P, s, axis))
    for P, s, axis in reversed(steps):
        g = _normalise_vjp(g, P, s, axis)
    gL = g * P0
    # The max shift only matters where a clamp at TINY broke shift invariance; route its
    # gradient to the argmax entries (split evenly between ties) like autodiff does.
    at_max = (L == m).astype(L.dtype)
    shift = mx.sum(gL, axis=(-2, -1), keepdims=True)
    return gL - shift * at_max / mx.sum(at_max, axis=(-2, -1), keepdims=True)


@lru_cache(maxsize=None)
def _sinkhorn_fn(iters: int):
    @mx.custom_function
    def sinkhorn(logits):
        return _forward(logits.astype(mx.float32), iters)

    @sinkhorn.vjp
    def sinkhorn_vjp(logits, cotangent, output):
        g = _backward(logits.astype(mx.float32), cotangent.astype(mx.float32), iters)
        return g.astype(logits.dtype)

    return sinkhorn


def sinkhorn_knopp(logits: mx.array, iters: int = 20) -> mx.array:
    return _sinkhorn_fn(iters)(logits)
