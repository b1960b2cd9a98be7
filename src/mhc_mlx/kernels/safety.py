"""Metal first-use checks: each op's kernels, forward and backward, are run once on a small
input against the reference (forward outputs, and gradients through mx.vjp).

Metal cannot be tested on the machines this library is developed on, so on a Mac every op's
kernel proves itself before it is trusted: a compile error, a run-time error or a mismatch
warns once and sends that op to the compiled path for the rest of the process. The result
is shown by `mhc-mlx info`. A check cannot run while MLX is tracing (mx.compile): then the
call takes the compiled path and the check runs at the next eager call.
"""

from __future__ import annotations

import warnings

import mlx.core as mx

from .. import reference
from .build import bump_settings, watch
from .coefficients import ONE_MAX_K, ONE_MAX_N
from .layer import LATENCY_TOKENS

# op -> "ok" or "failed: <why>"
_results: dict[str, str] = {}
RTOL = {mx.float32: 1e-4, mx.bfloat16: 3e-2, mx.float16: 3e-2}


def result(op: str) -> str | None:
    return _results.get(op)


def reset() -> None:
    _results.clear()
    bump_settings()


# The cases each op's check runs: (n, dtype of x). n = 4 in each activation dtype (each is its
# own kernel instantiation: a 16-bit type that fails to compile on this Mac must show here, not
# in a user's call), and n = 16 in float32, which takes the n > 8 forms (the transpose-reduce
# Sinkhorn and its warp backward, the wide dynamic coefficients, the composed layer).
CASES = ((4, mx.float32), (4, mx.bfloat16), (4, mx.float16), (16, mx.float32))


def _on_cpu(fn, *args):
    """fn(*args) run on the CPU: the reference's float32 is exact there, where a GPU's float32
    matmul may round to TF32 (MLX on CUDA)."""
    with mx.stream(mx.cpu):
        out = fn(*args)
        mx.eval(out)
    return out


def _close(a, b, dtype, what):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    err = (mx.linalg.norm((a - b).reshape(-1)) / (mx.linalg.norm(b.reshape(-1)) + 1e-30)).item()
    if not err <= RTOL[dtype]:  # NaN fails too
        raise AssertionError(f"{what}: relative error {err:.2e} > {RTOL[dtype]:.0e}")


def _matches(kernel_fn, reference_fn, args, what, dtype=mx.float32):
    """The kernel's outputs against the reference's (RTOL of x's dtype), then the gradients of
    both (random cotangents) for every argument: each within RTOL of the reference's, relative
    to its own norm or to 1 % of the largest gradient's, whichever is larger (a gradient ~0 by
    symmetry, e.g. through RMSNorm, is rounding noise; both sides see the same 16-bit inputs,
    their roundings differ)."""
    outs = _on_cpu(reference_fn, *args)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    got_outs = kernel_fn(*args)
    for u, v in zip(got_outs if isinstance(got_outs, (tuple, list)) else (got_outs,), outs):
        _close(u, v, dtype, what)
    cots = [mx.random.normal(o.shape, key=mx.random.key(11 + i)).astype(o.dtype) for i, o in enumerate(outs)]
    got = mx.vjp(kernel_fn, list(args), cots)[1]
    want = _on_cpu(lambda: mx.vjp(reference_fn, list(args), cots)[1])
    norms = [mx.linalg.norm(w.astype(mx.float32).reshape(-1)).item() for w in want]
    floor = 0.01 * max(norms)
    for i, (g, w, norm) in enumerate(zip(got, want, norms)):
        if tuple(g.shape) != tuple(w.shape):
            raise AssertionError(f"{what} gradient {i}: shape {tuple(g.shape)} != {tuple(w.shape)}")
        diff = g.astype(mx.float32) - w.astype(mx.float32)
        err = mx.linalg.norm(diff.reshape(-1)).item() / max(norm, floor, 1e-30)
        if not err <= RTOL[dtype]:  # NaN fails too
            raise AssertionError(f"{what} gradient {i}: relative error {err:.2e} > {RTOL[dtype]:.0e}")


def _check(op: str, impl) -> None:
    for n, dtype in CASES:
        _check_case(op, impl, n, dtype)


