"""Initial values for site parameters (SPEC section 3).

"identity" is function-preserving: with identical streams (right after expand_streams) the
site computes exactly x + F(x) in every stream, so a network of such sites equals the plain
residual network it replaces. "paper" is the paper's alpha = 0.01, bias = 0.
"""

from __future__ import annotations

import math

import mlx.core as mx

INITS = ("identity", "paper")

# H_res starts with this much of each row on the diagonal: near I, so the streams stay
# distinct, yet far from the saturated corner where Sinkhorn's gradient vanishes (a diagonal
# of 0.9 keeps d(diag)/d(logit) = 0.09, against ~1e-5 for the seed's +-12 logits).
IDENTITY_RES_DIAGONAL = 0.9
# With one stream, H_pre = sigmoid(b) can only approach 1; this keeps the error at 1e-6.
SINGLE_STREAM_PRE = 1.0 - 1e-6
PHI_INIT_STD = 0.02
PAPER_ALPHA = 0.01


def check_init(init) -> str:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    return init


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def identity_pre_logit(n: int) -> float:
    return _logit(SINGLE_STREAM_PRE if n == 1 else 1.0 / n)


def identity_res_logits(n: int) -> mx.array:
    """[n, n] logits whose Sinkhorn projection has IDENTITY_RES_DIAGONAL on the diagonal."""
    if n == 1:
        return mx.zeros((1, 1))
    d = IDENTITY_RES_DIAGONAL
    # Equal row and column sums make exp(logits) doubly stochastic after one row scaling.
    return mx.eye(n) * math.log(d * (n - 1) / (1.0 - d))


def site_bias(n: int, init: str, free_res: bool = False) -> mx.array:
    """bias [2n + n*n] = [pre | post | res]; free_res: H_res used as-is (hc), so start at I."""
    if check_init(init) == "paper":
        return mx.zeros((2 * n + n * n,))
    res = mx.eye(n) if free_res else identity_res_logits(n)
    return mx.concatenate(
        [mx.full((n,), identity_pre_logit(n)), mx.zeros((n,)), res.reshape(-1)]
    ).astype(mx.float32)


def site_alpha(init: str) -> mx.array:
    return mx.full((3,), 0.0 if check_init(init) == "identity" else PAPER_ALPHA)


def site_phi(n: int, dims: int) -> mx.array:
    return PHI_INIT_STD * mx.random.normal((n * dims, 2 * n + n * n))
