"""One mHC site in plain ops: coefficients, the pre read and the post write (SPEC section 1)."""

from __future__ import annotations

import mlx.core as mx

from .sinkhorn import sinkhorn_knopp

F32 = mx.float32


def coefficient_scale(alpha: mx.array, n: int) -> mx.array:
    """[alpha0]*n ++ [alpha1]*n ++ [alpha2]*n*n: the per-column gain on xf @ phi."""
    a = alpha.astype(F32)
    return mx.concatenate(
        [mx.broadcast_to(a[0], (n,)), mx.broadcast_to(a[1], (n,)), mx.broadcast_to(a[2], (n * n,))]
    )


def mhc_coefficients(x, phi, alpha, bias, iters: int = 20, eps: float = 1e-6):
    """(H_pre [..., n], H_post [..., n], H_res [..., n, n]); static (phi=None) gives no leading dims."""
    n, C = x.shape[-2], x.shape[-1]
    if phi is None:
        h = bias.astype(F32)
    else:
        xf = x.reshape(*x.shape[:-2], n * C).astype(F32)
        r = mx.sqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
        m = (xf @ phi.astype(F32)) / r
        h = m * coefficient_scale(alpha, n) + bias.astype(F32)
    H_pre = mx.sigmoid(h[..., :n])
    H_post = 2.0 * mx.sigmoid(h[..., n : 2 * n])
    H_res = sinkhorn_knopp(h[..., 2 * n :].reshape(*h.shape[:-1], n, n), iters)
    return H_pre, H_post, H_res


def mhc_pre(x, H_pre):
    """h_in[..., c] = sum_i H_pre[i] * x[..., i, c]."""
    xf = x.astype(F32)
    return mx.sum(H_pre.astype(F32)[..., :, None] * xf, axis=-2).astype(x.dtype)


def mhc_post(x, f, H_post, H_res):
    """x_next[..., i, c] = sum_j H_res[i, j] * x[..., j, c] + H_post[i] * f[..., c]."""
    xf = x.astype(F32)
    mixed = mx.sum(H_res.astype(F32)[..., :, :, None] * xf[..., None, :, :], axis=-2)
    written = H_post.astype(F32)[..., :, None] * f.astype(F32)[..., None, :]
    return (mixed + written).astype(x.dtype)


def rms_norm(x, weight, eps: float):
    """Weighted RMSNorm over the last axis, float32 math, result in x's dtype."""
    xf = x.astype(F32)
    y = xf / mx.sqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(F32)
    return y.astype(x.dtype)


def mhc_layer(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight, iters: int, eps: float):
    """The seeds' static layer: F = weighted RMSNorm, coefficients straight from raw logits."""
    H_pre = mx.sigmoid(H_pre_raw.astype(F32))
    H_post = 2.0 * mx.sigmoid(H_post_raw.astype(F32))
    H_res = sinkhorn_knopp(H_res_raw, iters)
    return mhc_post(x, rms_norm(mhc_pre(x, H_pre), rms_weight, eps), H_post, H_res)
