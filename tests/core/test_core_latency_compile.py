"""HyperConnection's latency path (a few tokens on a GPU machine): its dispatch and ops run under
one mx.compile (mhc_mlx.dispatch.compiled_latency). Here the GPU's presence is stood in, so the
CPU's own path is what gets compiled: outputs and gradients equal the eager module's, updated
parameters are used (inputs of the trace, never its constants), and a changed setting (the
forced backend) takes a new trace instead of a stale one."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mhc_mlx as mhc
from mhc_mlx.kernels import build


@pytest.fixture
def latency_on(monkeypatch):
    monkeypatch.setattr(build, "gpu_present", lambda: True)
    monkeypatch.setattr(build, "COMPILE_LATENCY", True)
    traced = []
    real = build.compiled_for.__wrapped__

    def counting(fn, key):
        traced.append(key)
        return real(fn, key)

    cache = {}

    def cached(fn, key):
        if (fn, key) not in cache:
            cache[(fn, key)] = counting(fn, key)
        return cache[(fn, key)]

    monkeypatch.setattr(build, "compiled_for", cached)
    return traced


def _eager(monkeypatch, fn):
    monkeypatch.setattr(build, "COMPILE_LATENCY", False)
    try:
        return fn()
    finally:
        monkeypatch.setattr(build, "COMPILE_LATENCY", True)


def _np(a):
    return np.array(a.astype(mx.float32))


@pytest.mark.parametrize("dynamic", [True, False])
def test_hyper_connection_latency_path(monkeypatch, latency_on, dynamic):
    n, C, T = 4, 24, 2
    hc = mhc.HyperConnection(C, n, dynamic=dynamic, init="paper")
    x = mx.random.normal((T, n, C))

    def site(x):
        h, coeffs = hc.pre(x)
        return hc.post(x, h * 0.5, coeffs)

    for step in range(2):
        got = site(x), hc(x, lambda h: h * 0.5)
        want = _eager(monkeypatch, lambda: (site(x), hc(x, lambda h: h * 0.5)))
        for a, b in zip(got, want):
            np.testing.assert_allclose(_np(a), _np(b), rtol=1e-6, atol=1e-6)
        hc.bias = hc.bias + 0.3  # a changed parameter on the second pass
    assert latency_on  # the compiled latency paths ran

    def loss(params, x):
        hc.update(params)
        return (site(x) ** 2).sum()

    got = mx.grad(loss)(hc.trainable_parameters(), x)
    want = _eager(monkeypatch, lambda: mx.grad(loss)(hc.trainable_parameters(), x))
    for k in want:
        np.testing.assert_allclose(_np(got[k]), _np(want[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def test_latency_trace_follows_the_forced_backend(monkeypatch, latency_on):
    # a forced backend is part of the trace's key: forcing the reference after a compiled-path
    # trace takes a new trace (the reference's ops), not the old one
    n, C = 4, 24
    hc = mhc.HyperConnection(C, n)
    x = mx.random.normal((1, n, C))
    hc.pre(x)
    with mhc.use_backend("reference"):
        hc.pre(x)
    keys = set(latency_on)
    assert len(keys) == 2 and {k[1][0] for k in keys} == {None, "reference"}


@pytest.mark.parametrize("T", [1, build.LATENCY_COMPILE_TOKENS, build.LATENCY_COMPILE_TOKENS + 1])
def test_latency_path_only_up_to_its_token_count(latency_on, T):
    n, C = 4, 24
    hc = mhc.HyperConnection(C, n)
    hc(mx.random.normal((T, n, C)), lambda h: h)
    assert bool(latency_on) == (T <= build.LATENCY_COMPILE_TOKENS)


def test_post_latency_path_still_checks_its_inputs(latency_on):
    n, C = 4, 24
    hc = mhc.HyperConnection(C, n)
    x = mx.random.normal((1, n, C))
    h, coeffs = hc.pre(x)
    with pytest.raises(ValueError, match="f"):
        hc.post(x, mx.zeros((1, C + 1)), coeffs)


def test_site_keeps_its_latency_decision_until_shape_dtype_or_state_change(monkeypatch, latency_on):
    # HyperConnection keeps its checks' and latency choice's outcome per (shape, dtype,
    # dispatch.state()), as MHCLayer does: decided again for a new shape, dtype, forced backend or
    # setting, for a changed setting of the site itself, and never keeping a parameter
    from mhc_mlx import dispatch

    decisions = []
    real = dispatch.latency_compiles

    def counting(x):
        decisions.append(tuple(x.shape))
        return real(x)

    monkeypatch.setattr(dispatch, "latency_compiles", counting)
    n, C = 4, 24
    hc, fresh = mhc.HyperConnection(C, n, init="paper"), mhc.HyperConnection(C, n, init="paper")
    hc.bias = 2 * mx.random.normal(hc.bias.shape)  # H_res far from uniform: iterations matter
    x = mx.random.normal((1, n, C))

    def site(m, x):
        h, coeffs = m.pre(x)
        return m.post(x, h * 0.5, coeffs)

    def eager_twin(x):  # a fresh site with hc's parameters and settings, off the latency path
        fresh.update(dict(hc.parameters()))
        fresh.sinkhorn_iters = hc.sinkhorn_iters
        return _eager(monkeypatch, lambda: site(fresh, x))

    first = site(hc, x)
    assert mx.array_equal(site(hc, x), first) and mx.array_equal(hc(x, lambda h: h * 0.5), first)
    assert len(decisions) == 1
    np.testing.assert_allclose(_np(first), _np(eager_twin(x)), rtol=1e-6, atol=1e-6)
    count = len(decisions)
    site(hc, mx.random.normal((2, n, C)))
    site(hc, x.astype(mx.bfloat16))
    assert len(decisions) == count + 2
    with mhc.use_backend("reference"):
        ref = site(hc, x)
    assert len(decisions) == count + 3
    np.testing.assert_allclose(_np(ref), _np(first), rtol=1e-5, atol=1e-6)
    # updated parameters are read on every call, not kept (eager_twin's settings moved the state:
    # one call decides again first)
    site(hc, x)
    count = len(decisions)
    hc.bias = hc.bias + 0.3
    moved = site(hc, x)
    assert len(decisions) == count and not mx.allclose(moved, first, atol=1e-4)
    np.testing.assert_allclose(_np(moved), _np(eager_twin(x)), rtol=1e-6, atol=1e-6)
    # a setting of the site itself decides again, and takes effect
    hc.sinkhorn_iters = 2
    count = len(decisions)
    few = site(hc, x)
    assert len(decisions) == count + 1 and not mx.allclose(few, moved, atol=1e-4)
    np.testing.assert_allclose(_np(few), _np(eager_twin(x)), rtol=1e-6, atol=1e-6)
    # what the site keeps is no parameter; bad input after good calls is still refused
    assert set(dict(hc.parameters())) == {"phi", "alpha", "bias"}
    with pytest.raises(ValueError, match="expected n=4"):
        hc.pre(mx.random.normal((1, 3, C)))
    with pytest.raises(ValueError, match="expected C=24"):
        hc.pre(mx.random.normal((1, n, C + 1)))
