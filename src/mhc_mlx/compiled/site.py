"""The site ops written for speed and compiled; same math as reference/site.py."""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from .sinkhorn import sinkhorn_knopp

F32 = mx.float32


@lru_cache(maxsize=None)
def _scale_index(n: int) -> mx.array:
    # Gathering alpha with a constant index builds [a0]*n ++ [a1]*n ++ [a2]*n*n in one op.
    return mx.array([0] * n + [1] * n + [2] * (n * n), dtype=mx.uint32)


def _activate(h, n, iters):
    H_pre = mx.sigmoid(h[..., :n])
    H_post = 2.0 * mx.sigmoid(h[..., n : 2 * n])
    H_res = sinkhorn_knopp(h[..., 2 * n :].reshape(*h.shape[:-1], n, n), iters)
    return H_pre, H_post, H_res


def _activate_free(h, n):
    # The unconstrained hyper-connection (hc) of the HC paper: H_res used as it comes.
    return mx.sigmoid(h[..., :n]), 2.0 * mx.sigmoid(h[..., n : 2 * n]), h[..., 2 * n :].reshape(*h.shape[:-1], n, n)


def _logits(x, phi, alpha, bias, index, eps):
    xf = x.reshape(*x.shape[:-2], -1).astype(F32)
    inv_r = mx.rsqrt(mx.mean(mx.square(xf), axis=-1, keepdims=True) + eps)
    return (xf @ phi.astype(F32)) * inv_r * alpha.astype(F32)[index] + bias.astype(F32)


@lru_cache(maxsize=None)
def _dynamic(n: int, iters: int, eps: float):
    index = _scale_index(n)

    @mx.compile
    def coefficients(x, phi, alpha, bias):
        return _activate(_logits(x, phi, alpha, bias, index, eps), n, iters)

    return coefficients


@lru_cache(maxsize=None)
def _free(n: int, eps: float, dynamic: bool):
    index = _scale_index(n)

    @mx.compile
    def coefficients(x, phi, alpha, bias):
        h = _logits(x, phi, alpha, bias, index, eps) if dynamic else bias.astype(F32)
        return _activate_free(h, n)

    return coefficients


def hc_coefficients(x, phi, alpha, bias, eps: float = 1e-6):
    """Coefficients of an unconstrained hyper-connection (H_res not projected), for comparisons."""
    return _free(x.shape[-2], eps, phi is not None)(x, phi, alpha, bias)


@lru_cache(maxsize=None)
def _static(n: int, iters: int):
    @mx.compile
    def coefficients(bias):
        return _activate(bias.astype(F32), n, iters)

    return coefficients


def mhc_coefficients(x, phi, alpha, bias, iters: int = 20, eps: float = 1e-6):
    n = x.shape[-2]
    if phi is None:
        return _static(n, iters)(bias)
    return _dynamic(n, iters, eps)(x, phi, alpha, bias)


@mx.compile
def _pre(x, H_pre):
    # [..., 1, n] @ [..., n, C]: a batched GEMV, no [..., n, C] float32 product kept around.
    h = H_pre.astype(F32)[..., None, :] @ x.astype(F32)
    return h.squeeze(-2).astype(x.dtype)


@mx.compile
def _post(x, f, H_post, H_res):
    mixed = H_res.astype(F32) @ x.astype(F32)
    return (mixed + H_post.astype(F32)[..., :, None] * f.astype(F32)[..., None, :]).astype(x.dtype)


def mhc_pre(x, H_pre):
    return _pre(x, H_pre)


def mhc_post(x, f, H_post, H_res):
    return _post(x, f, H_post, H_res)


@lru_cache(maxsize=None)
def _rms(eps: float, weighted: bool):
    if weighted:
        return mx.compile(lambda x, w: mx.fast.rms_norm(x, w, eps))
    return mx.compile(lambda x: mx.fast.rms_norm(x, None, eps))


def rms_norm(x, weight, eps: float):
    if weight is None:
        return _rms(eps, False)(x)
    return _rms(eps, True)(x, weight.astype(x.dtype))


@lru_cache(maxsize=None)
def _layer(iters: int, eps: float):
    @mx.compile
    def layer(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight):
        H_pre = mx.sigmoid(H_pre_raw.astype(F32))
        H_post = 2.0 * mx.sigmoid(H_post_raw.astype(F32))
        H_res = sinkhorn_knopp(H_res_raw, iters)
        h = mx.fast.rms_norm(_pre(x, H_pre), rms_weight.astype(x.dtype), eps)
        return _post(x, h, H_post, H_res)

    return layer


def mhc_layer(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight, iters: int, eps: float):
    return _layer(iters, eps)(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight)
