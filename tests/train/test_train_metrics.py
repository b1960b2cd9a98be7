"""Amax gains against a plain-loop float64 implementation, on fresh random matrices."""

import mlx.core as mx
import numpy as np
import pytest

from mhc_mlx.models import MHCTransformer, ModelArgs
from mhc_mlx.train.metrics import amax_gains, composite_products, residual_gains


def loop_gains(m):
    """Row and column absolute sums written out element by element."""
    n = m.shape[0]
    rows = [sum(abs(float(m[i, j])) for j in range(n)) for i in range(n)]
    cols = [sum(abs(float(m[i, j])) for i in range(n)) for j in range(n)]
    return max(rows), min(rows), max(cols), min(cols)


def loop_matmul(a, b):
    n = a.shape[0]
    return np.array([[sum(a[i, k] * b[k, j] for k in range(n)) for j in range(n)] for i in range(n)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_amax_gains_of_a_batch_match_loops(seed):
    rng = np.random.default_rng(seed)
    batch = rng.normal(size=(3, 5, 4, 4))  # signed entries: absolute sums matter
    got = amax_gains(batch)
    per = [loop_gains(m) for m in batch.reshape(-1, 4, 4)]
    assert got["forward_max"] == pytest.approx(max(p[0] for p in per), rel=1e-12)
    assert got["forward_min"] == pytest.approx(min(p[1] for p in per), rel=1e-12)
    assert got["backward_max"] == pytest.approx(max(p[2] for p in per), rel=1e-12)
    assert got["backward_min"] == pytest.approx(min(p[3] for p in per), rel=1e-12)


def test_composite_is_the_product_in_network_order():
    rng = np.random.default_rng(3)
    mats = [rng.normal(size=(4, 4)) for _ in range(5)]
    products = composite_products(mats)
    expected = mats[0]
    assert np.allclose(products[0], expected)
    for k in range(1, 5):
        expected = loop_matmul(mats[k], expected)  # later sites act after earlier ones
        assert np.allclose(products[k], expected, rtol=1e-12)
    # static [n, n] and per-token [B, L, n, n] matrices combine by broadcasting
    per_token = rng.normal(size=(2, 3, 4, 4))
    mixed = composite_products([mats[0], per_token])[-1]
    assert mixed.shape == (2, 3, 4, 4)
    assert np.allclose(mixed[1, 2], loop_matmul(per_token[1, 2], mats[0]))


def test_doubly_stochastic_products_have_unit_gains():
    rng = np.random.default_rng(4)
    mats = []
    for _ in range(8):  # random doubly stochastic: Sinkhorn in float64 to convergence
        p = np.exp(rng.normal(size=(4, 4)))
        for _ in range(500):
            p /= p.sum(0, keepdims=True)
            p /= p.sum(1, keepdims=True)
        mats.append(p)
    g = amax_gains(composite_products(mats)[-1])
    for key in g:
        assert g[key] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("dynamic", [True, False])
def test_residual_gains_of_a_model(dynamic):
    mx.random.seed(0)
    args = ModelArgs(vocab_size=32, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=16, dynamic=dynamic)
    model = MHCTransformer(args)
    gains = residual_gains(model, mx.array([[1, 2, 3, 4, 5]]))
    assert len(gains["sites"]) == 6 and len(gains["composite_by_depth"]) == 6
    # mHC rows are exact after Sinkhorn, columns to its tolerance
    assert gains["composite"]["forward_max"] == pytest.approx(1.0, abs=1e-5)
    assert gains["composite"]["backward_max"] == pytest.approx(1.0, abs=1e-3)
    baseline = MHCTransformer(ModelArgs(**{**args.to_dict(), "residual": "baseline"}))
    assert residual_gains(baseline, mx.array([[1, 2, 3]])) is None
