"""Regression tests for core behaviour that training models ran into."""

import mlx.core as mx
import numpy as np
import pytest

import mhc_mlx as mhc


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_sinkhorn_gradient_is_finite_for_finite_logits(backend):
    # A dynamic mHC site whose logits span more than ~87 (reached in `mhc-mlx train --lr 1e-2`
    # after ~70 steps) underflows a whole row to 0. The forward stayed finite (clamped sums),
    # but the backward divided by the clamped 1e-30 and returned NaN, which poisoned every
    # parameter below the site.
    rng = np.random.default_rng(0)
    logits = mx.array([[0.0, -5.0], [-200.0, -200.0]])
    weights = mx.array(rng.normal(size=(2, 2)), dtype=mx.float32)
    with mhc.use_backend(backend):
        assert mx.all(mx.isfinite(mhc.sinkhorn_knopp(logits))).item()
        grad = mx.grad(lambda l: (mhc.sinkhorn_knopp(l) * weights).sum())(logits)
    assert mx.all(mx.isfinite(grad)).item()
