"""kernels/one_pass_vjp.py (a CUDA candidate, kernels.ONE_PASS_VJP) on the CPU emulator: its two
forms (the partials, the glue a threadgroup a tile, then dx by the FP32 DX or the tensor-core DX
adding both shares) against the kernels they would replace, composed: pre's deferred backward
(site.PRE_VJP_RES), the glue (the Sinkhorn Jacobian's transpose, then the activations' backward)
and DX's dx = share + gs phi^T - x c2, and against the reference's float64 autodiff."""

import mlx.core as mx
import numpy as np
import pytest

import cpu_emulator as emu
from mhc_mlx import reference
from mhc_mlx.kernels import build, coefficients, coefficients_mma_vjp, one_pass_vjp, site
from kernel_compare import SITE_USES, one_pass_composed, one_pass_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    for module in (build, coefficients, coefficients_mma_vjp, site, one_pass_vjp):
        monkeypatch.setattr(module, "launch", emu.launch)
    emu.use_flavour("cuda")
    emu.launched.clear()
    yield


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("n,T,C,tt,cs", [(4, 20, 128, 16, 64), (4, 16, 64, 16, 64), (2, 33, 192, 16, 64), (1, 5, 64, 16, 64),
                                         (3, 17, 128, 16, 64), (4, 20, 128, 8, 64), (2, 33, 192, 8, 64),
                                         (4, 20, 128, 4, 64), (3, 17, 128, 4, 64), (2, 33, 256, 4, 128),
                                         (1, 5, 128, 8, 128)])
@pytest.mark.parametrize("form", ["split", "mma"])
def test_forms_equal_the_kernels_they_replace(monkeypatch, dtype, n, T, C, tt, cs, form):
    # T = 20, 33, 17, 5: a partial last tile (its tokens past T neither read nor written); C = 64 to
    # 256: one to six slices per tile; the launch shapes a GPU run may tune (TT tokens a tile,
    # CS channels a slice, 4 or 8 a thread; 16 TT threads a group); dx by the FP32 DX (split) or
    # the tensor-core DX (mma)
    monkeypatch.setattr(one_pass_vjp, "TT", tt)
    monkeypatch.setattr(one_pass_vjp, "CS", cs)
    monkeypatch.setattr(one_pass_vjp, "FORM", form)
    a = one_pass_inputs(T, n, C, dtype)
    dx_want, gs_want, c2_want, gb_want, ga_want = one_pass_composed(a, n, C)
    emu.launched.clear()
    dx, gs, c2, g_bias, g_alpha = one_pass_vjp.one_pass_vjp(**a)
    want_launches = ["mhc_one_pass_partials", "mhc_one_pass_glue",
                     "mhc_coefficients_dynamic_vjp_dx_mma" if form == "mma" else "mhc_one_pass_dx"]
    # (the tensor-core DX's fragment packing launches between them are not this test's)
    assert [name for name, *_ in emu.launched if "pack" not in name] == want_launches
    assert dx.shape == a["x"].shape and dx.dtype == dtype
    for got, want in ((gs, gs_want), (c2, c2_want), (g_bias, gb_want), (g_alpha, ga_want)):
        got, want = np.array(got, dtype=np.float64), np.array(want, dtype=np.float64)
        assert np.isfinite(got).all()
        assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, np.max(np.abs(want)))
    got, want = np.array(dx.astype(mx.float32), dtype=np.float64), np.array(dx_want, dtype=np.float64)
    assert np.isfinite(got).all()  # every element written (the emulator's outputs start as NaN)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-2


