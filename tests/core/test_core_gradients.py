"""Gradients of every parameter and input against central finite differences of the float64 reference.

Each test builds a scalar loss sum(out * W) with a random cotangent W, takes float32 MLX
gradients (through mx.grad, mx.value_and_grad, nn.value_and_grad and mx.compile(mx.grad(...))
between them), and compares every gradient, entry by entry, with central differences of the
same loss computed by tests/reference64.py in float64 (norm-wise relative error <= GRAD_TOL).
Gradient shapes are checked too: MLX does not check the cotangents a custom_function's vjp
returns. Parameters are random (not their init values), so no term hides behind a zero.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx_mhc
import numpy as np
import pytest
import reference64 as ref
from core_testlib import GRAD_TOL, as_mx, assert_grad, assert_matches, draw, site_params, to_numpy
from mlx.utils import tree_flatten

import mhc_mlx as mhc


def cotangent(rng, shape):
    W64 = rng.standard_normal(shape)
    return as_mx(W64), to_numpy(as_mx(W64))


def fd(loss64, at: dict, name: str) -> np.ndarray:
    """d loss64(**at) / d at[name] by central differences."""
    return ref.central_difference(lambda v: loss64(**{**at, name: v}), at[name])


def check_all(grads: dict, primals: dict, loss64, at: dict, what: str):
    """Every named gradient has its primal's shape and matches finite differences.

    Each gradient is held to GRAD_TOL relative to its own norm, plus float32 rounding
    (1e-6) of the root-mean-square gradient entry over all primals: a gradient that is
    small by cancellation (e.g. MHCLayer's H_pre_raw at n = 1, seen only through the RMS
    eps) cannot be more accurate than the terms it cancels."""
    assert set(grads) == set(at), f"{what}: gradients for {sorted(grads)}, expected {sorted(at)}"
    want = {name: fd(loss64, at, name) for name in grads}
    scale = np.sqrt(sum(np.sum(w * w) for w in want.values()) / sum(w.size for w in want.values()))
    for name, g in grads.items():
        assert_grad(g, primals[name], want[name], f"{what}: d/d {name}", atol=max(1e-6 * scale, 1e-9))


# --------------------------------------------------------------------------- functions


@pytest.mark.parametrize("n,lead", [(1, (2,)), (2, ()), (3, (2,)), (4, (2, 2)), (8, ())])
def test_sinkhorn_grad(n, lead, backend, rng):
    logits, L64 = draw(rng, lead + (n, n), scale=1.5)
    W, W64 = cotangent(rng, lead + (n, n))
    g = mx.grad(lambda L: (mhc.sinkhorn_knopp(L) * W).sum())(logits)
    assert g.dtype == logits.dtype
    want = ref.central_difference(lambda L: np.sum(ref.sinkhorn_knopp(L) * W64), L64)
    assert_grad(g, logits, want, f"sinkhorn_knopp n={n}")


def test_sinkhorn_grad_n32_directional(backend, rng):
    """n = 32 (1024 logits per matrix): directional derivatives along random directions."""
    logits, L64 = draw(rng, (2, 32, 32))
    W, W64 = cotangent(rng, (2, 32, 32))
    g = to_numpy(mx.grad(lambda L: (mhc.sinkhorn_knopp(L) * W).sum())(logits))
    assert g.shape == (2, 32, 32)
    for _ in range(3):
        v = rng.standard_normal(L64.shape)
        want = ref.directional_difference(lambda L: np.sum(ref.sinkhorn_knopp(L) * W64), L64, v)
        got = float(np.sum(g * v))
        assert abs(got - want) <= GRAD_TOL * np.linalg.norm(g) * np.linalg.norm(v), (got, want)


@pytest.mark.parametrize(
    "shape,dtype,iters,scale",
    [((4, 4), mx.float32, 20, 1.0), ((3, 2, 5, 5), mx.float32, 1, 2.0), ((2, 8, 8), mx.float32, 50, 1.0),
     ((6, 3, 3), mx.bfloat16, 20, 1.0), ((2, 4, 4), mx.float16, 7, 1.0), ((2, 6, 6), mx.float32, 20, "underflow")],
    ids=["4x4", "batched-iters1", "n8-iters50", "bf16", "f16", "underflowing-entries"],
)
def test_sinkhorn_custom_backward_equals_reference_autodiff(shape, dtype, iters, scale, rng):
    """The compiled path's hand-written backward == autodiff through the reference loop.

    "underflowing-entries": a few entries sit 150-250 below the others, so exp() gives exact
    zeros there (no row or column loses all its mass; that case is the next test's)."""
    if scale == "underflow":
        L = rng.standard_normal(shape)
        for b in range(shape[0]):
            for k in range(shape[-1] - 2):  # entries (k, k+1): never a whole row or column
                L[b, k, k + 1] -= rng.uniform(150, 250)
        logits = mx.array(L.astype(np.float32))
    else:
        logits, _ = draw(rng, shape, dtype, scale=scale)
    W, _ = cotangent(rng, shape)
    grads, values = {}, {}
    for path in ("reference", "compiled"):
        with mhc.use_backend(path):
            values[path], grads[path] = mx.value_and_grad(
                lambda L: (mhc.sinkhorn_knopp(L, iters=iters) * W).sum())(logits)
        assert grads[path].shape == logits.shape and grads[path].dtype == dtype, path
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    assert_matches(values["compiled"], to_numpy(values["reference"]), 1e-6, "loss value")
    assert_matches(grads["compiled"], to_numpy(grads["reference"]), tol, "custom backward vs autodiff", atol=1e-7)


@pytest.mark.parametrize("axis", ["row", "column"])
def test_sinkhorn_grad_finite_when_a_row_or_column_underflows(axis, backend, rng):
    """Logits 200 below the rest in one row (or column): the forward stays finite (that row
    is 0, SPEC section 1) and so must the gradient, or one such token turns every parameter
    into NaN in training. The float64 finite differences are finite there too."""
    L = rng.standard_normal((4, 4))
    if axis == "row":
        L[1] -= 200.0
    else:
        L[:, 2] -= 200.0
    logits = mx.array(L.astype(np.float32))
    W, W64 = cotangent(rng, (4, 4))
    out = mhc.sinkhorn_knopp(logits)
    assert np.all(np.isfinite(to_numpy(out))) and np.all(to_numpy(out) >= 0)
    g = to_numpy(mx.grad(lambda L: (mhc.sinkhorn_knopp(L) * W).sum())(logits))
    bad = np.argwhere(~np.isfinite(g)).tolist()
    assert not bad, f"non-finite gradient entries at {bad} for finite logits with a {axis} of underflowed mass"


def coefficient_loss64(W64s, iters, eps):
    def loss(x, phi=None, alpha=None, bias=None):
        out = ref.mhc_coefficients(x, phi, alpha, bias, iters, eps)
        return sum(np.sum(o * w) for o, w in zip(out, W64s))
    return loss


@pytest.mark.parametrize("n,C,lead", [(1, 3, (2,)), (2, 3, (2,)), (3, 4, (2, 2)), (4, 3, ())])
def test_coefficients_dynamic_grads(n, C, lead, backend, rng):
    x, x64 = draw(rng, lead + (n, C))
    (phi, phi64), (alpha, alpha64), (bias, bias64) = site_params(rng, n, C)
    Ws = [cotangent(rng, lead + s) for s in [(n,), (n,), (n, n)]]

    def loss(x, phi, alpha, bias):
        out = mhc.mhc_coefficients(x, phi, alpha, bias, iters=20, eps=1e-6)
        return sum((o * w).sum() for o, (w, _) in zip(out, Ws))

    value, grads = mx.value_and_grad(loss, argnums=(0, 1, 2, 3))(x, phi, alpha, bias)
    loss64 = coefficient_loss64([w for _, w in Ws], 20, 1e-6)
    at = dict(x=x64, phi=phi64, alpha=alpha64, bias=bias64)
    assert abs(value.item() - loss64(**at)) <= 1e-5 * max(1.0, abs(loss64(**at)))
    check_all(dict(zip(at, grads)), dict(x=x, phi=phi, alpha=alpha, bias=bias), loss64, at,
              f"mhc_coefficients n={n}")


@pytest.mark.parametrize("n,C,lead", [(1, 3, (2,)), (3, 4, (2, 2))])
def test_coefficients_static_grads(n, C, lead, backend, rng):
    x, _ = draw(rng, lead + (n, C))
    bias, bias64 = draw(rng, (2 * n + n * n,), scale=1.5)
    Ws = [cotangent(rng, s) for s in [(n,), (n,), (n, n)]]

    def loss(x, bias):
        out = mhc.mhc_coefficients(x, None, None, bias)
        return sum((o * w).sum() for o, (w, _) in zip(out, Ws))

    gx, gb = mx.grad(loss, argnums=(0, 1))(x, bias)
    loss64 = coefficient_loss64([w for _, w in Ws], 20, 1e-6)
    want = ref.central_difference(lambda b: loss64(np.zeros((n, C)), bias=b), bias64)
    assert_grad(gb, bias, want, "static mhc_coefficients: d/d bias")
    assert gx.shape == x.shape and not np.any(to_numpy(gx)), "static coefficients do not depend on x"


@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "broadcast"])
@pytest.mark.parametrize("n,C,lead", [(1, 3, (2,)), (3, 5, (2, 2)), (4, 3, ())])
def test_pre_grads(n, C, lead, per_token, backend, rng):
    x, x64 = draw(rng, lead + (n, C))
    H, H64 = draw(rng, ((lead if per_token else ()) + (n,)))
    W, W64 = cotangent(rng, lead + (C,))
    grads = mx.grad(lambda x, H: (mhc.mhc_pre(x, H) * W).sum(), argnums=(0, 1))(x, H)

    def loss64(x, H):
        return np.sum(ref.mhc_pre(x, H) * W64)

    check_all(dict(zip(("x", "H"), grads)), dict(x=x, H=H), loss64, dict(x=x64, H=H64), "mhc_pre")


