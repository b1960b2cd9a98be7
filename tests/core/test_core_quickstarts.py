"""The seed packages' README quick-starts, run as tests with the right (SPEC) semantics.

- mhc-mlx 0.6.3: `MHCLayer(n=32, C=2048)` on bfloat16 [1, 32, 2048];
  `MHCRewire(nn.Linear(2048, 2048), dims=2048, n=32)` forward and `mx.grad(loss_fn)(model, x)`.
- mlx-mhc 0.4.1: `sinkhorn_knopp(mx.random.normal((8, 8)))`;
  `ManifoldHyperConnection(dims=512, expansion=2)` inside its README's TransformerBlock.

n = 32, C = 2048 makes the dynamic site's phi 65536 x 1088 (285 MB in float32), so that
quick-start runs once, with every check on the one instance.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx_mhc
import numpy as np
import reference64 as ref
from core_testlib import assert_matches, to_numpy
from mlx.utils import tree_flatten

from mhc_mlx import MHCLayer, MHCRewire


def test_seed_mhc_layer_quick_start(rng):
    B, n, C = 1, 32, 2048
    x = mx.random.normal((B, n, C)).astype(mx.bfloat16)
    layer = MHCLayer(n=n, C=C)
    y = layer(x)
    mx.eval(y)
    assert y.shape == (1, 32, 2048) and y.dtype == mx.bfloat16

    def reference(layer):
        p = {k: to_numpy(v) for k, v in layer.parameters().items()}
        return ref.mhc_layer(to_numpy(x), p["H_pre_raw"], p["H_post_raw"], p["H_res_raw"], p["rms_weight"], 20, 1e-5)

    assert_matches(y, reference(layer), 2e-2, "MHCLayer(32, 2048) bf16 at init")
    # and away from init, so the check does not rest on the identity parameters
    noise = {k: mx.array(rng.standard_normal(v.shape).astype(np.float32)) for k, v in layer.parameters().items()}
    layer.update({k: v + noise[k] for k, v in layer.parameters().items()})
    assert_matches(layer(x), reference(layer), 2e-2, "MHCLayer(32, 2048) bf16, random parameters")


def test_seed_mhc_rewire_quick_start(rng):
    layer = nn.Linear(2048, 2048)
    model = MHCRewire(layer, dims=2048, n=32)
    x = mx.random.normal((1, 2048))
    y = model(x)
    mx.eval(y)
    assert y.shape == (1, 2048)
    assert_matches(y, to_numpy(x + layer(x)), 1e-5, "MHCRewire(Linear(2048), n=32)(x) vs x + layer(x)")

    loss_fn = lambda m, x: mx.sum(m(x))  # noqa: E731 (as in the seed README)
    grads = mx.grad(loss_fn)(model, x)
    mx.eval(grads)
    flat = dict(tree_flatten(grads))
    params = dict(tree_flatten(model.parameters()))
    assert set(flat) == set(params) == {"module.weight", "module.bias", "hc.phi", "hc.alpha", "hc.bias"}
    for name, g in flat.items():
        assert g.shape == params[name].shape, f"{name}: gradient shape {g.shape} != {params[name].shape}"
        assert bool(mx.all(mx.isfinite(g)).item()), f"{name}: non-finite gradient"

    # At init the site is exactly x + layer(x): d sum(y) / d W = 1 (x) x and d / d b = 1.
    x64 = to_numpy(x)
    assert_matches(flat["module.weight"], np.ones((2048, 1)) * x64, 1e-5, "d/d module.weight")
    assert_matches(flat["module.bias"], np.ones((1, 2048))[0], 1e-5, "d/d module.bias")
    # alpha = 0 at init: phi's gradient is exactly zero.
    assert not np.any(to_numpy(flat["hc.phi"])), "d/d phi must vanish while alpha = 0"

    # alpha and bias against finite differences of the float64 reference (bias along 2
    # random directions: 1088 entries x a 65536 x 1088 matmul each would take minutes).
    p64 = {k: to_numpy(v) for k, v in params.items()}
    W, b = p64["module.weight"], p64["module.bias"]

    def loss64(alpha, bias):
        s = ref.expand_streams(x64, 32)
        out = ref.site(s, lambda h: ref.linear(h, W, b), p64["hc.phi"], alpha, bias, 20, 1e-6)
        return float(np.sum(ref.reduce_streams(out)))

    alpha_fd = ref.central_difference(lambda a: loss64(a, p64["hc.bias"]), p64["hc.alpha"], step=1e-5)
    assert_matches(flat["hc.alpha"], alpha_fd, 1e-4, "d/d alpha", atol=1e-6)
    g_bias = to_numpy(flat["hc.bias"])
    for _ in range(2):
        v = rng.standard_normal(g_bias.shape)
        want = ref.directional_difference(lambda bb: loss64(p64["hc.alpha"], bb), p64["hc.bias"], v, step=1e-5)
        bound = 1e-4 * np.linalg.norm(g_bias) * np.linalg.norm(v) + 1e-6
        assert abs(float(g_bias @ v) - want) <= bound, (float(g_bias @ v), want)


def test_seed_mlx_mhc_sinkhorn_quick_start():
    matrix = mx.random.normal((8, 8))
    doubly_stochastic = mlx_mhc.sinkhorn_knopp(matrix)
    P = to_numpy(doubly_stochastic)
    assert P.shape == (8, 8) and P.min() >= 0
    # mlx-mhc stops once rows and columns are within epsilon = 1e-6 of 1 (columns last: exact).
    assert np.abs(P.sum(1) - 1).max() <= 1e-6 + 1e-6
    assert np.abs(P.sum(0) - 1).max() <= 1e-6
    assert_matches(P, ref.compat_sinkhorn(to_numpy(matrix)), 1e-5, "mlx_mhc.sinkhorn_knopp(normal(8, 8))")


class TransformerBlock(nn.Module):
    """The mlx-mhc 0.4.1 README's example, as written there (dims=512, expansion=2)."""

    def __init__(self, dims, num_heads):
        super().__init__()
        self.norm1 = nn.RMSNorm(dims)
        self.norm2 = nn.RMSNorm(dims)
        self.attn = nn.MultiHeadAttention(dims, num_heads)
        self.mlp = nn.Sequential(
            nn.Linear(dims, dims * 4),
            nn.GELU(),
            nn.Linear(dims * 4, dims),
        )
        # mHC replaces standard residual connections
        self.mhc_attn = mlx_mhc.ManifoldHyperConnection(dims, expansion=2)
        self.mhc_mlp = mlx_mhc.ManifoldHyperConnection(dims, expansion=2)

    def __call__(self, x):
        h = self.mhc_attn(x, self.attn(self.norm1(x), self.norm1(x), self.norm1(x)))
        return self.mhc_mlp(h, self.mlp(self.norm2(h)))


