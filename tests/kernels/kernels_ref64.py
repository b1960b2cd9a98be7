"""A float64 NumPy statement of SPEC section 1, independent of mhc_mlx, for the kernel checks.

Inputs are NumPy arrays holding the very values (already rounded to the MLX dtype) that the
MLX code got; everything is upcast to float64 here.
"""

from __future__ import annotations

import numpy as np

TINY = 1e-30


def f64(a):
    return np.asarray(a, dtype=np.float64)


def sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * f64(z)))


def sinkhorn(L, iters):
    L = f64(L)
    P = np.exp(L - L.max(axis=(-2, -1), keepdims=True))
    for _ in range(iters):
        P = P / np.maximum(P.sum(axis=-2, keepdims=True), TINY)
        P = P / np.maximum(P.sum(axis=-1, keepdims=True), TINY)
    return P


def coefficients(x, phi, alpha, bias, iters, eps):
    x, bias = f64(x), f64(bias)
    n, C = x.shape[-2:]
    if phi is None:
        h = bias
    else:
        xf = x.reshape(*x.shape[:-2], n * C)
        r = np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + eps)
        a = f64(alpha)
        scale = np.concatenate([np.full(n, a[0]), np.full(n, a[1]), np.full(n * n, a[2])])
        h = (xf @ f64(phi)) / r * scale + bias
    return (sigmoid(h[..., :n]), 2.0 * sigmoid(h[..., n : 2 * n]),
            sinkhorn(h[..., 2 * n :].reshape(*h.shape[:-1], n, n), iters))


def pre(x, H_pre):
    return np.sum(f64(H_pre)[..., :, None] * f64(x), axis=-2)


def post(x, f, H_post, H_res):
    return f64(H_res) @ f64(x) + f64(H_post)[..., :, None] * f64(f)[..., None, :]


def rms_norm(y, w, eps):
    y = f64(y)
    return y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + eps) * f64(w)


def layer(x, pre_raw, post_raw, res_raw, w, iters, eps):
    H_pre, H_post = sigmoid(pre_raw), 2.0 * sigmoid(post_raw)
    H_res = sinkhorn(res_raw, iters)
    return post(x, rms_norm(pre(x, H_pre), w, eps), H_post, H_res)


def layer_logit_grads(x, pre_raw, post_raw, res_raw, w, g, iters, eps, h=1e-6):
    """float64 gradients of sum(g * layer) with respect to the three raw logits (pre [n], post [n],
    res [n, n]) by central differences of `layer`: a float64 truth for the few coefficient
    gradients, where a float32 reference's own error can near the float32 tolerance (the res
    logits' gradient at n = 2: ~1e-5 of 1 % of the largest gradient in a one-off sweep)."""
    args = [f64(a) for a in (x, pre_raw, post_raw, res_raw, w)]
    g = f64(g)
    grads = []
    for k in (1, 2, 3):
        out = np.zeros_like(args[k])
        for idx in np.ndindex(out.shape):
            up, down = [a.copy() for a in args], [a.copy() for a in args]
            up[k][idx] += h
            down[k][idx] -= h
            out[idx] = (np.sum(g * layer(*up, iters, eps)) - np.sum(g * layer(*down, iters, eps))) / (2 * h)
        grads.append(out)
    return grads


def rel_err(got, want) -> float:
    got, want = f64(got), f64(want)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.linalg.norm((got - want).ravel()) / (np.linalg.norm(want.ravel()) + 1e-300))


def rounding_bound(tol: float, own: float) -> float:
    """A 16-bit gradient's allowed error: tol, or up to twice `own` (the error of the reference
    run in that dtype, i.e. the rounding its semantics carry, such as f rounded to 16 bits before
    it is mixed). Capped at 0.25, and a non-finite `own` excuses nothing: a wrong formula errs by
    about 1. Used by tests/kernels and scripts/gpu_check.py alike."""
    return max(tol, min(2 * own, 0.25)) if np.isfinite(own) else tol
