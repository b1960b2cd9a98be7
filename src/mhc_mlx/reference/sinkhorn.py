"""Sinkhorn–Knopp as SPEC section 1 states it; gradients by plain autodiff through the loop."""

import mlx.core as mx

# Every division uses max(sum, TINY): finite logits never give NaN or Inf.
TINY = 1e-30


def sinkhorn_knopp(logits: mx.array, iters: int = 20) -> mx.array:
    """[..., n, n] logits -> [..., n, n] doubly stochastic matrix (rows exact at the end)."""
    L = logits.astype(mx.float32)
    # A scalar shift of all logits leaves the result unchanged, so subtracting the max is exact.
    P = mx.exp(L - mx.max(L, axis=(-2, -1), keepdims=True))
    for _ in range(iters):
        P = P / mx.maximum(mx.sum(P, axis=-2, keepdims=True), TINY)  # columns
        P = P / mx.maximum(mx.sum(P, axis=-1, keepdims=True), TINY)  # rows
    return P
