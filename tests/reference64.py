"""An independent float64 NumPy reference of the mHC math (SPEC section 1), for the tests.

Written from SPEC section 1 and the documented mlx-mhc 0.4.1 semantics only; it shares no code
with `mhc_mlx` and imports no MLX. Every function takes NumPy arrays (any float dtype: they are
upcast to float64 first) and returns float64 NumPy arrays, so a test hands it the very values
(already rounded to float32/bfloat16/float16) that it handed the MLX code.

Shapes follow SPEC: stream state x is [..., n, C]; coefficients are H_pre [..., n],
H_post [..., n], H_res [..., n, n] (static ones carry no leading dims and broadcast).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

SUM_FLOOR = 1e-30  # SPEC: every Sinkhorn division uses max(sum, 1e-30)


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def sigmoid(z) -> np.ndarray:
    # tanh form: no overflow warning for large |z|, exact to float64 rounding.
    return 0.5 * (1.0 + np.tanh(0.5 * f64(z)))


def logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.log(np.sum(np.exp(a - top), axis=axis, keepdims=True)) + top


# --------------------------------------------------------------------------- SPEC section 1


def sinkhorn_knopp(logits, iters: int = 20) -> np.ndarray:
    """[..., n, n] -> [..., n, n]: exp(L - max L), then `iters` x (columns, then rows)."""
    L = f64(logits)
    P = np.exp(L - np.max(L, axis=(-2, -1), keepdims=True))
    for _ in range(iters):
        P = P / np.maximum(np.sum(P, axis=-2, keepdims=True), SUM_FLOOR)
        P = P / np.maximum(np.sum(P, axis=-1, keepdims=True), SUM_FLOOR)
    return P


def coefficient_logits(x, phi=None, alpha=None, bias=None, eps: float = 1e-6) -> np.ndarray:
    """h = (xf @ phi) / rms(xf) * alpha-per-block + bias ([..., 2n + n*n]); static: h = bias."""
    x = f64(x)
    n, C = x.shape[-2], x.shape[-1]
    bias = f64(bias)
    if phi is None:
        return bias
    xf = x.reshape(x.shape[:-2] + (n * C,))
    r = np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + eps)
    m = (xf @ f64(phi)) / r
    a = f64(alpha)
    scale = np.concatenate([np.full(n, a[0]), np.full(n, a[1]), np.full(n * n, a[2])])
    return m * scale + bias


def mhc_coefficients(x, phi=None, alpha=None, bias=None, iters: int = 20, eps: float = 1e-6, variant: str = "mhc"):
    """(H_pre, H_post, H_res). variant="hc": H_res is the raw logits (unconstrained)."""
    n = np.shape(x)[-2]
    h = coefficient_logits(x, phi, alpha, bias, eps)
    H_pre = sigmoid(h[..., :n])
    H_post = 2.0 * sigmoid(h[..., n : 2 * n])
    res_logits = h[..., 2 * n :].reshape(h.shape[:-1] + (n, n))
    H_res = res_logits if variant == "hc" else sinkhorn_knopp(res_logits, iters)
    return H_pre, H_post, H_res


def mhc_pre(x, H_pre) -> np.ndarray:
    """h_in[..., c] = sum_i H_pre[..., i] x[..., i, c]."""
    return np.sum(f64(H_pre)[..., :, None] * f64(x), axis=-2)


def mhc_post(x, f, H_post, H_res) -> np.ndarray:
    """x_next[..., i, c] = sum_j H_res[..., i, j] x[..., j, c] + H_post[..., i] f[..., c]."""
    x, f = f64(x), f64(f)
    mixed = np.sum(f64(H_res)[..., :, :, None] * x[..., None, :, :], axis=-2)
    return mixed + f64(H_post)[..., :, None] * f[..., None, :]


def expand_streams(x, n: int) -> np.ndarray:
    x = f64(x)
    return np.repeat(x[..., None, :], n, axis=-2)


def reduce_streams(x, reduction: str = "mean") -> np.ndarray:
    x = f64(x)
    return np.mean(x, axis=-2) if reduction == "mean" else np.sum(x, axis=-2)


def rms_norm(x, weight=None, eps: float = 1e-5) -> np.ndarray:
    x = f64(x)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * f64(weight)


def site(x, sublayer: Callable[[np.ndarray], np.ndarray], phi=None, alpha=None, bias=None,
         iters: int = 20, eps: float = 1e-6, variant: str = "mhc") -> np.ndarray:
    """One mHC site: x_next = H_res x + H_post (x) sublayer(H_pre x)."""
    H_pre, H_post, H_res = mhc_coefficients(x, phi, alpha, bias, iters, eps, variant)
    return mhc_post(x, sublayer(mhc_pre(x, H_pre)), H_post, H_res)


def mhc_layer(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight, iters: int = 20, eps: float = 1e-5) -> np.ndarray:
    """The seeds' static layer: sinkhorn(H_res_raw) x + 2 sigmoid(H_post_raw) (x) rms_norm(sigmoid(H_pre_raw) . x)."""
    y = rms_norm(mhc_pre(x, sigmoid(H_pre_raw)), rms_weight, eps)
    return mhc_post(x, y, 2.0 * sigmoid(H_post_raw), sinkhorn_knopp(H_res_raw, iters))