def _check_case(op: str, impl, n: int, dtype) -> None:
    key = mx.random.key(7)
    k1, k2, k3, k4 = mx.random.split(key, 4)
    C, T, iters = 24, 3, 6
    x = mx.random.normal((T, n, C), key=k1).astype(dtype)
    what = f"{op} (n={n}, {str(dtype).split('.')[-1]})"
    if op == "sinkhorn_knopp":
        L = mx.random.normal((T, n, n), key=k2).astype(dtype)
        weight = mx.random.normal((T, n, n), key=k3)
        _close(impl(L, iters), _on_cpu(reference.sinkhorn_knopp, L, iters), dtype, what)
        g = mx.grad(lambda a: mx.sum(impl(a, iters) * weight))(L)
        gr = _on_cpu(mx.grad(lambda a: mx.sum(reference.sinkhorn_knopp(a, iters) * weight)), L)
        _close(g, gr, dtype, what + " gradient")
    elif op == "mhc_coefficients":
        W = 2 * n + n * n
        phi = 0.1 * mx.random.normal((n * C, W), key=k2)
        alpha = mx.array([0.5, 0.3, 0.7])
        bias = mx.random.normal((W,), key=k3)
        _matches(lambda *a: impl(*a, iters, 1e-6), lambda *a: reference.mhc_coefficients(*a, iters, 1e-6),
                 [x, phi, alpha, bias], what + " (dynamic)", dtype)
        if n <= ONE_MAX_N:
            # a few tokens with n C past ONE_MAX_K: the split form's two launches, which the one
            # launch (coefficients.ONE_LAUNCH_SMALL) replaces below it, in this dtype too
            C_wide = ONE_MAX_K // n + 16
            x_wide = mx.random.normal((T, n, C_wide), key=k4).astype(dtype)
            phi_wide = 0.1 * mx.random.normal((n * C_wide, W), key=k2) / (C_wide / C) ** 0.5
            _matches(lambda *a: impl(*a, iters, 1e-6), lambda *a: reference.mhc_coefficients(*a, iters, 1e-6),
                     [x_wide, phi_wide, alpha, bias], what + f" (dynamic, C = {C_wide})", dtype)
        _matches(lambda x_, b: impl(x_, None, None, b, iters, 1e-6),
                 lambda x_, b: reference.mhc_coefficients(x_, None, None, b, iters, 1e-6), [x, bias],
                 what + " (static)", dtype)
    elif op == "mhc_pre":
        for h in (mx.random.uniform(shape=(T, n), key=k2), mx.random.uniform(shape=(n,), key=k3)):
            _matches(impl, reference.mhc_pre, [x, h], what, dtype)
    elif op == "mhc_post":
        f = mx.random.normal((T, C), key=k2).astype(dtype)
        for hp, hr in ((mx.random.uniform(shape=(T, n), key=k3), mx.random.uniform(shape=(T, n, n), key=k4)),
                       (mx.random.uniform(shape=(n,), key=k3), mx.random.uniform(shape=(n, n), key=k4))):
            _matches(impl, reference.mhc_post, [x, f, hp, hr], what, dtype)
    elif op == "mhc_layer":
        pre, post = mx.random.normal((n,), key=k2), mx.random.normal((n,), key=k3)
        res, w = mx.random.normal((n, n), key=k4), mx.ones((C,))
        # every form: coefficients inside the one launch (at a few tokens the latency kernel,
        # above them the layer kernel's inline form, which layer.INLINE_ALWAYS runs there), and
        # computed by a launch of their own (the backward then reuses them)
        longer = mx.random.normal((LATENCY_TOKENS + 4, n, C), key=k1).astype(dtype)
        for x_, inline in ((x, True), (x, False), (longer, True)):
            def kernel_layer(*a, inline=inline):
                return impl(*a, iters, 1e-5, inline=inline)

            def reference_layer(*a):
                return reference.mhc_layer(*a, iters, 1e-5)

            _matches(kernel_layer, reference_layer, [x_, pre, post, res, w],
                     what + f" ({x_.shape[0]} tokens, {'one launch' if inline else 'two launches'})", dtype)


def verified(op: str, impl) -> bool:
    """True once `impl` (this op's kernel path) has matched the reference here."""
    state = _results.get(op)
    if state is not None:
        return state == "ok"
    try:
        _check(op, impl)
    except Exception as e:  # noqa: BLE001 -- any failure means: do not trust this kernel
        message = str(e)
        if "function transformations" in message or "compile" in message.lower() and "eval" in message:
            return False  # inside mx.compile: try again at the next eager call
        _results[op] = f"failed: {type(e).__name__}: {message.splitlines()[0] if message else ''}"
        bump_settings()
        warnings.warn(
            f"mhc-mlx: the Metal kernel for {op} failed its first-use check ({_results[op][8:]}); "
            "using the compiled path for it in this process (see `mhc-mlx info`)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _results[op] = "ok"
    bump_settings()
    return True


watch(__name__)  # a recorded first-use result bumps build.settings_epoch
