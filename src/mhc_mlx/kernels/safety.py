"""Metal first-use checks: each op's kernel is run once on a small input against the reference.

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

# op -> "ok" or "failed: <why>"
_results: dict[str, str] = {}
RTOL = {mx.float32: 1e-4, mx.bfloat16: 3e-2, mx.float16: 3e-2}


def result(op: str) -> str | None:
    return _results.get(op)


def reset() -> None:
    _results.clear()


def _close(a, b, dtype, what):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    err = (mx.linalg.norm((a - b).reshape(-1)) / (mx.linalg.norm(b.reshape(-1)) + 1e-30)).item()
    if not err <= RTOL[dtype]:  # NaN fails too
        raise AssertionError(f"{what}: relative error {err:.2e} > {RTOL[dtype]:.0e}")


def _check(op: str, impl) -> None:
    key = mx.random.key(7)
    k1, k2, k3, k4 = mx.random.split(key, 4)
    n, C, T, iters = 4, 24, 3, 6
    x = mx.random.normal((T, n, C), key=k1)
    if op == "sinkhorn_knopp":
        L = mx.random.normal((T, n, n), key=k2)
        _close(impl(L, iters), reference.sinkhorn_knopp(L, iters), mx.float32, op)
        g = mx.grad(lambda a: mx.sum(impl(a, iters) * x[:, :, :n]))(L)
        gr = mx.grad(lambda a: mx.sum(reference.sinkhorn_knopp(a, iters) * x[:, :, :n]))(L)
        _close(g, gr, mx.float32, op + " gradient")
    elif op == "mhc_coefficients":
        W = 2 * n + n * n
        phi = 0.1 * mx.random.normal((n * C, W), key=k2)
        alpha = mx.array([0.5, 0.3, 0.7])
        bias = mx.random.normal((W,), key=k3)
        for p, a in ((phi, alpha), (None, None)):
            got = impl(x, p, a, bias, iters, 1e-6)
            want = reference.mhc_coefficients(x, p, a, bias, iters, 1e-6)
            for u, v in zip(got, want):
                _close(u, v, mx.float32, op)
    elif op == "mhc_pre":
        h = mx.random.uniform(shape=(T, n), key=k2)
        _close(impl(x, h), reference.mhc_pre(x, h), mx.float32, op)
    elif op == "mhc_post":
        f = mx.random.normal((T, C), key=k2)
        hp = mx.random.uniform(shape=(T, n), key=k3)
        hr = mx.random.uniform(shape=(T, n, n), key=k4)
        _close(impl(x, f, hp, hr), reference.mhc_post(x, f, hp, hr), mx.float32, op)
    elif op == "mhc_layer":
        pre, post = mx.random.normal((n,), key=k2), mx.random.normal((n,), key=k3)
        res, w = mx.random.normal((n, n), key=k4), mx.ones((C,))
        got = impl(x, pre, post, res, w, iters, 1e-5)
        _close(got, reference.mhc_layer(x, pre, post, res, w, iters, 1e-5), mx.float32, op)


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
        warnings.warn(
            f"mhc-mlx: the Metal kernel for {op} failed its first-use check ({_results[op][8:]}); "
            "using the compiled path for it in this process (see `mhc-mlx info`)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _results[op] = "ok"
    return True
