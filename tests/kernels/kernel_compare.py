"""How the emulated kernel tests compare an MLX result with its reference, and the set-ups
they share (test_kernels_emulated.py and test_kernels_emulated_shapes.py)."""

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


def as_cuda(monkeypatch):
    """The dispatcher and kernels see a CUDA GPU (the emulator runs the CUDA source)."""
    from mhc_mlx import kernels
    from mhc_mlx.kernels import build

    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(build, "on_gpu", lambda *a: True)
    monkeypatch.setattr(kernels, "gpu_backend", build.gpu_backend)
    monkeypatch.setattr(kernels, "on_gpu", build.on_gpu)


def random_dynamic_site(C: int, n: int):
    """(HyperConnection, parameter names, parameters): a dynamic site with drawn phi, alpha, bias
    (phi scaled so the logits are of order 1)."""
    import mhc_mlx as mhc

    hc = mhc.HyperConnection(C, n, init="paper")
    W = n * (n + 2)
    hc.phi = mx.random.normal((n * C, W)) / np.sqrt(n * C)
    hc.alpha, hc.bias = mx.random.uniform(0.2, 1.5, (3,)), mx.random.normal((W,))
    names = ["phi", "alpha", "bias"]
    return hc, names, [getattr(hc, k) for k in names]
