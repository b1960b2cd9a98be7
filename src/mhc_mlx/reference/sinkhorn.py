"""Sinkhorn–Knopp as SPEC section 1 states it; gradients by plain autodiff through the loop."""

import mlx.core as mx

# Every division uses max(sum, TINY): finite logits never give NaN or Inf.
TINY = 1e-30


def _normalise(P, axis):
    s = mx.sum(P, axis=axis, keepdims=True)
    live = s > TINY
    # A row or column whose mass underflowed (sum <= TINY) is divided by TINY, as SPEC says,
    # but held constant for autodiff, and the live branch divides by 1 there: otherwise the
    # division's vjp squares a tiny sum into 0 and returns 0/0 = NaN. (Sums that are live but
    # tiny, under ~1e-19, can still overflow autodiff here; the compiled path's hand-written
    # backward has no such limit.)
    return mx.where(live, P / mx.where(live, s, 1.0), mx.stop_gradient(P / TINY))


def sinkhorn_knopp(logits: mx.array, iters: int = 20) -> mx.array:
    """[..., n, n] logits -> [..., n, n] doubly stochastic matrix (rows exact at the end)."""
    L = logits.astype(mx.float32)
    # A scalar shift of all logits leaves the result unchanged, so subtracting the max is exact.
    P = mx.exp(L - mx.max(L, axis=(-2, -1), keepdims=True))
    for _ in range(iters):
        P = _normalise(P, -2)  # columns
        P = _normalise(P, -1)  # rows
    return P
