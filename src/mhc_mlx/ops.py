"""The functional API (SPEC section 2): input checks, then one dispatch per op.

All functions are batched over any leading dims, sync nothing with the device and have
gradients under mx.grad / mx.value_and_grad / mx.compile.
"""

from __future__ import annotations

import mlx.core as mx

from . import _checks, kernels
from .dispatch import choose

REDUCTIONS = ("mean", "sum")


# The dispatch without the checks: modules check their input once and call these (at B = 1 the
# repeated checks of pre, coefficients and post were a large part of the Python graph building).
def run_coefficients(x, phi, alpha, bias, iters: int, eps: float):
    return choose("mhc_coefficients", x, phi, alpha, bias, iters=iters, eps=eps)[1](x, phi, alpha, bias, iters, eps)


def _takes_read_step(x) -> bool:
    """kernels.FUSED_READ_STEP for x: True, False, or "auto" (where its forward is one launch)."""
    if kernels.FUSED_READ_STEP == "auto":
        from .kernels import coefficients

        return coefficients.read_step_in_one_launch(x)
    return bool(kernels.FUSED_READ_STEP)


def run_pre_step(x, phi, alpha, bias, iters: int, eps: float):
    """(h, H_pre, H_post, H_res) through the fused read step of a dynamic site
    (kernels.FUSED_READ_STEP) when it applies and the kernels run both of its ops; else None."""
    if not _takes_read_step(x):
        return None
    if choose("mhc_coefficients", x, phi, alpha, bias, iters=iters, eps=eps)[0] != "kernels":
        return None
    if choose("mhc_pre", x)[0] != "kernels":
        return None
    from .kernels import pre_step

    return pre_step.mhc_pre_step(x, phi, alpha, bias, iters, eps)


def _one_pass_applies(x) -> bool:
    """kernels.ONE_PASS_VJP's reach: where the coefficient backward takes tensor cores and the
    one pass covers x (16-bit, n <= 4, C a multiple of its slice)."""
    from .kernels import coefficients, one_pass_vjp

    return one_pass_vjp.applies(x) and coefficients.backward_on_tensor_cores(x)


def run_chained_read(x, phi, alpha, bias, iters: int, eps: float):
    """(h, (H_pre, H_post, H_res), x', deferred) through the chained kernel forms
    (kernels.CHAIN_X_COTANGENT; CUDA), or None where they do not apply. Post must read x' in
    place of x: x's cotangent then comes back down the chain and is written once
    (kernels/site.py, "chained"). deferred (kernels.DEFER_POST_X): H_res is pre's H_res', and
    post must be site.mhc_post_deferred on x' and it (its backward leaves both cotangents to pre's)."""
    if not kernels.CHAIN_X_COTANGENT or kernels.gpu_backend() != "cuda":
        return None
    from .kernels import coefficients, pre_step, site

    if kernels.CHAIN_X_COTANGENT == "auto" and (phi is None or not coefficients.backward_on_tensor_cores(x)):
        return None
    if choose("mhc_pre", x)[0] != "kernels":
        return None

    if phi is None:  # static: the coefficients do not depend on x
        H, x_pre = run_coefficients(x, None, None, bias, iters, eps), x
    elif choose("mhc_coefficients", x, phi, alpha, bias, iters=iters, eps=eps)[0] != "kernels":
        H, x_pre = run_coefficients(x, phi, alpha, bias, iters, eps), x
    elif kernels.ONE_PASS_VJP and kernels.DEFER_POST_X and _one_pass_applies(x):
        from .kernels import one_pass_vjp

        h, H_pre, H_post, _, x_post, H_res = one_pass_vjp.mhc_read_one_pass(x, phi, alpha, bias, iters, eps)
        return h, (H_pre, H_post, H_res), x_post, True
    elif _takes_read_step(x):
        h, *H, x_post = pre_step.mhc_pre_step_chained(x, phi, alpha, bias, iters, eps)
        return h, tuple(H), x_post, False
    else:
        *H, x_pre = coefficients.mhc_coefficients_chained(x, phi, alpha, bias, iters, eps)
    if kernels.DEFER_POST_X and x.shape[-2] <= site.MAX_N_REDUCE:
        h, x_post, H_res = site.mhc_pre_chained_res(x_pre, H[0], H[2])
        return h, (H[0], H[1], H_res), x_post, True
    h, x_post = site.mhc_pre_chained(x_pre, H[0])
    return h, tuple(H), x_post, False


def run_pre(x: mx.array, H_pre: mx.array) -> mx.array:
    return choose("mhc_pre", x, H_pre)[1](x, H_pre)


def run_post(x: mx.array, f: mx.array, H_post: mx.array, H_res: mx.array) -> mx.array:
    return choose("mhc_post", x, f, H_post, H_res)[1](x, f, H_post, H_res)


