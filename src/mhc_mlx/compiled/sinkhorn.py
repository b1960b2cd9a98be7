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
    return mx.exp(L - mx.max(L, axis=(-2, -1), keepdims=True))


def _normalise(P, axis):
    s = mx.sum(P, axis=axis, keepdims=True)
    return P / mx.maximum(s, TINY), s > TINY


def _forward(L, iters):
    P = _start(L)
    for _ in range(iters):
        P, _ = _normalise(P, -2)
        P, _ = _normalise(P, -1)
    return P


def _backward(L, g, iters):
    # Recompute the iterates, then walk them in reverse carrying the gradient with respect to
    # log P, not P. For out = P / s along an axis, d(log P) = d(log out) - out * sum(d(log out)):
    # the softmax vjp, bounded by construction. The P-space form (g - sum(g * out)) / s has 1/s
    # factors up to 1e30 that overflow into inf * 0 = NaN once logits spread by more than ~70.
    # A clamped sum (s <= TINY) is a constant divisor and passes the gradient through.
    steps, P = [], _start(L)
    for _ in range(iters):
        for axis in (-2, -1):
            P, live = _normalise(P, axis)
            steps.append((P, live, axis))
    gl = g * P
    for out, live, axis in reversed(steps):
        gl = gl - mx.where(live, out * mx.sum(gl, axis=axis, keepdims=True), 0.0)
    # d(log P0)/dL is I minus the max's share, which is zero wherever shift invariance holds
    # (no clamp); route it to the argmax entries (split evenly between ties) as autodiff does.
    at_max = (L == mx.max(L, axis=(-2, -1), keepdims=True)).astype(L.dtype)
    shift = mx.sum(gl, axis=(-2, -1), keepdims=True)
    return gl - shift * at_max / mx.sum(at_max, axis=(-2, -1), keepdims=True)


@lru_cache(maxsize=None)
def _sinkhorn_fn(iters: int):
    # Compiled so each normalisation's divide, clamp and mask fuse into one kernel instead of
    # running as separate ops. Inside mx.compile (the sites) these inline into the caller's graph.
    forward = mx.compile(lambda L: _forward(L.astype(mx.float32), iters))
    backward = mx.compile(lambda L, g: _backward(L.astype(mx.float32), g.astype(mx.float32), iters))

    @mx.custom_function
    def sinkhorn(logits):
        return forward(logits)

    @sinkhorn.vjp
    def sinkhorn_vjp(logits, cotangent, output):
        return backward(logits, cotangent).astype(logits.dtype)

    return sinkhorn


def sinkhorn_knopp(logits: mx.array, iters: int = 20) -> mx.array:
    return _sinkhorn_fn(iters)(logits)
