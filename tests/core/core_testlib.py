"""Helpers of the core suite: draw inputs in a dtype, compare MLX results with the float64 reference."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

# Norm-wise relative error allowed against the float64 reference (issue 2, "Must be true").
FORWARD_TOL = {mx.float32: 1e-5, mx.bfloat16: 2e-2, mx.float16: 2e-2}
# float32 MLX gradients against float64 central differences, norm-wise relative. Measured
# errors are 1e-7..2e-6, at most 9e-6 (mlx_mhc.sinkhorn_knopp); 1e-4 leaves room for
# summation order and finite-difference truncation, yet fails on any wrong term (O(1) errors).
GRAD_TOL = 1e-4


def draw(rng: np.random.Generator, shape, dtype=mx.float32, scale: float = 1.0):
    """A random MLX array in `dtype` and the same (rounded) values as a float64 NumPy array."""
    values = mx.array((scale * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)
    return values, to_numpy(values)


def to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def as_mx(a: np.ndarray, dtype=mx.float32) -> mx.array:
    return mx.array(np.asarray(a, dtype=np.float32)).astype(dtype)


def relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))


def assert_matches(out, ref, tol: float, what: str, atol: float = 0.0) -> float:
    """Shape equal, all finite, and ||out - ref|| <= tol ||ref|| + atol sqrt(size)."""
    if isinstance(out, mx.array):
        out = to_numpy(out)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, f"{what}: shape {out.shape}, reference {ref.shape}"
    assert np.all(np.isfinite(out)), f"{what}: non-finite values in the output"
    err = np.linalg.norm(out - ref)
    bound = tol * np.linalg.norm(ref) + atol * np.sqrt(max(ref.size, 1))
    log = os.environ.get("MHC_TEST_ERROR_LOG")  # to measure the errors behind the tolerances
    if log:
        with open(log, "a") as fh:
            fh.write(f"{relative_error(out, ref):.3e}\t{err / max(bound, 1e-300):.3e}\t{tol:.0e}\t{what}\n")
    assert err <= bound, (
        f"{what}: ||out - ref|| = {err:.3e} > {bound:.3e} "
        f"(relative {relative_error(out, ref):.3e}, allowed {tol:.1e})"
    )
    return relative_error(out, ref)


def assert_grad(grad: mx.array, like, ref: np.ndarray, what: str, tol: float = GRAD_TOL, atol: float = 1e-7) -> float:
    """A gradient has its primal's shape and matches the float64 finite differences.

    atol (per entry, root-mean-square) absorbs float32 rounding of the O(1) terms a small
    gradient is the difference of; callers that know the gradient's overall scale pass
    1e-6 x that scale."""
    shape = tuple(like.shape)
    assert tuple(grad.shape) == shape, f"{what}: gradient shape {tuple(grad.shape)} != primal shape {shape}"
    return assert_matches(grad, ref, tol, f"gradient {what}", atol=atol)


def site_params(rng: np.random.Generator, n: int, C: int, dtype=mx.float32):
    """Random dynamic-site parameters giving O(1) coefficient logits (phi ~ N(0, 1/(nC)))."""
    width = 2 * n + n * n
    phi = draw(rng, (n * C, width), dtype, scale=1.0 / np.sqrt(n * C))
    alpha_mx = as_mx(rng.uniform(0.5, 1.5, 3), dtype)
    alpha = (alpha_mx, to_numpy(alpha_mx))
    bias = draw(rng, (width,), dtype)
    return phi, alpha, bias