@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "broadcast"])
@pytest.mark.parametrize("n,C,lead", [(1, 3, (2,)), (3, 4, (2,)), (2, 3, (2, 2))])
def test_post_grads(n, C, lead, per_token, backend, rng):
    cl = lead if per_token else ()
    x, x64 = draw(rng, lead + (n, C))
    f, f64 = draw(rng, lead + (C,))
    Hp, Hp64 = draw(rng, cl + (n,))
    Hr, Hr64 = draw(rng, cl + (n, n))
    W, W64 = cotangent(rng, lead + (n, C))
    # mx.compile(mx.grad(...)): the compiled gradient must equal the finite differences too.
    grad_fn = mx.compile(mx.grad(lambda *a: (mhc.mhc_post(*a) * W).sum(), argnums=(0, 1, 2, 3)))
    grads = grad_fn(x, f, Hp, Hr)

    def loss64(x, f, Hp, Hr):
        return np.sum(ref.mhc_post(x, f, Hp, Hr) * W64)

    names = ("x", "f", "Hp", "Hr")
    check_all(dict(zip(names, grads)), dict(zip(names, (x, f, Hp, Hr))), loss64,
              dict(zip(names, (x64, f64, Hp64, Hr64))), "mhc_post")


def test_plumbing_and_rms_norm_grads(backend, rng):
    h, h64 = draw(rng, (2, 5))
    s, s64 = draw(rng, (2, 3, 5))
    w, w64 = draw(rng, (5,))
    W3, W3_64 = cotangent(rng, (2, 3, 5))
    W2, W2_64 = cotangent(rng, (2, 5))
    g = mx.grad(lambda h: (mhc.expand_streams(h, 3) * W3).sum())(h)
    assert_grad(g, h, ref.central_difference(lambda v: np.sum(ref.expand_streams(v, 3) * W3_64), h64), "expand_streams")
    for red in ("mean", "sum"):
        g = mx.grad(lambda s: (mhc.reduce_streams(s, red) * W2).sum())(s)
        assert_grad(g, s, ref.central_difference(lambda v: np.sum(ref.reduce_streams(v, red) * W2_64), s64),
                    f"reduce_streams({red})")
    grads = mx.grad(lambda h, w: (mhc.rms_norm(h, w) * W2).sum(), argnums=(0, 1))(h, w)
    check_all(dict(zip(("h", "w"), grads)), dict(h=h, w=w),
              lambda h, w: np.sum(ref.rms_norm(h, w, 1e-5) * W2_64), dict(h=h64, w=w64), "rms_norm")


