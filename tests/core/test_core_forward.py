"""Every function and module against the independent float64 reference (tests/reference64.py).

Fresh random inputs each run (see conftest.py for the seed). Inputs are drawn in the tested
dtype and the reference gets those very (rounded) values in float64. Errors are norm-wise
relative: <= 1e-5 in float32, <= 2e-2 in bfloat16 and float16. Each check runs on both pure-MLX
paths (`use_backend("reference")` and `use_backend("compiled")`, the `backend` fixture).

The shape cases cover n = 1, 2, 3, 4, 8, 32, widths C = 7, 13, 33 (none a multiple of 8),
leading dims none, [B] and [B, T], and the three activation dtypes, without taking their full
product (that would cost minutes of mx.compile on a 2-core CI machine).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx_mhc
import numpy as np
import pytest
import reference64 as ref
from core_testlib import FORWARD_TOL, as_mx, assert_matches, draw, site_params, to_numpy

import mhc_mlx as mhc

F32, BF16, F16 = mx.float32, mx.bfloat16, mx.float16

# (n, C, leading dims, dtype)
CASES = [
    (1, 7, (2,), F32),
    (2, 13, (), F32),
    (3, 33, (2, 3), F32),
    (4, 7, (2, 3), F32),
    (8, 13, (2,), F32),
    (32, 7, (), F32),
    (32, 33, (2,), F32),
    (4, 33, (2,), BF16),
    (3, 13, (2, 3), F16),
    (8, 7, (), BF16),
    (2, 33, (2,), F16),
    (32, 13, (2,), BF16),
    (1, 13, (2, 3), F16),
]


def case_id(case) -> str:
    n, C, lead, dtype = case
    lead_s = "x".join(map(str, lead)) or "none"
    return f"n{n}-C{C}-lead{lead_s}-{str(dtype).split('.')[-1]}"


cases = pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])


def tanh_linear(rng, C, dtype=F32):
    """A random sublayer h -> tanh(W h + b) and its float64 twin (on the same rounded weights)."""
    lin = nn.Linear(C, C)
    lin.weight = as_mx(rng.standard_normal((C, C)) / np.sqrt(C), dtype)
    lin.bias = as_mx(0.1 * rng.standard_normal(C), dtype)
    W, b = to_numpy(lin.weight), to_numpy(lin.bias)
    return (lambda h: mx.tanh(lin(h))), (lambda h: np.tanh(ref.linear(h, W, b))), lin


# --------------------------------------------------------------------------- functions


@cases
def test_sinkhorn_knopp(case, backend, rng):
    n, _, lead, dtype = case
    logits, logits64 = draw(rng, lead + (n, n), dtype, scale=1.5)
    out = mhc.sinkhorn_knopp(logits)
    assert out.dtype == mx.float32
    assert_matches(out, ref.sinkhorn_knopp(logits64, 20), FORWARD_TOL[dtype], "sinkhorn_knopp")


@pytest.mark.parametrize("iters", [1, 3, 50])
def test_sinkhorn_knopp_iters(iters, backend, rng):
    logits, logits64 = draw(rng, (3, 5, 5), scale=2.0)
    out = mhc.sinkhorn_knopp(logits, iters=iters)
    assert_matches(out, ref.sinkhorn_knopp(logits64, iters), 1e-5, f"sinkhorn_knopp(iters={iters})")


@cases
def test_coefficients_dynamic(case, backend, rng):
    n, C, lead, dtype = case
    x, x64 = draw(rng, lead + (n, C), dtype)
    (phi, phi64), (alpha, alpha64), (bias, bias64) = site_params(rng, n, C, dtype)
    got = mhc.mhc_coefficients(x, phi, alpha, bias)
    want = ref.mhc_coefficients(x64, phi64, alpha64, bias64, 20, 1e-6)
    for name, g, w in zip(("H_pre", "H_post", "H_res"), got, want):
        assert g.dtype == mx.float32, f"{name} must be float32 (coefficient math in float32)"
        assert_matches(g, w, FORWARD_TOL[dtype], f"dynamic {name}")


@pytest.mark.parametrize("iters,eps", [(5, 1e-6), (20, 1e-3)])
def test_coefficients_dynamic_iters_and_eps(iters, eps, backend, rng):
    # x of RMS 1e-2, so that eps = 1e-3 changes r by a factor ~ 3: its place in r is tested.
    n, C = 3, 5
    x, x64 = draw(rng, (4, n, C), scale=1e-2)
    (phi, phi64), (alpha, alpha64), (bias, bias64) = site_params(rng, n, C)
    got = mhc.mhc_coefficients(x, phi, alpha, bias, iters=iters, eps=eps)
    want = ref.mhc_coefficients(x64, phi64, alpha64, bias64, iters, eps)
    for name, g, w in zip(("H_pre", "H_post", "H_res"), got, want):
        assert_matches(g, w, 1e-5, f"{name} (iters={iters}, eps={eps})")


@cases
def test_coefficients_static(case, backend, rng):
    n, C, lead, dtype = case
    x, x64 = draw(rng, lead + (n, C), dtype)
    bias, bias64 = draw(rng, (2 * n + n * n,), dtype, scale=1.5)
    got = mhc.mhc_coefficients(x, None, None, bias)
    want = ref.mhc_coefficients(x64, None, None, bias64, 20)
    for name, g, w, shape in zip(("H_pre", "H_post", "H_res"), got, want, [(n,), (n,), (n, n)]):
        assert tuple(g.shape) == shape, f"static {name}: no leading dims expected, got {g.shape}"
        assert_matches(g, w, FORWARD_TOL[dtype], f"static {name}")


@cases
@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "static"])
def test_mhc_pre(case, per_token, backend, rng):
    n, C, lead, dtype = case
    x, x64 = draw(rng, lead + (n, C), dtype)
    H_pre64 = rng.uniform(0.0, 1.0, (lead if per_token else ()) + (n,))
    H_pre = as_mx(H_pre64)
    out = mhc.mhc_pre(x, H_pre)
    assert out.dtype == dtype
    assert_matches(out, ref.mhc_pre(x64, to_numpy(H_pre)), FORWARD_TOL[dtype], "mhc_pre")


@cases
@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "static"])
def test_mhc_post(case, per_token, backend, rng):
    n, C, lead, dtype = case
    x, x64 = draw(rng, lead + (n, C), dtype)
    f, f64 = draw(rng, lead + (C,), dtype)
    coeff_lead = lead if per_token else ()
    H_post = as_mx(rng.uniform(0.0, 2.0, coeff_lead + (n,)))
    H_res = as_mx(ref.sinkhorn_knopp(rng.standard_normal(coeff_lead + (n, n))))
    out = mhc.mhc_post(x, f, H_post, H_res)
    assert out.dtype == dtype
    want = ref.mhc_post(x64, f64, to_numpy(H_post), to_numpy(H_res))
    assert_matches(out, want, FORWARD_TOL[dtype], "mhc_post")


@cases
def test_expand_and_reduce_streams(case, backend, rng):
    n, C, lead, dtype = case
    h, h64 = draw(rng, lead + (C,), dtype)
    x = mhc.expand_streams(h, n)
    assert x.dtype == dtype
    np.testing.assert_array_equal(to_numpy(x), ref.expand_streams(h64, n))
    s, s64 = draw(rng, lead + (n, C), dtype)
    for reduction in ("mean", "sum"):
        out = mhc.reduce_streams(s, reduction)
        assert out.dtype == dtype
        assert_matches(out, ref.reduce_streams(s64, reduction), FORWARD_TOL[dtype], f"reduce_streams({reduction})")
    assert_matches(mhc.reduce_streams(s), ref.reduce_streams(s64), FORWARD_TOL[dtype], "reduce_streams default")


# rms_norm is plumbing for MHCLayer (tested on every case there): five of the cases, as
# each new shape and dtype costs a C++ compile of the compiled path on a cold CPU cache.
RMS_CASES = [CASES[i] for i in (1, 2, 5, 7, 8)]  # C 7, 13, 33; all leads and dtypes


@pytest.mark.parametrize("case", RMS_CASES, ids=[case_id(c) for c in RMS_CASES])
def test_rms_norm(case, backend, rng):
    _, C, lead, dtype = case
    x, x64 = draw(rng, lead + (C,), dtype, scale=3.0)
    w, w64 = draw(rng, (C,), dtype)
    assert_matches(mhc.rms_norm(x), ref.rms_norm(x64, None, 1e-5), FORWARD_TOL[dtype], "rms_norm")
    assert_matches(mhc.rms_norm(x, w), ref.rms_norm(x64, w64, 1e-5), FORWARD_TOL[dtype], "rms_norm(weight)")
    small, small64 = draw(rng, lead + (C,), dtype, scale=1e-3)
    assert_matches(mhc.rms_norm(small, w, eps=1e-4), ref.rms_norm(small64, w64, 1e-4), FORWARD_TOL[dtype],
                   "rms_norm(eps=1e-4) on small x")


# --------------------------------------------------------------------------- modules


def random_site(rng, n, C, dtype, dynamic=True, variant="mhc", iters=20):
    """A HyperConnection with random (not init) parameters, in dtype, and its float64 parameters."""
    hc = mhc.HyperConnection(C, n=n, dynamic=dynamic, sinkhorn_iters=iters, variant=variant)
    (phi, phi64), (alpha, alpha64), (bias, bias64) = site_params(rng, n, C, dtype)
    if dynamic:
        hc.phi, hc.alpha = phi, alpha
    else:
        phi64 = alpha64 = None
    hc.bias = bias
    return hc, dict(phi=phi64, alpha=alpha64, bias=bias64, iters=iters, variant=variant)


@cases
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_hyper_connection(case, dynamic, backend, rng):
    n, C, lead, dtype = case
    x, x64 = draw(rng, lead + (n, C), dtype)
    hc, p64 = random_site(rng, n, C, dtype, dynamic)
    sub, sub64, _ = tanh_linear(rng, C, dtype)
    out = hc(x, sub)
    assert out.dtype == dtype and tuple(out.shape) == lead + (n, C)
    assert_matches(out, ref.site(x64, sub64, **p64), FORWARD_TOL[dtype], "HyperConnection(x, sublayer)")


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_hyper_connection_hc_variant(dynamic, backend, rng):
    """variant="hc": H_res is the raw logits (unconstrained), everything else as mHC."""
    n, C = 3, 13
    x, x64 = draw(rng, (2, n, C))
    hc, p64 = random_site(rng, n, C, F32, dynamic, variant="hc")
    sub, sub64, _ = tanh_linear(rng, C)
    assert_matches(hc(x, sub), ref.site(x64, sub64, **p64), 1e-5, "HyperConnection(variant='hc')")


@cases
def test_hyper_connection_two_step_form(case, backend, rng):
    n, C, lead, dtype = case
    x, x64 = draw(rng, lead + (n, C), dtype)
    hc, p64 = random_site(rng, n, C, dtype, dynamic=True, iters=7)
    tol = FORWARD_TOL[dtype]
    H_pre, H_post, H_res = ref.mhc_coefficients(x64, p64["phi"], p64["alpha"], p64["bias"], 7, 1e-6)
    coeffs = hc.coefficients(x)
    for name, w in zip(("pre", "post", "res"), (H_pre, H_post, H_res)):
        assert_matches(getattr(coeffs, name), w, tol, f"coefficients().{name}")
    h, coeffs = hc.pre(x)
    assert_matches(h, ref.mhc_pre(x64, H_pre), tol, "pre(x)[0]")
    f, f64 = draw(rng, lead + (C,), dtype)
    assert_matches(hc.post(x, f, coeffs), ref.mhc_post(x64, f64, H_post, H_res), tol, "post(x, f, coeffs)")


@cases
def test_mhc_layer(case, backend, rng):
    n, C, lead, dtype = case
    x, x64 = draw(rng, lead + (n, C), dtype)
    layer = mhc.MHCLayer(n=n, C=C)
    raw = {
        "H_pre_raw": draw(rng, (n,)),
        "H_post_raw": draw(rng, (n,)),
        "H_res_raw": draw(rng, (n, n), scale=1.5),
        "rms_weight": draw(rng, (C,)),
    }
    layer.update({k: v[0] for k, v in raw.items()})
    out = layer(x)
    assert out.dtype == dtype and tuple(out.shape) == lead + (n, C)
    want = ref.mhc_layer(x64, *(raw[k][1] for k in ("H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight")), 20, 1e-5)
    assert_matches(out, want, FORWARD_TOL[dtype], "MHCLayer")


@pytest.mark.parametrize("use_metal,compile_reference", [(False, False), (False, True), (True, None)])
def test_mhc_layer_paths_and_knobs(use_metal, compile_reference, rng):
    """The seed's use_metal / compile_reference / sinkhorn_iters / eps knobs keep the math."""
    n, C = 4, 13
    x, x64 = draw(rng, (3, n, C), scale=0.05)
    layer = mhc.MHCLayer(n, C, sinkhorn_iters=6, eps=1e-3, use_metal=use_metal,
                         compile_reference=compile_reference, threads_per_group=64, dispatch_policy="latency")
    raw = [draw(rng, (n,)), draw(rng, (n,)), draw(rng, (n, n)), draw(rng, (C,))]
    layer.update(dict(zip(("H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight"), (r[0] for r in raw))))
    assert_matches(layer(x), ref.mhc_layer(x64, *(r[1] for r in raw), 6, 1e-3), 1e-5, "MHCLayer with knobs")


