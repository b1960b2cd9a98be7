"""The shipped kernels on shapes drawn at random (hypothesis), run by the CPU emulator against
the float64 reference and the reference path's autodiff: odd widths, vector widths that do and
do not divide C, leading dims, n from 1 to 32, every dtype. test_kernels_emulated.py holds the
fixed cases; this file looks for the shape nobody listed."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpu_emulator as emu
import kernels_ref64 as ref64
from kernel_compare import as_cuda, grad_errors, grad_rel, largest, np64, random_dynamic_site, rel
from mhc_mlx import reference
from mhc_mlx.kernels import build, coefficients, coefficients_mma, coefficients_mma_vjp, layer, sinkhorn, site

pytestmark = pytest.mark.slow
TOL = {mx.float32: 1e-5, mx.bfloat16: 2e-2, mx.float16: 2e-2}
GRAD_TOL = 2e-5
DTYPES = st.sampled_from([mx.float32, mx.bfloat16, mx.float16])
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    for module in (build, coefficients, coefficients_mma, coefficients_mma_vjp, layer, sinkhorn, site):
        monkeypatch.setattr(module, "launch", emu.launch)
    emu.use_flavour("cuda")


@SETTINGS
@given(n=st.sampled_from([1, 2, 3, 4, 5, 8, 16, 32]), C=st.integers(1, 300), T=st.integers(1, 5),
       lead2=st.booleans(), shared=st.booleans(), dtype=DTYPES)
def test_pre_and_post_on_drawn_shapes(n, C, T, lead2, shared, dtype):
    lead = (2, T) if lead2 else (T,)
    x = mx.random.normal((*lead, n, C)).astype(dtype)
    f = mx.random.normal((*lead, C)).astype(dtype)
    clead = () if shared else lead
    hp, hq, hr = mx.random.uniform(shape=(*clead, n)), mx.random.uniform(shape=(*clead, n)), \
        mx.random.uniform(shape=(*clead, n, n))
    floor = 0.1 * np.linalg.norm(np64(x))  # sums of terms of x's size can cancel (kernel_compare.rel)
    assert rel(site.pre_forward(x, hp), ref64.pre(np64(x), np64(hp)), floor) <= TOL[dtype]
    assert rel(site.post_forward(x, f, hq, hr), ref64.post(np64(x), np64(f), np64(hq), np64(hr)), floor) <= TOL[dtype]
    # gradients against the reference's float32 autodiff on the same (16-bit valued) inputs
    g_pre = mx.random.normal((*lead, C)).astype(dtype)
    g_post = mx.random.normal((*lead, n, C)).astype(dtype)
    got = list(site.pre_vjp(x, hp, g_pre)) + list(site.post_vjp(x, f, hq, hr, g_post))
    up = [x.astype(mx.float32), f.astype(mx.float32)]
    want = list(mx.vjp(reference.mhc_pre, [up[0], hp], [g_pre.astype(mx.float32)])[1])
    want += list(mx.vjp(reference.mhc_post, [up[0], up[1], hq, hr], [g_post.astype(mx.float32)])[1])
    tol = GRAD_TOL if dtype == mx.float32 else TOL[dtype]
    assert max(grad_errors(got, want)) <= tol


@SETTINGS
@given(n=st.sampled_from([1, 2, 3, 4, 6, 8]), C=st.integers(1, 600), T=st.integers(1, 4),
       inline=st.booleans(), dtype=DTYPES)
def test_static_layer_on_drawn_shapes(n, C, T, inline, dtype):
    x = mx.random.normal((T, n, C)).astype(dtype)
    pre, post = mx.random.normal((n,)), mx.random.normal((n,))
    res, w = 2 * mx.random.normal((n, n)), mx.random.uniform(0.5, 1.5, (C,))
    got = layer.mhc_layer(x, pre, post, res, w, 20, 1e-5, inline=inline)
    assert rel(got, ref64.layer(np64(x), np64(pre), np64(post), np64(res), np64(w), 20, 1e-5)) <= TOL[dtype]
    # the backward (the one-pass kernel) on x, H_post_raw, H_res_raw and rms_weight: dH_pre_raw is
    # ~0 at n = 1 and cancels heavily in 16 bits, so test_kernels_emulated.py checks it apart
    g = mx.random.normal((T, n, C)).astype(dtype)
    primals = [x, pre, post, res, w]
    got = mx.vjp(lambda *a: layer.mhc_layer(*a, 20, 1e-5, inline=inline), primals, [g])[1]
    up = [x.astype(mx.float32), pre, post, res, w]
    want = mx.vjp(lambda *a: reference.mhc_layer(*a, 20, 1e-5), up, [g.astype(mx.float32)])[1]
    errs = grad_errors(got, want)
    del errs[1]
    if dtype == mx.float32:
        # x and rms_weight against the float32 reference; H_post_raw and H_res_raw against float64
        # (central differences), since the float32 reference's own error on them nears GRAD_TOL
        # (n = 2: up to 1.1e-5 of float64 in a one-off sweep of 300 draws, where the kernel's was
        # at most 2.8e-6; that sweep is not kept)
        truth = ref64.layer_logit_grads(np64(x), np64(pre), np64(post), np64(res), np64(w), np64(g), 20, 1e-5)
        scale = 0.01 * largest(want)
        errs[1:3] = [grad_rel(got[k], mx.array(truth[k - 1].astype(np.float32)), scale) for k in (2, 3)]
        assert max(errs) <= GRAD_TOL
    else:
        # 16 bits: up to twice the error of the reference run in that dtype (the rounding of f to
        # 16 bits before it is mixed is in both), as gpu_check.py allows
        own = grad_errors(mx.vjp(lambda *a: reference.mhc_layer(*a, 20, 1e-5), primals, [g])[1], want)
        del own[1]
        for e, o in zip(errs, own):
            assert e <= ref64.rounding_bound(TOL[dtype], o)


@SETTINGS
@given(n=st.sampled_from([1, 2, 3, 4, 8]), C=st.integers(1, 70), T=st.integers(1, 40),
       form=st.sampled_from(["kernel", "mma"]), mma_vjp=st.booleans(), dtype=DTYPES)
def test_dynamic_coefficients_on_drawn_shapes(monkeypatch, n, C, T, form, mma_vjp, dtype):
    # form: the forward's (fused kernel or tensor cores); mma_vjp: the candidate tensor-core
    # backward (coefficients.MMA_VJP; taken for 16-bit x and n <= 4)
    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(coefficients, "MMA_MIN_ELEMENTS", 0)
    monkeypatch.setattr(coefficients, "DYNAMIC_FORM", form)
    monkeypatch.setattr(coefficients, "MMA_VJP", mma_vjp)
    W = n * (n + 2)
    x = mx.random.normal((T, n, C)).astype(dtype)
    phi = mx.random.normal((n * C, W)) / np.sqrt(n * C)
    alpha, bias = mx.random.uniform(0.2, 1.5, (3,)), mx.random.normal((W,))
    got = coefficients.mhc_coefficients(x, phi, alpha, bias, 20, 1e-6)
    want = ref64.coefficients(np64(x), np64(phi), np64(alpha), np64(bias), 20, 1e-6)
    for g, w in zip(got, want):
        assert rel(g, w) <= 1e-5
    cots = [mx.random.normal(o.shape) for o in got]
    primals = [x, phi, alpha, bias]
    got = mx.vjp(lambda *a: coefficients.mhc_coefficients(*a, 20, 1e-6), primals, cots)[1]
    up = [x.astype(mx.float32), phi, alpha, bias]
    want = mx.vjp(lambda *a: reference.mhc_coefficients(*a, 20, 1e-6), up, cots)[1]
    errs = grad_errors(got, want)
    if n * C == 1:
        # one channel in all: m = x phi / rms(x) does not depend on |x| (up to eps), so x's
        # gradient is ~0 and both sides hold cancellation noise (the compiled path too: up to
        # 4.4e-5 of 1 % of the largest gradient over 300 drawn cases); a wrong formula errs by
        # about the largest gradient
        top = max(float(np.linalg.norm(np64(w))) for w in want)
        assert float(np.linalg.norm(np64(got[0]) - np64(want[0]))) <= 1e-3 * top
    else:
        assert errs[0] <= (GRAD_TOL if dtype == mx.float32 else TOL[dtype])  # x's, in x's dtype
    assert max(errs[1:]) <= GRAD_TOL  # phi, alpha, bias: float32 whatever x's dtype


@SETTINGS
@given(n=st.sampled_from([1, 2, 3, 4, 8]), C=st.integers(1, 64), T=st.integers(1, 20), dtype=DTYPES)
def test_dynamic_site_with_every_candidate_on(monkeypatch, n, C, T, dtype):
    # What `mhc-mlx bench --candidates` runs (kernels.use_candidates): a HyperConnection's
    # forward and backward through the dispatcher on the (emulated) CUDA kernels, the tensor-core
    # forward forced at every size, against the reference backend's autodiff
    from mhc_mlx import dispatch, kernels

    as_cuda(monkeypatch)
    monkeypatch.setattr(coefficients, "MMA_MIN_ELEMENTS", 0)
    monkeypatch.setattr(coefficients_mma, "hopper", lambda: True)  # the emulated GPU is an sm_90
    kernels.use_candidates(True)
    try:
        hc, names, params = random_dynamic_site(C, n)
        x = mx.random.normal((T, n, C)).astype(dtype)
        cot = mx.random.normal((T, n, C)).astype(dtype)
        w = mx.random.normal((C,))

        def site_fn(x_, *ps):
            hc.update(dict(zip(names, ps)))
            return hc(x_, lambda h: (h.astype(mx.float32) * w).astype(h.dtype))

        emu.launched.clear()
        out, got = mx.vjp(site_fn, [x, *params], [cot])
        # "mhc_pre_vjp_h": pre's backward without its dx (site.PRE_VJP at DX = false)
        launched = {name + ("_h" if t.get("DX") is False else "") for name, t, *_ in emu.launched}
        assert "mhc_pre_vjp_h" in launched  # the fused read step ran
        # n <= 4: the backward's glue kernel after the res logits' Sinkhorn backward, split off
        # (SPLIT_GLUE_SINKHORN) as its Jacobian's transpose (SINKHORN_JACOBIAN); with the
        # tensor-core backward its form that writes gs's fragments (GLUE_PACKS): no pack_a, and
        # where DPHI_WG takes dphi (bfloat16 x, n = 4) its fragments in that kernel's order: no
        # pack of gs at all
        tensor_cores = n <= 4 and dtype != mx.float32
        dphi_wg = n == 4 and dtype == mx.bfloat16
        assert ("mhc_coefficients_dynamic_sinkhorn_jacobian" in launched) == (n <= 4)
        assert ("mhc_coefficients_dynamic_vjp_sinkhorn_apply" in launched) == (n <= 4)
        assert "mhc_coefficients_dynamic_vjp_sinkhorn" not in launched
        assert ("mhc_coefficients_dynamic_vjp_glue_after" in launched) == (n <= 4 and not tensor_cores)
        assert ("mhc_coefficients_dynamic_vjp_glue_after_packs" in launched) == (tensor_cores and not dphi_wg)
        assert ("mhc_coefficients_dynamic_vjp_glue_after_packs_wg" in launched) == dphi_wg
        assert ("mhc_coefficients_dynamic_vjp_dphi_wg" in launched) == dphi_wg
        assert "mhc_pack_a_fragments" not in launched
        assert not [t for name, t, *_ in emu.launched if name == "mhc_pack_wg_fragments" and not t["PERM"]]
        assert ("mhc_sinkhorn_vjp" in launched) == (n > 4)
        assert ("mhc_coefficients_dynamic_vjp_dx_mma" in launched) == (n <= 4 and dtype != mx.float32)
        # the tensor-core forward's partials: by warpgroup MMA (WGMMA) for bfloat16 x at n = 4
        wg = n == 4 and dtype == mx.bfloat16
        assert ("mhc_coefficients_dynamic_mma_wg" in launched) == wg
        assert ("mhc_coefficients_dynamic_mma" in launched) == (dtype != mx.float32 and not wg)
        # the chained x cotangent: post's comes back to the read step, whose backward kernel adds
        # it (the FP32 kernel's accumulating form, or the tensor-core DX kernel's ACC)
        assert ("mhc_coefficients_dynamic_vjp_pre_acc" in launched) == (not tensor_cores)
        dx_mma = [t for name, t, *_ in emu.launched if name == "mhc_coefficients_dynamic_vjp_dx_mma"]
        assert all(t["ACC"] and t["PRE"] for t in dx_mma) and bool(dx_mma) == tensor_cores
        with dispatch.use_backend("reference"):
            want_out = site_fn(x.astype(mx.float32), *params)
            want = mx.vjp(site_fn, [x.astype(mx.float32), *params], [cot.astype(mx.float32)])[1]
            own = mx.vjp(site_fn, [x, *params], [cot])[1]
    finally:
        kernels.use_candidates(False)
    # each output element is a sum of n + 1 terms of x's size; where they cancel, float32
    # rounding (of either side) is relative to the terms, not to the sum (seen: n = C = T = 1,
    # an output of -0.0043 from terms of ~1, off by 1.4e-5 of itself), so the error is measured
    # against a tenth of x's norm where that is larger; a wrong coefficient errs by about x
    assert rel(out[0], want_out, floor=0.1 * np.linalg.norm(np64(x))) <= TOL[dtype]
    errs, own_errs = grad_errors(got, want), grad_errors(own, want)
    for e, o in zip(errs, own_errs):
        assert e <= (GRAD_TOL if dtype == mx.float32 else ref64.rounding_bound(TOL[dtype], o))


@pytest.mark.parametrize("C,T", [(40, 37), (64, 20), (33, 5)])
def test_dynamic_site_with_warpgroup_mma_products(monkeypatch, C, T):
    # The warpgroup-MMA products (coefficients_mma.WGMMA, coefficients_mma_vjp.DPHI_WGMMA;
    # bfloat16 x, n = 4, an sm_90 GPU): a HyperConnection's forward and backward through the
    # dispatcher on the (emulated) CUDA kernels with the tensor-core forward and backward forced,
    # against the reference backend's autodiff, and equal to the mma.sync products' result
    from mhc_mlx import dispatch

    n, dtype = 4, mx.bfloat16
    as_cuda(monkeypatch)
    monkeypatch.setattr(coefficients, "MMA_MIN_ELEMENTS", 0)
    monkeypatch.setattr(coefficients, "MMA_VJP", True)
    monkeypatch.setattr(coefficients_mma, "hopper", lambda: True)  # the emulated GPU is an sm_90
    hc, names, params = random_dynamic_site(C, n)
    x = mx.random.normal((T, n, C)).astype(dtype)
    cot = mx.random.normal((T, n, C)).astype(dtype)

    def site_fn(x_, *ps):
        hc.update(dict(zip(names, ps)))
        return hc(x_, lambda h: h)

    runs = {}
    for on in (False, True):
        monkeypatch.setattr(coefficients_mma, "WGMMA", on)
        monkeypatch.setattr(coefficients_mma_vjp, "DPHI_WGMMA", on)
        emu.launched.clear()
        runs[on] = mx.vjp(site_fn, [x, *params], [cot])
        launched = {name for name, *_ in emu.launched}
        assert ("mhc_coefficients_dynamic_mma_wg" in launched) == on
        assert ("mhc_coefficients_dynamic_vjp_dphi_wg" in launched) == on
    with dispatch.use_backend("reference"):
        want_out = site_fn(x.astype(mx.float32), *params)
        want = mx.vjp(site_fn, [x.astype(mx.float32), *params], [cot.astype(mx.float32)])[1]
        own = mx.vjp(site_fn, [x, *params], [cot])[1]
    out, got = runs[True]
    assert rel(out[0], want_out, floor=0.1 * np.linalg.norm(np64(x))) <= TOL[dtype]
    for e, o in zip(grad_errors(got, want), grad_errors(own, want)):
        assert e <= ref64.rounding_bound(TOL[dtype], o)
    # phi's gradient (float32) from the warpgroup dphi against DPHI's: float32 rounding
    # of the same sums (the token splits can differ, so not always the same bits)
    assert rel(got[1], np64(runs[False][1][1])) <= 1e-5

