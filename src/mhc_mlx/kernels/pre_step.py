"""The dynamic site's read step (coefficients + pre) as one custom function.

As two ops, x's cotangent from the read step arrives twice (pre's H_pre (x) dh and the
coefficients' backward) and MLX adds the two [T, n, C] arrays; pre's backward also writes its
share in full. Here the backward runs pre's coefficient gradient alone (site.PRE_VJP at
DX = false: reads x and dh, writes [T, n]), then the coefficient backward, whose kernel adds
H_pre (x) dh as it writes x's cotangent (coefficients.DYNAMIC_VJP_PRE). At 4096 x 4 x 4096 bf16 that drops one
[T, n, C] write and one add (two reads and a write), about 0.5 GB of traffic, for one read
of dh [T, C]. The forward is the same two kernels where the coefficients take the
tensor-core form (large batches); on CUDA in the kernel form (fewer than
coefficients.MMA_MIN_ELEMENTS elements of x, or float32 x) one launch computes the coefficients
and h (coefficients.DYNAMIC_PRE), one launch less where launches dominate (B = 1).

HyperConnection takes it where kernels.FUSED_READ_STEP allows ("auto", the default: only where
the forward is that one launch; on the H200 the two ops were faster at 4096 x 4 x 4096, see
kernels/__init__.py) and the kernels run both ops.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from . import build, coefficients, site
from .build import watch


@lru_cache(maxsize=None)
def _function(n: int, iters: int, eps: float, chained: bool = False):
    """chained: x passed through as a seventh output for post to read in place of x; post's
    x cotangent then comes back here and the coefficient backward's kernel adds it
    (site.py, "chained")."""

    @mx.custom_function
    def read_step(x, phi, alpha, bias):
        lead, C = x.shape[:-2], x.shape[-1]
        # CUDA only (read_step_in_one_launch): on Metal each kernel must pass its first-use
        # check (safety.py), which covers the two ops' kernels, not this one
        if coefficients.read_step_in_one_launch(x):  # coefficients and h from one launch
            H_pre, H_post, H_res, m, invr, h = coefficients.dynamic_read_forward(
                x.reshape(-1, n * C), phi, alpha, bias, n, iters, eps)
            out = (h.reshape(*lead, C), H_pre.reshape(*lead, n), H_post.reshape(*lead, n),
                   H_res.reshape(*lead, n, n), m, invr)
        else:
            H_pre, H_post, H_res, m, invr = coefficients.dynamic_coefficients_forward(x, phi, alpha, bias, n, iters, eps)
            out = (site.pre_forward(x, H_pre), H_pre, H_post, H_res, m, invr)
        return (*out, x) if chained else out

    @read_step.vjp
    def read_step_vjp(primals, cotangents, outputs):
        x = primals[0]
        dh, g_pre, g_post, g_res = cotangents[:4]
        H_pre = outputs[1]
        g_pre = g_pre.astype(mx.float32) + site.pre_vjp_coefficients(x, dh).reshape(H_pre.shape)
        return coefficients.dynamic_vjp(primals, [g_pre, g_post, g_res], outputs[1:6], n, iters, pre=(H_pre, dh),
                                        gacc=cotangents[6] if chained else None)

    return read_step


@lru_cache(maxsize=None)
def _call(n: int, iters: int, eps: float):
    """The read step as a plain function of its arrays, its four outputs (for build.compiled)."""
    read_step = _function(n, iters, eps)
    return lambda x, phi, alpha, bias: read_step(x, phi, alpha, bias)[:4]


def mhc_pre_step(x, phi, alpha, bias, iters: int = 20, eps: float = 1e-6):
    """(h [..., C], H_pre [..., n], H_post [..., n], H_res [..., n, n]) for x [..., n, C]."""
    n = x.shape[-2]
    if build.compiles_latency(x):
        return build.compiled(_call(n, iters, float(eps)))(x, phi, alpha, bias)
    h, H_pre, H_post, H_res, _, _ = _function(n, iters, float(eps))(x, phi, alpha, bias)
    return h, H_pre, H_post, H_res


def mhc_pre_step_chained(x, phi, alpha, bias, iters: int = 20, eps: float = 1e-6):
    """As mhc_pre_step, and x' (x passed through) for post to read in place of x."""
    h, H_pre, H_post, H_res, _, _, x_next = _function(x.shape[-2], iters, float(eps), True)(x, phi, alpha, bias)
    return h, H_pre, H_post, H_res, x_next


watch(__name__)  # settings assigned later bump build.settings_epoch