def test_seed_manifold_hyper_connection_in_transformer_block(rng):
    block = TransformerBlock(dims=512, num_heads=8)
    x = mx.array(rng.standard_normal((2, 6, 512)).astype(np.float32))
    out = block(x)
    assert out.shape == (2, 6, 512) and out.dtype == mx.float32

    def plain(x):  # the block with plain residual connections
        h = x + block.attn(block.norm1(x), block.norm1(x), block.norm1(x))
        return h + block.mlp(block.norm2(h))

    assert_matches(out, to_numpy(plain(x)), 1e-5, "TransformerBlock with mHC at init vs plain residual block")

    # Away from init: each connection computes what its docstring says, given the layer outputs.
    for conn in (block.mhc_attn, block.mhc_mlp):
        conn.bias = mx.array(rng.standard_normal(conn.bias.shape).astype(np.float32))
    attn_out = block.attn(block.norm1(x), block.norm1(x), block.norm1(x))
    h = block.mhc_attn(x, attn_out)
    assert_matches(h, ref.manifold_hyper_connection(to_numpy(x), to_numpy(attn_out), to_numpy(block.mhc_attn.bias), 10),
                   1e-5, "mhc_attn(x, attn(...))")
    mlp_out = block.mlp(block.norm2(h))
    want = ref.manifold_hyper_connection(to_numpy(h), to_numpy(mlp_out), to_numpy(block.mhc_mlp.bias), 10)
    assert_matches(block(x), want, 1e-5, "TransformerBlock output vs float64 reference of the docstring")

    grads = nn.value_and_grad(block, lambda x: block(x).sum())(x)[1]
    flat = dict(tree_flatten(grads))
    assert {"mhc_attn.bias", "mhc_mlp.bias"} <= set(flat)
    assert all(bool(mx.all(mx.isfinite(g)).item()) for g in flat.values())