@cases
@pytest.mark.parametrize("stream_state", [False, True], ids=["hidden", "streams"])
def test_mhc_rewire(case, stream_state, backend, rng):
    n, C, lead, dtype = case
    lin = nn.Linear(C, C)
    lin.set_dtype(dtype)
    rw = mhc.MHCRewire(lin, dims=C, n=n, stream_state=stream_state)
    (phi, phi64), (alpha, alpha64), (bias, bias64) = site_params(rng, n, C, dtype)
    rw.hc.phi, rw.hc.alpha, rw.hc.bias = phi, alpha, bias
    W, b = to_numpy(lin.weight), to_numpy(lin.bias)

    def site64(s):
        return ref.site(s, lambda h: ref.linear(h, W, b), phi64, alpha64, bias64)

    if stream_state:
        x, x64 = draw(rng, lead + (n, C), dtype)
        want = site64(x64)
    else:
        x, x64 = draw(rng, lead + (C,), dtype)
        want = ref.reduce_streams(site64(ref.expand_streams(x64, n)))
    out = rw(x)
    assert out.dtype == dtype and tuple(out.shape) == tuple(x.shape)
    assert_matches(out, want, FORWARD_TOL[dtype], f"MHCRewire(stream_state={stream_state})")


# --------------------------------------------------------------------------- mlx-mhc 0.4.1