# --------------------------------------------------------------------------- modules


class SiteWithSublayer(nn.Module):
    """A HyperConnection and its sublayer (tanh of a Linear) as one module, for nn.value_and_grad."""

    def __init__(self, C, n, dynamic):
        super().__init__()
        self.hc = mhc.HyperConnection(C, n=n, dynamic=dynamic)
        self.sub = nn.Linear(C, C)

    def __call__(self, x):
        return self.hc(x, lambda h: mx.tanh(self.sub(h)))


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("n,C,lead", [(1, 3, (2,)), (2, 3, (2,)), (3, 4, ())])
def test_hyper_connection_grads(n, C, lead, dynamic, backend, rng):
    model = SiteWithSublayer(C, n, dynamic)
    (phi, phi64), (alpha, alpha64), (bias, bias64) = site_params(rng, n, C)
    if dynamic:
        model.hc.phi, model.hc.alpha = phi, alpha
    model.hc.bias = bias
    sw, sw64 = draw(rng, (C, C), scale=0.7)
    sb, sb64 = draw(rng, (C,), scale=0.1)
    model.sub.weight, model.sub.bias = sw, sb
    x, x64 = draw(rng, lead + (n, C))
    W, W64 = cotangent(rng, lead + (n, C))

    value, pgrads = nn.value_and_grad(model, lambda x: (model(x) * W).sum())(x)
    gx = mx.grad(lambda x: (model(x) * W).sum())(x)

    def loss64(x, bias, sw, sb, phi=None, alpha=None):
        out = ref.site(x, lambda h: np.tanh(ref.linear(h, sw, sb)), phi, alpha, bias)
        return np.sum(out * W64)

    at = dict(x=x64, bias=bias64, sw=sw64, sb=sb64)
    if dynamic:
        at.update(phi=phi64, alpha=alpha64)
    assert abs(value.item() - loss64(**at)) <= 1e-5 * max(1.0, abs(loss64(**at)))
    flat = dict(tree_flatten(pgrads))
    names = {"hc.phi": "phi", "hc.alpha": "alpha", "hc.bias": "bias", "sub.weight": "sw", "sub.bias": "sb"}
    got = {names[k]: v for k, v in flat.items()}
    got["x"] = gx
    primals = dict(x=x, bias=bias, sw=sw, sb=sb, phi=phi, alpha=alpha)
    check_all(got, primals, loss64, at, f"HyperConnection(dynamic={dynamic}) n={n}")


