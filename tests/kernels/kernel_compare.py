"""How the emulated kernel tests compare an MLX result with its reference (shared by
test_kernels_emulated.py and test_kernels_emulated_shapes.py)."""

import mlx.core as mx
import numpy as np


def np64(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


def rel(got, want, floor: float = 0.0):
    """||got - want|| / ||want||, or / `floor` when that is larger: for sums whose terms can
    cancel, float32 rounding is relative to the terms (pass a tenth of their norm), not to
    the sum, which a few drawn elements can make arbitrarily small."""
    got, want = np64(got) if isinstance(got, mx.array) else got, np64(want) if isinstance(want, mx.array) else want
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all(), "non-finite output (an element left unwritten?)"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), floor, 1e-30))


def largest(grads):
    return max(float(np.linalg.norm(np64(g))) for g in grads)


def grad_rel(got, want, scale=0.0):
    # relative to the gradient's norm, or to `scale` (1 % of the call's largest gradient, as
    # scripts/gpu_check.py measures) when that is larger: a gradient that is small by
    # cancellation (a sum of ~100 products of random sign) or ~0 by symmetry has no
    # meaningful relative error of its own
    got, want = np64(got), np64(want)
    assert got.shape == want.shape and np.isfinite(got).all()
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), scale, 1e-12))


def grad_errors(got, want):
    """Each gradient's grad_rel against 1 % of the largest, as gpu_check.py."""
    scale = 0.01 * largest(want)
    return [grad_rel(g, w, scale) for g, w in zip(got, want)]