@cases
@pytest.mark.parametrize("log_space", [True, False], ids=["log", "direct"])
def test_compat_sinkhorn(case, log_space, backend, rng):
    n, _, lead, dtype = case
    m, m64 = draw(rng, lead + (n, n), dtype)
    out = mlx_mhc.sinkhorn_knopp(m, log_space=log_space)
    assert out.dtype == mx.float32
    want = ref.compat_sinkhorn(m64, 100, 1e-6, log_space)
    assert_matches(out, want, FORWARD_TOL[dtype], f"mlx_mhc.sinkhorn_knopp(log_space={log_space})")


@pytest.mark.parametrize("log_space", [True, False], ids=["log", "direct"])
def test_compat_sinkhorn_stops_each_matrix_on_its_own(log_space, rng):
    """With a loose epsilon the matrices of one batch converge after different numbers of
    iterations; each must be frozen at its own stopping point, as mlx-mhc's early exit did.

    A matrix whose error passes within 1 % of epsilon at some iteration is redrawn: float32
    rounding can move its stopping point by one iteration either way, which is not a bug."""
    epsilon, kept = 1e-3, []
    stops = set()
    while len(kept) < 24:
        m = rng.standard_normal((4, 4)) * rng.uniform(0.3, 3.0)
        _, errors = ref.compat_sinkhorn_one(m.astype(np.float32), 100, epsilon, log_space)
        if any(abs(e / epsilon - 1.0) < 1e-2 for e in errors):
            continue
        kept.append(m.astype(np.float32))
        stops.add(len(errors))
    assert len(stops) > 1, "the batch should mix matrices that stop at different iterations"
    batch = np.stack(kept)
    out = mlx_mhc.sinkhorn_knopp(mx.array(batch), max_iterations=100, epsilon=epsilon, log_space=log_space)
    assert_matches(out, ref.compat_sinkhorn(batch, 100, epsilon, log_space), 1e-5,
                   f"mlx_mhc.sinkhorn_knopp(epsilon={epsilon}) per-matrix stopping")


@cases
@pytest.mark.parametrize("form", ["hidden", "streams"])
def test_manifold_hyper_connection(case, form, backend, rng):
    n, C, lead, dtype = case
    conn = mlx_mhc.ManifoldHyperConnection(dims=C, expansion=n, sinkhorn_iterations=10)
    bias, bias64 = draw(rng, (2 * n + n * n,), scale=1.5)
    conn.bias = bias
    lo, lo64 = draw(rng, lead + (C,), dtype)
    x, x64 = draw(rng, lead + ((C,) if form == "hidden" else (n, C)), dtype)
    out = conn(x, lo)
    assert tuple(out.shape) == tuple(x.shape) and out.dtype == dtype
    want = ref.manifold_hyper_connection(x64, lo64, bias64, 10)
    assert_matches(out, want, FORWARD_TOL[dtype], f"ManifoldHyperConnection ({form} form)")
    if form == "hidden":  # the docstring's closed form: x + mean(H_post) * layer_output
        mean_post = np.mean(2.0 * ref.sigmoid(bias64[n : 2 * n]))
        assert_matches(out, x64 + mean_post * lo64, FORWARD_TOL[dtype], "x + mean(H_post) layer_output")