@pytest.mark.parametrize("n,C,lead", [(1, 4, (2,)), (3, 5, (2,)), (4, 3, (2, 2))])
def test_mhc_layer_grads(n, C, lead, backend, rng):
    layer = mhc.MHCLayer(n, C)
    raw = dict(H_pre_raw=draw(rng, (n,)), H_post_raw=draw(rng, (n,)), H_res_raw=draw(rng, (n, n), scale=1.5),
               rms_weight=draw(rng, (C,)))
    layer.update({k: v[0] for k, v in raw.items()})
    # Small x, so the RMSNorm eps (1e-5) matters and d/d H_pre_raw is not only rounding.
    x, x64 = draw(rng, lead + (n, C), scale=0.01)
    W, W64 = cotangent(rng, lead + (n, C))
    _, pgrads = nn.value_and_grad(layer, lambda x: (layer(x) * W).sum())(x)
    gx = mx.grad(lambda x: (layer(x) * W).sum())(x)

    def loss64(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight):
        return np.sum(ref.mhc_layer(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight, 20, 1e-5) * W64)

    at = {k: v[1] for k, v in raw.items()}
    at["x"] = x64
    got = dict(pgrads)
    got["x"] = gx
    primals = {k: v[0] for k, v in raw.items()}
    primals["x"] = x
    check_all(got, primals, loss64, at, f"MHCLayer n={n}")


