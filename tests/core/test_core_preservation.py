"""Function preservation (SPEC section 3): identity-initialised sites compute the plain residual network.

A stack of sites between expand_streams and reduce_streams must equal x <- x + f_k(x) to
<= 1e-5 relative in float32, and MHCRewire(f)(x) must equal x + f(x), for any sublayer.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import mlx_mhc
import numpy as np
import pytest
import reference64 as ref
from core_testlib import as_mx, assert_matches, draw, to_numpy

import mhc_mlx as mhc


class TanhMLP(nn.Module):
    """h -> W2 tanh(W1 rms_norm(h)): a pre-norm sublayer with a float64 twin."""

    def __init__(self, C: int, rng: np.random.Generator):
        super().__init__()
        self.up = as_mx(rng.standard_normal((2 * C, C)) / math.sqrt(C))
        self.down = as_mx(rng.standard_normal((C, 2 * C)) / math.sqrt(2 * C))

    def __call__(self, h):
        return mx.tanh(mhc.rms_norm(h) @ self.up.T) @ self.down.T

    def numpy(self):
        up, down = to_numpy(self.up), to_numpy(self.down)
        return lambda h: np.tanh(ref.rms_norm(h) @ up.T) @ down.T


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("n,C,lead", [(1, 13, (3,)), (2, 7, (2, 3)), (4, 33, (5,)), (8, 16, ()), (32, 13, (2,))])
def test_four_identity_sites_equal_the_plain_residual_network(n, C, lead, dynamic, backend, rng):
    blocks = [TanhMLP(C, rng) for _ in range(4)]
    sites = [mhc.HyperConnection(C, n=n, dynamic=dynamic) for _ in range(4)]
    h, h64 = draw(rng, lead + (C,))
    x = mhc.expand_streams(h, n)
    for site, block in zip(sites, blocks):
        x = site(x, block)
    out = mhc.reduce_streams(x)
    want = ref.plain_residual(h64, [b.numpy() for b in blocks])
    assert_matches(out, want, 1e-5, f"4 identity sites (n={n}, dynamic={dynamic}) vs plain residual")
    # Not only the mean: every stream carries the plain residual state.
    assert_matches(x, ref.expand_streams(want, n), 1e-5, "each stream after 4 identity sites")


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32])
def test_identity_init_values(n):
    """SPEC section 3: alpha = 0, bias_pre = logit(1/n), bias_post = 0, H_res doubly
    stochastic and near I, phi small random."""
    hc = mhc.HyperConnection(16, n=n)
    assert np.array_equal(to_numpy(hc.alpha), np.zeros(3))
    bias = to_numpy(hc.bias)
    if n > 1:
        np.testing.assert_allclose(bias[:n], math.log((1 / n) / (1 - 1 / n)), rtol=1e-6)
    else:  # one stream: sigmoid can only approach 1
        assert ref.sigmoid(bias[0]) >= 1 - 1e-5
    assert np.array_equal(bias[n : 2 * n], np.zeros(n))
    H_res = ref.sinkhorn_knopp(bias[2 * n :].reshape(n, n), 20)
    assert np.abs(H_res.sum(0) - 1).max() < 1e-6 and np.abs(H_res.sum(1) - 1).max() < 1e-6
    assert np.all(np.diag(H_res) > 0.5) or n == 1, "H_res should start near I"
    assert np.all(np.diag(H_res) < 1 - 1e-3) or n == 1, "H_res must not start saturated (Sinkhorn's gradient vanishes)"
    phi = to_numpy(hc.phi)
    assert phi.shape == (n * 16, 2 * n + n * n) and 0 < phi.std() < 0.1
    static = mhc.HyperConnection(16, n=n, dynamic=False)
    assert set(dict(static.parameters())) == {"bias"}
    np.testing.assert_array_equal(to_numpy(static.bias), bias)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_paper_init_values(dynamic):
    n, C = 4, 8
    hc = mhc.HyperConnection(C, n=n, dynamic=dynamic, init="paper")
    assert np.array_equal(to_numpy(hc.bias), np.zeros(2 * n + n * n))
    if dynamic:
        np.testing.assert_array_equal(to_numpy(hc.alpha), np.full(3, 0.01, np.float32))
        assert to_numpy(hc.phi).shape == (n * C, 2 * n + n * n)
    else:
        assert "alpha" not in hc and "phi" not in hc


# --------------------------------------------------------------------------- MHCRewire


class SmallBlock(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.norm = nn.RMSNorm(C)
        self.up = nn.Linear(C, 2 * C)
        self.down = nn.Linear(2 * C, C)

    def __call__(self, h):
        return self.down(nn.gelu(self.up(self.norm(h))))


def sublayer(kind: str, C: int):
    if kind == "linear":
        return nn.Linear(C, C), (3, C)
    if kind == "conv2d":  # channels-last [B, H, W, C]
        return nn.Conv2d(C, C, kernel_size=3, padding=1), (2, 5, 4, C)
    if kind == "quantized-from-linear":
        return nn.QuantizedLinear.from_linear(nn.Linear(C, C), group_size=64, bits=4), (3, C)
    if kind == "quantized-block":
        block = SmallBlock(C)
        nn.quantize(block, group_size=64, bits=8)
        assert isinstance(block.up, nn.QuantizedLinear)
        return block, (2, 3, C)
    if kind == "block":
        return SmallBlock(C), (2, 3, C)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["linear", "conv2d", "quantized-from-linear", "quantized-block", "block"])
@pytest.mark.parametrize("n,dynamic", [(4, True), (1, True), (32, True), (4, False)])
def test_rewire_equals_residual(kind, n, dynamic, backend, rng):
    C = 64  # quantization groups of 64
    module, shape = sublayer(kind, C)
    layer = mhc.MHCRewire(module, dims=C, n=n, dynamic=dynamic)
    x, _ = draw(rng, shape)
    want = x + module(x)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_matches(out, to_numpy(want), 1e-5, f"MHCRewire({kind}, n={n})(x) vs x + f(x)")


def test_rewire_stream_state_chains(backend, rng):
    C, n = 32, 4
    mods = [nn.Linear(C, C), SmallBlock(C), nn.Linear(C, C)]
    chain = [mhc.MHCRewire(m, dims=C, n=n, stream_state=True) for m in mods]
    h, _ = draw(rng, (2, 5, C))
    s = mhc.expand_streams(h, n)
    for layer in chain:
        s = layer(s)
        assert s.shape == (2, 5, n, C)
    want = h
    for m in mods:
        want = want + m(want)
    assert_matches(mhc.reduce_streams(s), to_numpy(want), 1e-5, "chained stream-state MHCRewire vs plain residual")


def test_rewire_bfloat16_equals_residual(backend, rng):
    C = 64
    lin = nn.Linear(C, C)
    lin.set_dtype(mx.bfloat16)
    layer = mhc.MHCRewire(lin, dims=C, n=4)
    x, _ = draw(rng, (3, C), mx.bfloat16)
    out = layer(x)
    assert out.dtype == mx.bfloat16
    assert_matches(out, to_numpy(x).astype(np.float64) + to_numpy(lin(x)), 2e-2, "bf16 MHCRewire vs x + f(x)")


# --------------------------------------------------------------------------- seed layers at init


def test_manifold_hyper_connection_at_init_is_the_residual(rng):
    conn = mlx_mhc.ManifoldHyperConnection(dims=24, expansion=2)
    x, x64 = draw(rng, (3, 24))
    lo, lo64 = draw(rng, (3, 24))
    assert_matches(conn(x, lo), x64 + lo64, 1e-5, "ManifoldHyperConnection(x, out) at init")
    s = mhc.expand_streams(x, 2)
    assert_matches(conn(s, lo), ref.expand_streams(x64 + lo64, 2), 1e-5, "stream form on identical streams at init")


@pytest.mark.parametrize("n", [1, 4])
def test_mhc_layer_identity_init(n, backend, rng):
    """MHCLayer(identity_init=True) on identical streams: each stream becomes x + rms_norm(x)
    (its F is the weighted RMSNorm, weight 1 at init); identity_init=False starts from zero
    logits (H_pre = 1/2, H_post = 1, H_res = 1/n), checked against the reference."""
    C = 12
    h, h64 = draw(rng, (3, C))
    x = mhc.expand_streams(h, n)
    out = mhc.MHCLayer(n, C)(x)
    assert_matches(out, ref.expand_streams(h64 + ref.rms_norm(h64, None, 1e-5), n), 1e-5, "MHCLayer identity init")
    x2, x2_64 = draw(rng, (3, n, C))
    out = mhc.MHCLayer(n, C, identity_init=False)(x2)
    zeros = np.zeros(n)
    want = ref.mhc_layer(x2_64, zeros, zeros, np.zeros((n, n)), np.ones(C), 20, 1e-5)
    assert_matches(out, want, 1e-5, "MHCLayer(identity_init=False)")
