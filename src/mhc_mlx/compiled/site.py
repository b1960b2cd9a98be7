"""The site ops written for speed and compiled; same math as reference/site.py."""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from .matmul import EXACT_IN_TF32, exact_matmul, needs_split
from .sinkhorn import sinkhorn_knopp

F32 = mx.float32


@lru_cache(maxsize=None)
def scale_index(n: int) -> mx.array:
    # Gathering alpha with a constant index builds [a0]*n ++ [a1]*n ++ [a2]*n*n in one op.
    return mx.array([0] * n + [1] * n + [2] * (n * n), dtype=mx.uint32)


def _split_matmul(a, b):
    # float32 a @ b, exact where MLX uses TF32 (compiled/matmul.py); factors in their own dtype
    exact = exact_matmul(a.dtype in EXACT_IN_TF32, b.dtype in EXACT_IN_TF32)
    if a.ndim == 1:  # a vector (one token's x): as a row, then drop it
        return exact(a[None].astype(F32), b.astype(F32)).squeeze(-2)
    return exact(a.astype(F32), b.astype(F32))


def _plain_matmul(a, b):
    return a.astype(F32) @ b.astype(F32)


def _needs_split() -> bool:
    return needs_split()


def _activate(h, n, iters):
    H_pre = mx.sigmoid(h[..., :n])
    H_post = 2.0 * mx.sigmoid(h[..., n : 2 * n])
    H_res = sinkhorn_knopp(h[..., 2 * n :].reshape(*h.shape[:-1], n, n), iters)
    return H_pre, H_post, H_res


def _activate_free(h, n):
    # The unconstrained hyper-connection (hc) of the HC paper: H_res used as it comes.
    return mx.sigmoid(h[..., :n]), 2.0 * mx.sigmoid(h[..., n : 2 * n]), h[..., 2 * n :].reshape(*h.shape[:-1], n, n)


def _logits(x, phi, alpha, bias, index, eps, matmul):
    x2 = x.reshape(*x.shape[:-2], -1)
    xf = x2.astype(F32)
    inv_r = mx.rsqrt(mx.mean(mx.square(xf), axis=-1, keepdims=True) + eps)
    return matmul(x2, phi) * inv_r * alpha.astype(F32)[index] + bias.astype(F32)


@lru_cache(maxsize=None)
def _dynamic(n: int, iters: int, eps: float, split: bool):
    index = scale_index(n)
    matmul = _split_matmul if split else _plain_matmul

    @mx.compile
    def coefficients(x, phi, alpha, bias):
        return _activate(_logits(x, phi, alpha, bias, index, eps, matmul), n, iters)

    return coefficients


@lru_cache(maxsize=None)
def _free(n: int, eps: float, dynamic: bool, split: bool):
    index = scale_index(n)
    matmul = _split_matmul if split else _plain_matmul

    @mx.compile
    def coefficients(x, phi, alpha, bias):
        h = _logits(x, phi, alpha, bias, index, eps, matmul) if dynamic else bias.astype(F32)
        return _activate_free(h, n)

    return coefficients


def hc_coefficients(x, phi, alpha, bias, eps: float = 1e-6):
    """Coefficients of an unconstrained hyper-connection (H_res not projected), for comparisons."""
    return _free(x.shape[-2], eps, phi is not None, _needs_split())(x, phi, alpha, bias)


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
    return _dynamic(n, iters, eps, _needs_split())(x, phi, alpha, bias)


def _pre_with(matmul):
    def pre(x, H_pre):
        # [..., 1, n] @ [..., n, C]: a batched GEMV, no [..., n, C] float32 product kept around.
        return matmul(H_pre[..., None, :], x).squeeze(-2).astype(x.dtype)

    return pre


def _post_with(matmul):
    def post(x, f, H_post, H_res):
        mixed = matmul(H_res, x)
        return (mixed + H_post.astype(F32)[..., :, None] * f.astype(F32)[..., None, :]).astype(x.dtype)

    return post


@lru_cache(maxsize=None)
def _pre(split: bool):
    return mx.compile(_pre_with(_split_matmul if split else _plain_matmul))


@lru_cache(maxsize=None)
def _post(split: bool):
    return mx.compile(_post_with(_split_matmul if split else _plain_matmul))


def mhc_pre(x, H_pre):
    return _pre(_needs_split())(x, H_pre)


def mhc_post(x, f, H_post, H_res):
    return _post(_needs_split())(x, f, H_post, H_res)


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
def _layer(iters: int, eps: float, split: bool):
    matmul = _split_matmul if split else _plain_matmul
    pre, post = _pre_with(matmul), _post_with(matmul)

    @mx.compile
    def layer(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight):
        H_pre = mx.sigmoid(H_pre_raw.astype(F32))
        H_post = 2.0 * mx.sigmoid(H_post_raw.astype(F32))
        H_res = sinkhorn_knopp(H_res_raw, iters)
        h = mx.fast.rms_norm(pre(x, H_pre), rms_weight.astype(x.dtype), eps)
        return post(x, h, H_post, H_res)

    return layer


def mhc_layer(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight, iters: int, eps: float):
    return _layer(iters, eps, _needs_split())(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight)