@pytest.mark.parametrize("stream_state", [False, True], ids=["hidden", "streams"])
@pytest.mark.parametrize("n,C", [(2, 4), (3, 3)])
def test_mhc_rewire_grads(n, C, stream_state, backend, rng):
    lin = nn.Linear(C, C)
    rw = mhc.MHCRewire(lin, dims=C, n=n, stream_state=stream_state)
    (phi, phi64), (alpha, alpha64), (bias, bias64) = site_params(rng, n, C)
    lw, lw64 = draw(rng, (C, C), scale=0.7)
    lb, lb64 = draw(rng, (C,), scale=0.1)
    rw.update({"hc": {"phi": phi, "alpha": alpha, "bias": bias}, "module": {"weight": lw, "bias": lb}})
    shape = (2, n, C) if stream_state else (2, C)
    x, x64 = draw(rng, shape)
    W, W64 = cotangent(rng, shape)

    def loss(params, x):
        rw.update(params)
        return (rw(x) * W).sum()

    grad_fn = mx.grad(loss, argnums=(0, 1))
    if backend == "compiled":  # compiling the reference path's backward costs ~10 s of cold C++ builds
        grad_fn = mx.compile(grad_fn)
    saved = rw.parameters()
    pgrads, gx = grad_fn(rw.trainable_parameters(), x)
    rw.update(saved)  # compile traced the module with placeholders; put the real arrays back

    def loss64(x, phi, alpha, bias, lw, lb):
        def site64(s):
            return ref.site(s, lambda h: ref.linear(h, lw, lb), phi, alpha, bias)
        out = site64(x) if stream_state else ref.reduce_streams(site64(ref.expand_streams(x, n)))
        return np.sum(out * W64)

    names = {"hc.phi": "phi", "hc.alpha": "alpha", "hc.bias": "bias", "module.weight": "lw", "module.bias": "lb"}
    got = {names[k]: v for k, v in tree_flatten(pgrads)}
    got["x"] = gx
    at = dict(x=x64, phi=phi64, alpha=alpha64, bias=bias64, lw=lw64, lb=lb64)
    check_all(got, dict(x=x, phi=phi, alpha=alpha, bias=bias, lw=lw, lb=lb), loss64, at,
              f"MHCRewire(stream_state={stream_state})")


@pytest.mark.parametrize("form", ["hidden", "streams"])
def test_manifold_hyper_connection_grads(form, backend, rng):
    n, C = 2, 4
    conn = mlx_mhc.ManifoldHyperConnection(dims=C, expansion=n, sinkhorn_iterations=10)
    bias, bias64 = draw(rng, (2 * n + n * n,))
    conn.bias = bias
    x, x64 = draw(rng, (3, C) if form == "hidden" else (3, n, C))
    lo, lo64 = draw(rng, (3, C))
    W, W64 = cotangent(rng, x.shape)
    _, pgrads = nn.value_and_grad(conn, lambda x, lo: (conn(x, lo) * W).sum())(x, lo)
    gx, glo = mx.grad(lambda x, lo: (conn(x, lo) * W).sum(), argnums=(0, 1))(x, lo)

    def loss64(x, lo, bias):
        return np.sum(ref.manifold_hyper_connection(x, lo, bias, 10) * W64)

    check_all({"x": gx, "lo": glo, "bias": pgrads["bias"]}, dict(x=x, lo=lo, bias=bias), loss64,
              dict(x=x64, lo=lo64, bias=bias64), f"ManifoldHyperConnection ({form})")


@pytest.mark.parametrize("log_space", [True, False], ids=["log", "direct"])
@pytest.mark.parametrize("max_iterations,epsilon", [(7, 1e-12), (100, 1e-6)])
def test_compat_sinkhorn_grads(max_iterations, epsilon, log_space, rng):
    m, m64 = draw(rng, (2, 3, 3))
    W, W64 = cotangent(rng, (2, 3, 3))
    g = mx.grad(lambda m: (mlx_mhc.sinkhorn_knopp(m, max_iterations, epsilon, log_space) * W).sum())(m)
    want = ref.central_difference(
        lambda v: np.sum(ref.compat_sinkhorn(v, max_iterations, epsilon, log_space) * W64), m64)
    assert_grad(g, m, want, f"mlx_mhc.sinkhorn_knopp({max_iterations}, {epsilon}, log_space={log_space})")
