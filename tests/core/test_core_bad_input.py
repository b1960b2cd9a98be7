"""Bad input gets a ValueError/TypeError that names the problem; NaN in gives NaN out.

Every `pytest.raises` checks the message (`match=`), so an error from deep inside MLX, or
one that names the wrong thing, fails the test.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx_mhc
import numpy as np
import pytest
import reference64 as ref
from core_testlib import as_mx, draw, site_params, to_numpy

import mhc_mlx as mhc

N, C = 4, 8
W = 2 * N + N * N


def streams(*lead, n=N, c=C, dtype=mx.float32):
    return mx.zeros(lead + (n, c), dtype=dtype)


def params(n=N, c=C):
    return mx.zeros((n * c, 2 * n + n * n)), mx.zeros((3,)), mx.zeros((2 * n + n * n,))


# --------------------------------------------------------------------------- functions

BAD_FUNCTION_CALLS = [
    # wrong rank
    ("sinkhorn rank 1", lambda: mhc.sinkhorn_knopp(mx.zeros((4,))), ValueError, r"square"),
    ("coefficients rank 1", lambda: mhc.mhc_coefficients(mx.zeros((C,)), None, None, mx.zeros((W,))),
     ValueError, r"\[\.\.\., n, C\].*rank"),
    ("pre rank 1", lambda: mhc.mhc_pre(mx.zeros((C,)), mx.zeros((N,))), ValueError, r"x must be stream state"),
    ("post rank 1", lambda: mhc.mhc_post(mx.zeros((C,)), mx.zeros((C,)), mx.zeros((N,)), mx.eye(N)),
     ValueError, r"x must be stream state"),
    ("reduce rank 1", lambda: mhc.reduce_streams(mx.zeros((C,))), ValueError, r"rank"),
    ("expand rank 0", lambda: mhc.expand_streams(mx.array(1.0), 2), ValueError, r"at least one dim"),
    # non-square logits
    ("sinkhorn 3x4", lambda: mhc.sinkhorn_knopp(mx.zeros((2, 3, 4))), ValueError, r"square.*\(2, 3, 4\)"),
    # n / C mismatches between arguments
    ("phi for other C", lambda: mhc.mhc_coefficients(streams(2), mx.zeros((N * (C + 1), W)), mx.zeros((3,)),
                                                     mx.zeros((W,))), ValueError, r"phi must have shape \(32, 24\)"),
    ("bias for other n", lambda: mhc.mhc_coefficients(streams(2), None, None, mx.zeros((15,))),
     ValueError, r"bias must have shape \(24,\) for n=4"),
    ("alpha shape", lambda: mhc.mhc_coefficients(streams(2), mx.zeros((N * C, W)), mx.zeros((2,)), mx.zeros((W,))),
     ValueError, r"alpha must have shape \(3,\)"),
    ("phi without alpha", lambda: mhc.mhc_coefficients(streams(2), mx.zeros((N * C, W)), None, mx.zeros((W,))),
     ValueError, r"phi and alpha"),
    ("no bias", lambda: mhc.mhc_coefficients(streams(2), None, None, None), TypeError, r"bias"),
    ("H_pre for n=3", lambda: mhc.mhc_pre(streams(2), mx.zeros((3,))),
     ValueError, r"H_pre must have shape \[\.\.\., 4\]"),
    ("H_pre lead", lambda: mhc.mhc_pre(streams(2), mx.zeros((3, N))), ValueError, r"H_pre leading dims \(3,\)"),
    ("f width", lambda: mhc.mhc_post(streams(2), mx.zeros((2, C + 1)), mx.zeros((N,)), mx.eye(N)),
     ValueError, r"f \(the sublayer output\) must have shape \(2, 8\)"),
    ("H_post for n=3", lambda: mhc.mhc_post(streams(2), mx.zeros((2, C)), mx.zeros((3,)), mx.eye(N)),
     ValueError, r"H_post must have shape"),
    ("H_res not square", lambda: mhc.mhc_post(streams(2), mx.zeros((2, C)), mx.zeros((N,)), mx.zeros((N, 3))),
     ValueError, r"H_res must have shape \[\.\.\., 4, 4\]"),
    ("rms weight", lambda: mhc.rms_norm(mx.zeros((2, C)), mx.ones((C + 1,))),
     ValueError, r"weight must have shape \(8,\)"),
    # dtypes: integer and float64 are refused, naming the dtype
    ("sinkhorn int32", lambda: mhc.sinkhorn_knopp(mx.zeros((3, 3), dtype=mx.int32)), TypeError, r"logits.*int32"),
    ("sinkhorn float64", lambda: mhc.sinkhorn_knopp(mx.zeros((3, 3), dtype=mx.float64)), TypeError, r"logits.*float64"),
    ("coefficients x int32", lambda: mhc.mhc_coefficients(streams(2, dtype=mx.int32), *params()),
     TypeError, r"x.*int32"),
    ("coefficients phi float64",
     lambda: mhc.mhc_coefficients(streams(2), mx.zeros((N * C, W), dtype=mx.float64), mx.zeros((3,)), mx.zeros((W,))),
     TypeError, r"phi.*float64"),
    ("pre x float64", lambda: mhc.mhc_pre(streams(2, dtype=mx.float64), mx.zeros((N,))), TypeError, r"x.*float64"),
    ("pre H_pre int32", lambda: mhc.mhc_pre(streams(2), mx.zeros((N,), dtype=mx.int32)), TypeError, r"H_pre.*int32"),
    ("post f int32", lambda: mhc.mhc_post(streams(2), mx.zeros((2, C), dtype=mx.int32), mx.zeros((N,)), mx.eye(N)),
     TypeError, r"f.*int32"),
    ("expand int32", lambda: mhc.expand_streams(mx.zeros((2, C), dtype=mx.int32), 2), TypeError, r"int32"),
    ("reduce float64", lambda: mhc.reduce_streams(streams(2, dtype=mx.float64)), TypeError, r"float64"),
    ("rms int32", lambda: mhc.rms_norm(mx.zeros((2, C), dtype=mx.int32)), TypeError, r"int32"),
    ("numpy input", lambda: mhc.sinkhorn_knopp(np.zeros((3, 3), np.float32)), TypeError, r"mlx.core.array"),
    # n < 1, iters < 1, other scalars
    ("expand n=0", lambda: mhc.expand_streams(mx.zeros((2, C)), 0), ValueError, r"n must be >= 1"),
    ("expand n=2.0", lambda: mhc.expand_streams(mx.zeros((2, C)), 2.0), TypeError, r"n must be an int"),
    ("sinkhorn iters=0", lambda: mhc.sinkhorn_knopp(mx.zeros((3, 3)), iters=0), ValueError, r"iters must be >= 1"),
    ("sinkhorn iters=-3", lambda: mhc.sinkhorn_knopp(mx.zeros((3, 3)), iters=-3), ValueError, r"iters must be >= 1"),
    ("sinkhorn iters=2.5", lambda: mhc.sinkhorn_knopp(mx.zeros((3, 3)), iters=2.5), TypeError, r"iters must be an int"),
    ("coefficients iters=0", lambda: mhc.mhc_coefficients(streams(2), *params(), iters=0),
     ValueError, r"iters must be >= 1"),
    ("coefficients eps=0", lambda: mhc.mhc_coefficients(streams(2), *params(), eps=0.0), ValueError, r"eps"),
    ("rms eps<0", lambda: mhc.rms_norm(mx.zeros((2, C)), eps=-1e-5), ValueError, r"eps"),
    ("reduce unknown", lambda: mhc.reduce_streams(streams(2), "max"), ValueError, r"unknown reduction 'max'"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in BAD_FUNCTION_CALLS],
                         ids=[c[0] for c in BAD_FUNCTION_CALLS])
def test_functions_refuse_bad_input(call, error, match, backend):
    with pytest.raises(error, match=match):
        mx.eval(call())


# --------------------------------------------------------------------------- modules

BAD_MODULE_CALLS = [
    ("HC dims=0", lambda: mhc.HyperConnection(0), ValueError, r"dims must be >= 1"),
    ("HC n=0", lambda: mhc.HyperConnection(C, n=0), ValueError, r"n must be >= 1"),
    ("HC n=-1 static", lambda: mhc.HyperConnection(C, n=-1, dynamic=False), ValueError, r"n must be >= 1"),
    ("HC iters=0", lambda: mhc.HyperConnection(C, sinkhorn_iters=0), ValueError, r"sinkhorn_iters must be >= 1"),
    ("HC unknown init", lambda: mhc.HyperConnection(C, init="xavier"), ValueError, r"unknown init 'xavier'"),
    ("HC unknown variant", lambda: mhc.HyperConnection(C, variant="mhc2"), ValueError, r"unknown variant 'mhc2'"),
    ("HC eps=0", lambda: mhc.HyperConnection(C, eps=0.0), ValueError, r"eps"),
    ("HC wrong n", lambda: mhc.HyperConnection(C, n=N)(streams(2, n=3), nn.Identity()), ValueError,
     r"3 streams.*expected n=4"),
    ("HC wrong C", lambda: mhc.HyperConnection(C, n=N)(streams(2, c=C + 1), nn.Identity()), ValueError,
     r"width 9.*expected C=8"),
    ("HC rank 1", lambda: mhc.HyperConnection(C, n=N)(mx.zeros((C,)), nn.Identity()), ValueError, r"rank"),
    ("HC int32", lambda: mhc.HyperConnection(C, n=N)(streams(2, dtype=mx.int32), nn.Identity()), TypeError, r"int32"),
    ("HC float64", lambda: mhc.HyperConnection(C, n=N)(streams(2, dtype=mx.float64), nn.Identity()),
     TypeError, r"float64"),
    ("HC sublayer changes width", lambda: mhc.HyperConnection(C, n=N)(streams(2), lambda h: h[..., :4]),
     ValueError, r"f \(the sublayer output\) must have shape \(2, 8\), got \(2, 4\)"),
    ("HC static wrong n", lambda: mhc.HyperConnection(C, n=N, dynamic=False)(streams(n=2), nn.Identity()),
     ValueError, r"2 streams.*expected n=4"),
    ("MHCLayer n=0", lambda: mhc.MHCLayer(0, C), ValueError, r"n must be >= 1"),
    ("MHCLayer C=0", lambda: mhc.MHCLayer(N, 0), ValueError, r"C must be >= 1"),
    ("MHCLayer iters=0", lambda: mhc.MHCLayer(N, C, sinkhorn_iters=0), ValueError, r"sinkhorn_iters must be >= 1"),
    ("MHCLayer wrong n", lambda: mhc.MHCLayer(N, C)(streams(2, n=5)), ValueError, r"5 streams.*expected n=4"),
    ("MHCLayer wrong C", lambda: mhc.MHCLayer(N, C)(streams(2, c=7)), ValueError, r"width 7.*expected C=8"),
    ("MHCLayer rank 1", lambda: mhc.MHCLayer(N, C)(mx.zeros((C,))), ValueError, r"rank"),
    ("MHCLayer int32", lambda: mhc.MHCLayer(N, C)(streams(2, dtype=mx.int32)), TypeError, r"int32"),
    # the seed's retired tuning knobs and nonsense values
    ("MHCLayer hybrid_latency", lambda: mhc.MHCLayer(N, C, hybrid_latency=True), TypeError, r"'hybrid_latency'"),
    ("MHCLayer mix_kernel", lambda: mhc.MHCLayer(N, C, mix_kernel="col"), TypeError, r"'mix_kernel'"),
    ("MHCLayer fused_backward", lambda: mhc.MHCLayer(N, C, fused_backward=False), TypeError, r"'fused_backward'"),
    ("MHCLayer auto_dispatch", lambda: mhc.MHCLayer(N, C, auto_dispatch=False), TypeError, r"'auto_dispatch'"),
    ("MHCLayer unknown kwarg", lambda: mhc.MHCLayer(N, C, fast=True), TypeError, r"unexpected argument 'fast'"),
    ("MHCLayer tpg=48", lambda: mhc.MHCLayer(N, C, threads_per_group=48),
     ValueError, r"threads_per_group.*power of two"),
    ("MHCLayer tpg=16", lambda: mhc.MHCLayer(N, C, threads_per_group=16),
     ValueError, r"threads_per_group.*\[32, 1024\]"),
    ("MHCLayer tpg=2048", lambda: mhc.MHCLayer(N, C, threads_per_group=2048), ValueError, r"threads_per_group"),
    ("MHCLayer tpg=0", lambda: mhc.MHCLayer(N, C, threads_per_group=0), ValueError, r"threads_per_group"),
    ("MHCLayer tpg=64.0", lambda: mhc.MHCLayer(N, C, threads_per_group=64.0), TypeError, r"threads_per_group"),
    ("MHCLayer policy", lambda: mhc.MHCLayer(N, C, dispatch_policy="fastest"), ValueError,
     r"unknown dispatch_policy 'fastest'"),
    ("Rewire not callable", lambda: mhc.MHCRewire(3, dims=C), TypeError, r"module must be callable"),
    ("Rewire n=0", lambda: mhc.MHCRewire(nn.Linear(C, C), dims=C, n=0), ValueError, r"n must be >= 1"),
    ("Rewire unknown init", lambda: mhc.MHCRewire(nn.Linear(C, C), dims=C, init="zeros"), ValueError,
     r"unknown init 'zeros'"),
    ("Rewire wrong width", lambda: mhc.MHCRewire(nn.Linear(C, C), dims=C)(mx.zeros((2, C + 1))), ValueError,
     r"hidden state \[\.\.\., 8\]"),
    ("Rewire stream_state hidden x",
     lambda: mhc.MHCRewire(nn.Linear(C, C), dims=C, stream_state=True)(mx.zeros((2, C))),
     ValueError, r"2 streams.*expected n=4"),
    ("Rewire int32", lambda: mhc.MHCRewire(nn.Linear(C, C), dims=C)(mx.zeros((2, C), dtype=mx.int32)),
     TypeError, r"int32"),
    # mlx-mhc 0.4.1 API
    ("compat non-square", lambda: mlx_mhc.sinkhorn_knopp(mx.zeros((3, 4))), ValueError, r"square"),
    ("compat max_iterations=0", lambda: mlx_mhc.sinkhorn_knopp(mx.zeros((3, 3)), max_iterations=0), ValueError,
     r"max_iterations must be >= 1"),
    ("compat epsilon=0", lambda: mlx_mhc.sinkhorn_knopp(mx.zeros((3, 3)), epsilon=0.0), ValueError, r"epsilon"),
    ("compat int32", lambda: mlx_mhc.sinkhorn_knopp(mx.zeros((3, 3), dtype=mx.int32)), TypeError, r"int32"),
    ("MHC expansion=0", lambda: mlx_mhc.ManifoldHyperConnection(C, expansion=0), ValueError,
     r"expansion must be >= 1"),
    ("MHC sinkhorn_iterations=0", lambda: mlx_mhc.ManifoldHyperConnection(C, sinkhorn_iterations=0), ValueError,
     r"sinkhorn_iterations must be >= 1"),
    ("MHC mismatched output", lambda: mlx_mhc.ManifoldHyperConnection(C)(mx.zeros((2, C)), mx.zeros((2, C - 1))),
     ValueError, r"layer_output \(2, 7\) fits neither"),
    ("MHC wrong dims", lambda: mlx_mhc.ManifoldHyperConnection(C)(mx.zeros((2, C + 1)), mx.zeros((2, C + 1))),
     ValueError, r"x must be \[\.\.\., 8\]"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in BAD_MODULE_CALLS],
                         ids=[c[0] for c in BAD_MODULE_CALLS])
def test_modules_refuse_bad_input(call, error, match, backend):
    with pytest.raises(error, match=match):
        mx.eval(call())


# --------------------------------------------------------------------------- backend names


def test_unknown_backend_in_use_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'bogus'.*use_backend"):
        with mhc.use_backend("bogus"):
            pass


@pytest.mark.parametrize("call", [
    lambda: mhc.sinkhorn_knopp(mx.zeros((3, 3))),
    lambda: mhc.mhc_pre(streams(2), mx.zeros((N,))),
    lambda: mhc.MHCLayer(N, C)(streams(2)),
    lambda: mhc.HyperConnection(C, n=N)(streams(2), nn.Identity()),
], ids=["sinkhorn", "pre", "MHCLayer", "HyperConnection"])
def test_unknown_backend_in_environment(call, monkeypatch):
    monkeypatch.setenv("MHC_MLX_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"unknown backend 'bogus'.*MHC_MLX_BACKEND"):
        mx.eval(call())


@pytest.mark.parametrize("value", ["reference", "compiled", " Compiled ", "auto", ""])
def test_known_backend_names_in_environment(value, monkeypatch, rng):
    monkeypatch.setenv("MHC_MLX_BACKEND", value)
    L, L64 = draw(rng, (3, 3))
    np.testing.assert_allclose(to_numpy(mhc.sinkhorn_knopp(L)), ref.sinkhorn_knopp(L64), atol=1e-6)


# --------------------------------------------------------------------------- NaN in, NaN out


def assert_nan_pattern(out, want64, what):
    """NaN exactly where the float64 reference has NaN: never cleaned, never spread further."""
    got = np.isnan(to_numpy(out))
    expected = np.isnan(want64)
    assert expected.any(), "test setup: the reference should produce NaN here"
    assert np.array_equal(got, expected), (
        f"{what}: NaN at {np.argwhere(got).tolist()[:8]}..., reference NaN at {np.argwhere(expected).tolist()[:8]}...")


def test_nan_sinkhorn(backend, rng):
    L, L64 = draw(rng, (3, 4, 4))
    L64[1, 2, 3] = np.nan
    out = mhc.sinkhorn_knopp(as_mx(L64))
    assert_nan_pattern(out, ref.sinkhorn_knopp(L64), "sinkhorn_knopp")
    assert np.all(np.isfinite(to_numpy(out)[[0, 2]])), "NaN leaked into other matrices of the batch"
    for log_space in (True, False):
        out = mlx_mhc.sinkhorn_knopp(as_mx(L64), log_space=log_space)
        assert np.isnan(to_numpy(out)[1]).any() and np.all(np.isfinite(to_numpy(out)[[0, 2]])), log_space


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_nan_coefficients(dynamic, backend, rng):
    n, c = 3, 5
    x, x64 = draw(rng, (4, n, c))
    (phi, phi64), (alpha, alpha64), (bias, bias64) = site_params(rng, n, c)
    if dynamic:  # NaN in one token's x: that token's coefficients only
        x64[2, 1, 3] = np.nan
        got = mhc.mhc_coefficients(as_mx(x64), phi, alpha, bias)
        want = ref.mhc_coefficients(x64, phi64, alpha64, bias64)
    else:  # NaN in one res logit of the bias: H_res only
        bias64[2 * n + 4] = np.nan
        got = mhc.mhc_coefficients(x, None, None, as_mx(bias64))
        want = ref.mhc_coefficients(x64, None, None, bias64)
        assert np.all(np.isfinite(to_numpy(got[0]))) and np.all(np.isfinite(to_numpy(got[1])))
        got, want = got[2:], want[2:]
    for g, w in zip(got, want):
        assert_nan_pattern(g, w, "mhc_coefficients")


def test_nan_pre_and_post(backend, rng):
    x, x64 = draw(rng, (2, 3, 5))
    f, f64 = draw(rng, (2, 5))
    Hp64, Hpost64 = rng.uniform(0, 1, 3), rng.uniform(0, 2, 3)
    Hr64 = ref.sinkhorn_knopp(rng.standard_normal((3, 3)))
    Hp, Hpost, Hr = as_mx(Hp64), as_mx(Hpost64), as_mx(Hr64)
    Hp64, Hpost64, Hr64 = to_numpy(Hp), to_numpy(Hpost), to_numpy(Hr)
    xn = x64.copy()
    xn[1, 2, 4] = np.nan
    assert_nan_pattern(mhc.mhc_pre(as_mx(xn), Hp), ref.mhc_pre(xn, Hp64), "mhc_pre (NaN in x)")
    assert_nan_pattern(mhc.mhc_post(as_mx(xn), f, Hpost, Hr), ref.mhc_post(xn, f64, Hpost64, Hr64),
                       "mhc_post (NaN in x)")
    fn = f64.copy()
    fn[0, 1] = np.nan
    assert_nan_pattern(mhc.mhc_post(x, as_mx(fn), Hpost, Hr), ref.mhc_post(x64, fn, Hpost64, Hr64),
                       "mhc_post (NaN in f)")
    Hn = Hr64.copy()
    Hn[0, 2] = np.nan
    assert_nan_pattern(mhc.mhc_post(x, f, Hpost, as_mx(Hn)), ref.mhc_post(x64, f64, Hpost64, Hn),
                       "mhc_post (NaN in H_res)")
    assert_nan_pattern(mhc.rms_norm(as_mx(xn)), ref.rms_norm(xn), "rms_norm")
    assert_nan_pattern(mhc.reduce_streams(as_mx(xn)), ref.reduce_streams(xn), "reduce_streams")


def nan_token_check(out, bad, what):
    out = to_numpy(out)
    assert np.isnan(out[bad]).any(), f"{what}: NaN in token {bad} vanished"
    good = [i for i in range(out.shape[0]) if i != bad]
    assert np.all(np.isfinite(out[good])), f"{what}: NaN leaked into other tokens"


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_nan_modules(dynamic, backend, rng):
    n, c = 3, 6
    x, x64 = draw(rng, (4, n, c))
    x64[1, 0, 2] = np.nan
    xn = as_mx(x64)
    hc = mhc.HyperConnection(c, n=n, dynamic=dynamic)
    nan_token_check(hc(xn, nn.Linear(c, c)), 1, "HyperConnection")
    nan_token_check(mhc.MHCRewire(nn.Linear(c, c), dims=c, n=n, dynamic=dynamic, stream_state=True)(xn), 1,
                    "MHCRewire(stream_state=True)")
    h = to_numpy(mx.random.normal((4, c)))
    h[3, 5] = np.nan
    nan_token_check(mhc.MHCRewire(nn.Linear(c, c), dims=c, n=n, dynamic=dynamic)(as_mx(h)), 3, "MHCRewire")
    nan_token_check(mhc.MHCLayer(n, c)(xn), 1, "MHCLayer")
    conn = mlx_mhc.ManifoldHyperConnection(c, expansion=n)
    nan_token_check(conn(as_mx(h), mx.zeros((4, c))), 3, "ManifoldHyperConnection (hidden)")
    nan_token_check(conn(xn, mx.zeros((4, c))), 1, "ManifoldHyperConnection (streams)")


def test_checks_kept_for_good_calls_still_refuse_bad_ones(backend):
    # ops.check_post keeps the signatures that passed, the modules their decisions per shape and
    # dtype: a new shape or dtype after good calls must still be checked, and refused
    x, f, h_post, h_res = streams(2), mx.zeros((2, C)), mx.zeros((N,)), mx.zeros((N, N))
    for _ in range(2):
        mx.eval(mhc.mhc_post(x, f, h_post, h_res))
    with pytest.raises(ValueError, match=r"H_res must have shape \[\.\.\., 4, 4\]"):
        mhc.mhc_post(x, f, h_post, mx.zeros((N, N + 1)))
    with pytest.raises(TypeError, match=r"int32"):
        mhc.mhc_post(x, f.astype(mx.int32), h_post, h_res)
    with pytest.raises(ValueError, match=r"f \(the sublayer output\) must have shape \(2, 8\)"):
        mhc.mhc_post(x, mx.zeros((3, C)), h_post, h_res)
    hc = mhc.HyperConnection(C, n=N)
    for _ in range(2):
        h, coeffs = hc.pre(x)
        mx.eval(hc.post(x, h, coeffs))
    with pytest.raises(ValueError, match=r"expected n=4"):
        hc.pre(streams(2, n=3))
    with pytest.raises(ValueError, match=r"must have shape \(2, 8\)"):
        hc.post(x, mx.zeros((2, C + 1)), coeffs)
    layer = mhc.MHCLayer(N, C)
    for _ in range(2):
        mx.eval(layer(x))
    with pytest.raises(ValueError, match=r"expected C=8"):
        layer(streams(2, c=C + 1))
    with pytest.raises(TypeError, match=r"int32"):
        layer(x.astype(mx.int32))