def plain_residual(x, sublayers) -> np.ndarray:
    """What an identity-initialised stack of sites must equal: x <- x + f_k(x)."""
    x = f64(x)
    for f in sublayers:
        x = x + f(x)
    return x


def linear(h, weight, bias=None) -> np.ndarray:
    """nn.Linear's map, h @ weight.T + bias, in float64."""
    y = f64(h) @ f64(weight).T
    return y if bias is None else y + f64(bias)


# --------------------------------------------------------------------------- mlx-mhc 0.4.1


def _stochastic_error(P: np.ndarray) -> float:
    return max(np.max(np.abs(P.sum(axis=-1) - 1.0)), np.max(np.abs(P.sum(axis=-2) - 1.0)))


def compat_sinkhorn_one(matrix, max_iterations: int = 100, epsilon: float = 1e-6, log_space: bool = True):
    """One [n, n] matrix the mlx-mhc way: row then column normalisation, stop as soon as both
    row and column sums are within epsilon of 1. Returns (P, errors) where errors[k] is the
    error after iteration k+1 (the test uses it to avoid matrices float32 cannot decide)."""
    L = f64(matrix)
    errors = []
    if log_space:
        for _ in range(max_iterations):
            L = L - logsumexp(L, axis=-1)
            L = L - logsumexp(L, axis=-2)
            errors.append(_stochastic_error(np.exp(L)))
            if errors[-1] < epsilon:
                break
        return np.exp(L), errors
    P = np.exp(L - np.max(L))
    for _ in range(max_iterations):
        P = P / np.maximum(P.sum(axis=-1, keepdims=True), SUM_FLOOR)
        P = P / np.maximum(P.sum(axis=-2, keepdims=True), SUM_FLOOR)
        errors.append(_stochastic_error(P))
        if errors[-1] < epsilon:
            break
    return P, errors


def compat_sinkhorn(matrix, max_iterations: int = 100, epsilon: float = 1e-6, log_space: bool = True) -> np.ndarray:
    """mlx_mhc.sinkhorn_knopp over [..., n, n]: each matrix stops on its own."""
    M = f64(matrix)
    flat = M.reshape((-1,) + M.shape[-2:])
    out = np.stack([compat_sinkhorn_one(m, max_iterations, epsilon, log_space)[0] for m in flat])
    return out.reshape(M.shape)


def manifold_hyper_connection(x, layer_output, bias, sinkhorn_iterations: int = 10) -> np.ndarray:
    """mlx_mhc.ManifoldHyperConnection(x, layer_output): a static site with n = expansion.

    Hidden-state form (layer_output has x's shape [..., dims]):
        mean_i( sum_j H_res[i, j] x + H_post[i] layer_output )
    Stream-state form (x [..., n, dims], layer_output [..., dims]):
        H_res x + H_post (x) layer_output.
    """
    x, lo = f64(x), f64(layer_output)
    bias = f64(bias)
    n = int(round((-2 + np.sqrt(4 + 4 * bias.size)) / 2))  # bias has 2n + n*n entries
    H_post = 2.0 * sigmoid(bias[n : 2 * n])
    H_res = sinkhorn_knopp(bias[2 * n :].reshape(n, n), sinkhorn_iterations)
    if x.shape == lo.shape:
        streams = np.repeat(x[..., None, :], n, axis=-2)
        written = np.einsum("ij,...jc->...ic", H_res, streams) + H_post[:, None] * lo[..., None, :]
        return np.mean(written, axis=-2)
    return np.einsum("ij,...jc->...ic", H_res, x) + H_post[:, None] * lo[..., None, :]


# --------------------------------------------------------------------------- finite differences


def central_difference(loss: Callable[[np.ndarray], float], at, step: float = 1e-6) -> np.ndarray:
    """d loss / d at, entry by entry, by central differences in float64."""
    at = f64(at).copy()
    grad = np.zeros_like(at)
    flat, gflat = at.reshape(-1), grad.reshape(-1)
    for k in range(flat.size):
        keep = flat[k]
        flat[k] = keep + step
        up = loss(at)
        flat[k] = keep - step
        down = loss(at)
        flat[k] = keep
        gflat[k] = (up - down) / (2 * step)
    return grad


def directional_difference(loss: Callable[[np.ndarray], float], at, direction, step: float = 1e-6) -> float:
    """d loss / d at along `direction`, by a central difference in float64 (for large arrays)."""
    at, direction = f64(at), f64(direction)
    return (loss(at + step * direction) - loss(at - step * direction)) / (2 * step)