@pytest.mark.parametrize("n,T,C", [(4, 40, 256), (2, 33, 512)])
@pytest.mark.parametrize("partial_cs,dx_blocks", [(128, 1), (128, 5), (256, 0), (512, 3), (96, 2)])
def test_split_launch_shapes(monkeypatch, n, T, C, partial_cs, dx_blocks):
    # the split's tuning: PARTIALS over wider slices than DX's (PARTIAL_CS; 96 is no multiple of
    # 64 and 512 does not divide C = 256: both fall back to CS), DX in few threadgroups that each
    # loop over tiles (DX_BLOCKS 1: one a slice, every tile in turn; 5: tiles 0, 2, ... and 1, 3,
    # ... of each slice, the last tile partial); the results as the kernels it replaces
    monkeypatch.setattr(one_pass_vjp, "FORM", "split")
    monkeypatch.setattr(one_pass_vjp, "PARTIAL_CS", partial_cs)
    monkeypatch.setattr(one_pass_vjp, "DX_BLOCKS", dx_blocks)
    a = one_pass_inputs(T, n, C, mx.bfloat16)
    want = one_pass_composed(a, n, C)
    emu.launched.clear()
    got = one_pass_vjp.one_pass_vjp(**a)
    sp = C // (partial_cs if partial_cs % 64 == 0 and C % partial_cs == 0 else one_pass_vjp.CS)
    tiles = -(-T // one_pass_vjp.TT)
    groups = tiles if dx_blocks == 0 else min(tiles, -(-dx_blocks // (C // one_pass_vjp.CS)))
    threads = 16 * one_pass_vjp.TT
    assert [(name, grid) for name, _, grid, _ in emu.launched] == [
        ("mhc_one_pass_partials", tiles * sp * threads), ("mhc_one_pass_glue", tiles * threads),
        ("mhc_one_pass_dx", groups * (C // one_pass_vjp.CS) * threads)]
    for g, w, tol in zip(got, want, (1e-2, 1e-5, 1e-5, 1e-5, 1e-5)):
        g, w = np.array(g.astype(mx.float32), dtype=np.float64), np.array(w, dtype=np.float64)
        assert np.isfinite(g).all()
        assert np.max(np.abs(g - w)) <= tol * max(1.0, np.max(np.abs(w)))


@pytest.mark.parametrize("form", ["split", "mma"])
def test_split_form_gives_the_reference_gradients(monkeypatch, form):
    # end to end against the reference site's float32 autodiff: L = <post(x, f, H_post, H_res), g>
    # + <pre(x, H_pre), dh> with the sublayer's output f held fixed (its backward is the caller's:
    # dh stands for it), so H_post's cotangent is post's backward's sum_c g_i f_c; the kernel's dx
    # and, through gs, phi's, alpha's and bias's cotangents must be the reference's
    n, C, T, iters = 4, 128, 20, 20
    a = one_pass_inputs(T, n, C, mx.float16, iters)
    g32, dh32 = a["g"].astype(mx.float32), a["dh"].astype(mx.float32)
    x32 = a["x"].astype(mx.float32)
    f = mx.random.normal((T, C))

    def loss(x, phi, alpha, bias):
        H_pre, H_post, H_res = reference.mhc_coefficients(x, phi, alpha, bias, iters, 1e-6)
        out = reference.mhc_post(x, f, H_post, H_res)
        return (out * g32).sum() + (reference.mhc_pre(x, H_pre) * dh32).sum()

    want = mx.grad(loss, argnums=(0, 1, 2, 3))(x32, a["phi"], a["alpha"], a["bias"])
    a["dH_post"] = (g32 * f[:, None, :]).sum(axis=-1)
    monkeypatch.setattr(one_pass_vjp, "FORM", form)
    dx, gs, c2, g_bias, g_alpha = one_pass_vjp.one_pass_vjp(**a)
    g_phi = x32.reshape(T, n * C).T @ gs
    for got, ref, tol in ((dx.astype(mx.float32), want[0], 1e-2), (g_phi, want[1], 1e-3),
                          (g_alpha, want[2], 1e-3), (g_bias, want[3], 1e-3)):
        got, ref = np.array(got, dtype=np.float64), np.array(ref, dtype=np.float64)
        assert got.shape == ref.shape
        assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) <= tol


def test_refuses_an_unknown_form(monkeypatch):
    monkeypatch.setattr(one_pass_vjp, "FORM", "spin")
    with pytest.raises(ValueError, match="FORM must be one of"):
        one_pass_vjp.one_pass_vjp(**one_pass_inputs(16, 4, 64, mx.bfloat16))


def test_refuses_launch_shapes_beyond_static_shared_memory(monkeypatch):
    # phi's rows of a slice sit in static shared memory (48 KB at most): CS = 128 at n = 4 needs
    # 48 KB for them alone
    monkeypatch.setattr(one_pass_vjp, "CS", 128)
    monkeypatch.setattr(one_pass_vjp, "FORM", "split")
    a = one_pass_inputs(16, 4, 128, mx.bfloat16)
    with pytest.raises(ValueError, match="shared memory"):
        one_pass_vjp.one_pass_vjp(**a)
    assert one_pass_vjp.shared_bytes(4, 16, 64) <= 48 * 1024 < one_pass_vjp.shared_bytes(4, 8, 128)


def test_refuses_what_it_does_not_cover():
    with pytest.raises(ValueError, match="n <= 4 and C a multiple of 64"):
        one_pass_vjp.one_pass_vjp(*([mx.zeros((2, 4, 100), mx.bfloat16)] + [None] * 12))
    assert not one_pass_vjp.applies(mx.zeros((2, 8, 128), mx.bfloat16))
    assert not one_pass_vjp.applies(mx.zeros((2, 4, 128)))
    assert one_pass_vjp.applies(mx.zeros((2, 4, 128), mx.float16))


@pytest.mark.parametrize("use", SITE_USES)
@pytest.mark.parametrize("T,C,form", [(5, 64, "split"), (20, 128, "split"), (5, 64, "mma"), (20, 128, "mma")])
def test_hyper_connection_with_the_one_pass_backward(monkeypatch, use, T, C, form):
    # kernels.ONE_PASS_VJP (candidate) through a HyperConnection on the emulated CUDA kernels, in
    # both forms: the read as one custom function whose backward is the partials, the glue and
    # dx; gradients as the reference backend's autodiff however post and the coefficients are
    # used (as the chained forms' test: post on x' once or twice, pre's output alone, post on
    # another array, the caller using H_res too)
    import mhc_mlx as mhc
    from mhc_mlx import kernels
    from mhc_mlx.kernels import coefficients_mma, coefficients_mma_vjp

    from kernel_compare import as_cuda, assert_site_matches_reference, site_use

    for module in (coefficients_mma, coefficients_mma_vjp):
        monkeypatch.setattr(module, "launch", emu.launch)
    as_cuda(monkeypatch)
    monkeypatch.setattr(kernels, "CHAIN_X_COTANGENT", True)
    monkeypatch.setattr(kernels, "ONE_PASS_VJP", True)
    monkeypatch.setattr(coefficients, "MMA_VJP", True)
    monkeypatch.setattr(one_pass_vjp, "FORM", form)
    n, dtype = 4, mx.bfloat16
    hc = mhc.HyperConnection(C, n, init="paper")
    W = n * (n + 2)
    hc.phi = mx.random.normal((n * C, W)) / np.sqrt(n * C)
    hc.alpha, hc.bias = mx.random.uniform(0.2, 1.5, (3,)), mx.random.normal((W,))
    names = ["phi", "alpha", "bias"]
    params = [getattr(hc, k) for k in names]
    x, cot, w = mx.random.normal((T, n, C)).astype(dtype), mx.random.normal((T, n, C)).astype(dtype), mx.random.normal((C,))

    site_fn = site_use(hc, names, use, w)

    emu.launched.clear()
    out, got = mx.vjp(site_fn, [x, *params], [cot])
    launched = [name for name, *_ in emu.launched]
    one_pass = "mhc_coefficients_dynamic_vjp_dx_mma" if form == "mma" else "mhc_one_pass_dx"
    assert {one_pass, "mhc_one_pass_partials", "mhc_one_pass_glue"} <= set(launched), launched
    assert "mhc_pre_vjp_res" not in launched, launched
    assert_site_matches_reference(site_fn, x, params, names, cot, out, got, 2e-2, 2e-2)


def test_the_split_breakdown_experiment_runs(monkeypatch, capsys):
    # gpu_experiments.py one-pass-split, small, on the emulator: every launch timed alone and every
    # whole form runs (each evaluated once in place of the timing's repeats)
    import os
    import sys

    from mhc_mlx.kernels import coefficients_mma, coefficients_mma_vjp

    for module in (coefficients_mma, coefficients_mma_vjp):
        monkeypatch.setattr(module, "launch", emu.launch)
    scripts = os.path.join(os.path.dirname(__file__), "..", "..", "scripts")
    sys.path.insert(0, scripts)
    try:
        import gpu_experiments
    finally:
        sys.path.remove(scripts)
    monkeypatch.setattr(gpu_experiments, "tput", lambda fn, sets, reps=10: (mx.eval([fn(*a) for a in sets]), 1.0)[1])
    gpu_experiments.one_pass_split(rounds=1, T=32, n=4, C=256)
    out = capsys.readouterr().out
    for form in ("PARTIALS 64", "PARTIALS 128", "GLUE", "DX 1056 blocks", "DX mma (PRE, RES)", "today: pre bwd",
                 "today: DX (ACC)", "split, 128 / 1056", "mma, 64", "mma, 128", "today, three steps"):
        assert f"bf16, {form}" in out, out