def sinkhorn_knopp(logits: mx.array, iters: int = 20) -> mx.array:
    """Project [..., n, n] logits to doubly stochastic matrices (float32).

    P = exp(L - max L); then `iters` times: divide by column sums, then by row sums. Rows sum
    to 1 to float32 rounding; columns to within the tolerance documented in docs/math.md.
    """
    _checks.check_float(logits, "logits")
    if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must be square in the last two dims [..., n, n], got {tuple(logits.shape)}")
    iters = _checks.check_positive_int(iters, "iters")
    return choose("sinkhorn_knopp", logits, iters=iters)[1](logits, iters)


def mhc_coefficients(x, phi=None, alpha=None, bias=None, iters: int = 20, eps: float = 1e-6):
    """Site coefficients (H_pre [..., n], H_post [..., n], H_res [..., n, n]) in float32.

    Dynamic (phi and alpha given): per token, from x [..., n, C]. Static (phi=None,
    alpha=None): h = bias, one set for all tokens, returned without leading dims.
    """
    n, C = _checks.check_streams(x, "x")
    width = 2 * n + n * n
    if bias is None:
        raise TypeError("mhc_coefficients needs bias (shape [2n + n*n])")
    _checks.check_float(bias, "bias")
    if tuple(bias.shape) != (width,):
        raise ValueError(f"bias must have shape ({width},) for n={n}, got {tuple(bias.shape)}")
    if (phi is None) != (alpha is None):
        raise ValueError("phi and alpha go together: pass both (dynamic site) or neither (static site)")
    if phi is not None:
        _checks.check_float(phi, "phi")
        _checks.check_float(alpha, "alpha")
        if tuple(phi.shape) != (n * C, width):
            raise ValueError(
                f"phi must have shape ({n * C}, {width}) for n={n}, C={C}, got {tuple(phi.shape)}"
            )
        if tuple(alpha.shape) != (3,):
            raise ValueError(f"alpha must have shape (3,), got {tuple(alpha.shape)}")
    iters = _checks.check_positive_int(iters, "iters")
    eps = _checks.check_eps(eps)
    return run_coefficients(x, phi, alpha, bias, iters, eps)


def mhc_pre(x: mx.array, H_pre: mx.array) -> mx.array:
    """Read the streams: h_in[..., c] = sum_i H_pre[..., i] x[..., i, c]  ->  [..., C]."""
    n, _ = _checks.check_streams(x, "x")
    _checks.check_coefficient(H_pre, "H_pre", n, (n,), tuple(x.shape[:-2]))
    return run_pre(x, H_pre)


_POST_CHECKED: set = set()  # the (shape, dtype) signatures check_post has passed
_POST_CHECKED_SIZE = 256


def check_post(x: mx.array, f: mx.array, H_post: mx.array, H_res: mx.array) -> None:
    """mhc_post's input checks. They read shapes and dtypes only, so a signature that passed once
    passes again without them (2.6 µs a call on this project's CPU, at B = 1 a tenth of a site's)."""
    arrays = (x, f, H_post, H_res)
    signature = None
    if all(isinstance(a, mx.array) for a in arrays):
        signature = tuple((a.shape, a.dtype) for a in arrays)
        if signature in _POST_CHECKED:
            return
    n, C = _checks.check_streams(x, "x")
    lead = tuple(x.shape[:-2])
    _checks.check_sublayer_output(f, lead, C)
    _checks.check_coefficient(H_post, "H_post", n, (n,), lead)
    _checks.check_coefficient(H_res, "H_res", n, (n, n), lead)
    if signature is not None:
        if len(_POST_CHECKED) >= _POST_CHECKED_SIZE:
            _POST_CHECKED.clear()
        _POST_CHECKED.add(signature)


def mhc_post(x: mx.array, f: mx.array, H_post: mx.array, H_res: mx.array) -> mx.array:
    """Mix and write: x_next = H_res x + H_post (x) f  ->  [..., n, C] in x's dtype."""
    check_post(x, f, H_post, H_res)
    return run_post(x, f, H_post, H_res)


def expand_streams(x: mx.array, n: int) -> mx.array:
    """[..., C] -> [..., n, C]: n identical full-width copies of the hidden state."""
    _checks.check_float(x, "x")
    n = _checks.check_positive_int(n, "n")
    if x.ndim < 1:
        raise ValueError("x must have at least one dim [..., C]")
    return mx.broadcast_to(mx.expand_dims(x, -2), (*x.shape[:-1], n, x.shape[-1]))


def reduce_streams(x: mx.array, reduction: str = "mean") -> mx.array:
    """[..., n, C] -> [..., C]: collapse the streams (mean by default, or sum), float32 math."""
    _checks.check_streams(x, "x")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    xf = x.astype(mx.float32)
    out = mx.mean(xf, axis=-2) if reduction == "mean" else mx.sum(xf, axis=-2)
    return out.astype(x.dtype)


def rms_norm(x: mx.array, weight: mx.array | None = None, eps: float = 1e-5) -> mx.array:
    """RMSNorm over the last axis with an optional weight, float32 math."""
    _checks.check_float(x, "x")
    if weight is not None:
        _checks.check_float(weight, "weight")
        if tuple(weight.shape) != (x.shape[-1],):
            raise ValueError(f"weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    eps = _checks.check_eps(eps)
    return choose("rms_norm", x, weight, eps=eps)[1](x, weight, eps)
