"""Every kernel's own source, run on the CPU by the emulator (cpu_emulator.py), against the
float64 reference (forward) and the reference path's autodiff (backward).

The kernel wrappers are called on concrete arrays with `launch` replaced by the emulator, so
the numbers checked are those of the kernel text MLX compiles for CUDA: indexing, guards,
reductions, synchronisation. Outputs start as NaN, so an element a kernel forgets to write
fails; buffers sit between NaN guard regions, so out-of-bounds reads poison the outputs and
out-of-bounds writes (or writes into inputs) raise. Shapes are small (each GPU thread is a fiber here); the GPU sweep is gpu_check.py.
"""

import inspect

import mlx.core as mx
import numpy as np
import pytest

import cpu_emulator as emu
import kernels_ref64 as ref64
from kernel_compare import (SITE_USES, as_cuda, assert_site_matches_reference, grad_rel, largest, np64,
                            random_dynamic_site, rel, site_use)
from mhc_mlx.compiled.sinkhorn import sinkhorn_knopp as compiled_sinkhorn
from mhc_mlx import reference
from mhc_mlx.kernels import build, coefficients, coefficients_mma, coefficients_mma_vjp, layer, pre_step, sinkhorn, site

pytestmark = pytest.mark.slow
TOL = {mx.float32: 1e-5, mx.bfloat16: 2e-2, mx.float16: 2e-2}
GRAD_TOL = 2e-5  # kernel backward vs the reference's float32 autodiff (both float32 math)
DTYPES = (mx.float32, mx.bfloat16, mx.float16)


# Each kernel body compiled against the CUDA macro layer and against prelude.METAL_MACROS
# (with CPU stand-ins for Metal's built-ins): the two builds of one text.
FLAVOURS = ("cuda", "metal")


@pytest.fixture(autouse=True)
def emulated(monkeypatch, request):
    for module in (build, coefficients, coefficients_mma, coefficients_mma_vjp, layer, sinkhorn, site):
        monkeypatch.setattr(module, "launch", emu.launch)
    emu.launched.clear()
    name = request.node.callspec.params.get("flavour", "cuda") if hasattr(request.node, "callspec") else "cuda"
    emu.use_flavour("cuda" if name.startswith("cuda") else name)  # "cuda-...": a CUDA-only variant
    yield
    emu.use_flavour("cuda")


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 32])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sinkhorn_forward_and_backward(flavour, n):
    L = 2 * mx.random.normal((3, n, n))
    assert rel(sinkhorn.project(L, 20), ref64.sinkhorn(np64(L), 20)) <= 1e-5
    g = mx.random.normal((3, n, n))
    want = mx.vjp(lambda a: reference.sinkhorn_knopp(a, 20), [L], [g])[1][0]
    if n * 20 <= sinkhorn.MAX_BACKWARD_WORK:
        assert grad_rel(sinkhorn.project_vjp(L, g, 20), want) <= GRAD_TOL


@pytest.mark.parametrize("n,iters,M", [(1, 20, 3), (2, 40, 33), (3, 20, 5), (4, 20, 70), (4, 1, 2)])
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("jacobian", [False, True])
def test_sinkhorn_thread_backward(monkeypatch, flavour, n, iters, M, jacobian):
    # one thread per matrix (M not a multiple of the group: the tail threads return early); with
    # sinkhorn.JACOBIAN_VJP (the default) n^2 lanes per matrix instead (the tail likewise)
    monkeypatch.setattr(sinkhorn, "THREAD_VJP_MAX_WORK", sinkhorn.THREAD_VJP_DEFAULT_WORK)
    monkeypatch.setattr(sinkhorn, "JACOBIAN_VJP", jacobian)
    L = 2 * mx.random.normal((M, n, n))
    g = mx.random.normal((M, n, n))
    got = sinkhorn.project_vjp(L, g, iters)
    assert [name for name, *_ in emu.launched] == ["mhc_sinkhorn_vjp_jacobian" if jacobian else "mhc_sinkhorn_vjp_thread"]
    want = mx.vjp(lambda a: reference.sinkhorn_knopp(a, iters), [L], [g])[1][0]
    assert grad_rel(got, want) <= GRAD_TOL


@pytest.mark.parametrize("iters", [20, 1])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sinkhorn_thread_backward_at_ties_and_underflow(monkeypatch, flavour, iters):
    # 0: the max shared by two entries (its share split between them); 1: a row 200 below the
    # rest (exp underflows: it stays 0 through every step); 2: logits spread by 1e4; 3, 4: a row,
    # a row and a column 75 below the rest: their mass stays under MHC_TINY, so the sum is
    # clamped (at 1 iteration in the last step, where the clamp's gradient and the argmax share
    # it leaves are visible; later steps renormalise them away).
    n = 4
    L = np.array(2 * mx.random.normal((5, n, n)), dtype=np.float32)
    L[0, 1, 2] = L[0, 3, 0] = L[0].max() + 1.0
    L[1, 2, :] -= 200.0
    L[2] *= 5e3
    L[3, 1, :] = L[3].max() - 75.0 + 0.1 * np.arange(n)
    L[4, 1, :] = L[4].max() - 75.0 + 0.1 * np.arange(n)
    L[4, :, 2] = L[4].max() - 75.0 - 0.1 * np.arange(n)
    L, g = mx.array(L), mx.random.normal((5, n, n))
    monkeypatch.setattr(sinkhorn, "THREAD_VJP_MAX_WORK", sinkhorn.THREAD_VJP_DEFAULT_WORK)
    monkeypatch.setattr(sinkhorn, "JACOBIAN_VJP", False)
    got = sinkhorn.project_vjp(L, g, iters)
    monkeypatch.setattr(sinkhorn, "JACOBIAN_VJP", True)
    jacobian = sinkhorn.project_vjp(L, g, iters)
    monkeypatch.setattr(sinkhorn, "JACOBIAN_VJP", False)
    monkeypatch.setattr(sinkhorn, "THREAD_VJP_MAX_WORK", 0)
    warp = sinkhorn.project_vjp(L, g, iters)
    assert [name for name, *_ in emu.launched] == ["mhc_sinkhorn_vjp_thread", "mhc_sinkhorn_vjp_jacobian",
                                                   "mhc_sinkhorn_vjp"]
    assert np.isfinite(np64(jacobian)).all() and grad_rel(jacobian, got) <= 1e-5  # the default form
    assert np.isfinite(np64(got)).all()
    for k in (0, 1):
        want = mx.vjp(lambda a: reference.sinkhorn_knopp(a, iters), [L[k]], [g[k]])[1][0]
        assert grad_rel(got[k], want) <= GRAD_TOL, k
    # the clamped ones against float64 central differences (the reference's float32 autodiff
    # loses them: its P-space products underflow, it gives the tiny row 0 and errs by ~100 %)
    for k in (3, 4):
        Lk, gk, fd = np64(L[k]), np64(g[k]), np.zeros((n, n))
        for idx in np.ndindex(n, n):
            up, down = Lk.copy(), Lk.copy()
            up[idx] += 1e-6
            down[idx] -= 1e-6
            fd[idx] = ((ref64.sinkhorn(up, iters) - ref64.sinkhorn(down, iters)) * gk).sum() / 2e-6
        assert rel(got[k], fd) <= 1e-4, k
    assert grad_rel(got, warp) <= GRAD_TOL


@pytest.mark.parametrize("n,M", [(9, 3), (16, 5), (32, 3), (32, 1)])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sinkhorn_transpose_reduce_forward(flavour, n, M):
    # the row sums by recursive halving (prelude.ktranspose_row_sum, n > 8): the Sinkhorn
    # forward and the static coefficients (one row: lanes past n and warps past M dead)
    L = 3 * mx.random.normal((M, n, n))
    assert rel(sinkhorn.project(L, 20), ref64.sinkhorn(np64(L), 20)) <= 1e-5
    h = mx.random.normal((M, n * (n + 2)))
    rp, rq, rr = h[:, :n], h[:, n : 2 * n], h[:, 2 * n :].reshape(M, n, n)
    H_pre, H_post, H_res = coefficients.activate(rp, rq, 2 * rr, 20)
    assert rel(H_res, ref64.sinkhorn(2 * np64(rr), 20)) <= 1e-5
    assert rel(H_pre, ref64.sigmoid(np64(rp))) <= 1e-5
    # a row 200 below the rest: its exp underflows in float32 (not in the float64 reference), so
    # it stays 0 with its sum clamped, as in the float32 compiled path
    U = np.array(L)
    U[0, 1, :] -= 200.0
    U = mx.array(U)
    got = sinkhorn.project(U, 20)
    assert emu.launched[-1][0] == "mhc_sinkhorn"
    assert np.all(np.array(got)[0, 1] == 0.0) and rel(got, compiled_sinkhorn(U, 20)) <= 1e-5


@pytest.mark.parametrize("n", [1, 4, 8])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_static_coefficients_forward_and_backward(flavour, n):
    W = n * (n + 2)
    h = mx.random.normal((2, W))
    rp, rq, rr = h[:, :n], h[:, n : 2 * n], h[:, 2 * n :].reshape(2, n, n)
    H_pre, H_post, H_res = coefficients.activate(rp, rq, rr, 20)
    assert rel(H_pre, ref64.sigmoid(np64(rp))) <= 1e-5
    assert rel(H_post, 2 * ref64.sigmoid(np64(rq))) <= 1e-5
    assert rel(H_res, ref64.sinkhorn(np64(rr), 20)) <= 1e-5
    gp, gq, gr = mx.random.normal((2, n)), mx.random.normal((2, n)), mx.random.normal((2, n, n))
    got = coefficients._activation_vjp(H_pre, H_post, rr, gp, gq, gr, 20)

    def ref_act(hh):
        return (mx.sigmoid(hh[:, :n]), 2 * mx.sigmoid(hh[:, n : 2 * n]),
                reference.sinkhorn_knopp(hh[:, 2 * n :].reshape(2, n, n), 20))

    want = mx.vjp(ref_act, [h], [gp, gq, gr])[1][0]
    assert grad_rel(got, want) <= GRAD_TOL


@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_static_coefficients_take_unbatched_logits(flavour, n):
    # the static layer hands its raw logits [n], [n], [n, n] to the kernel as they are: one row
    rp, rq, rr = mx.random.normal((n,)), mx.random.normal((n,)), 2 * mx.random.normal((n, n))
    got = coefficients.activate(rp, rq, rr, 20)
    assert [tuple(g.shape) for g in got] == [(1, n), (1, n), (1, n, n)]
    assert rel(got[0][0], ref64.sigmoid(np64(rp))) <= 1e-5
    assert rel(got[1][0], 2 * ref64.sigmoid(np64(rq))) <= 1e-5
    assert rel(got[2], ref64.sinkhorn(np64(rr)[None], 20)) <= 1e-5


def _dynamic_inputs(T, n, C, dtype):
    W = n * (n + 2)
    x = mx.random.normal((T, n, C)).astype(dtype)
    phi = mx.random.normal((n * C, W)) / np.sqrt(n * C)
    return x, phi, mx.random.uniform(0.2, 1.5, (3,)), mx.random.normal((W,))


# "mma-ku1", "mma-ku4": the tensor-core form with 1 or 4 x loads per row and lane in a step
# (coefficients_mma.X_UNROLL; "mma" runs the default, 2)
# "mma-finish8": 8 tokens per finishing block (coefficients_mma.FINISH_TOKENS, a template value)
# "mma-wg": the partials by warpgroup MMA (coefficients_mma.WGMMA, the default on Hopper; bfloat16 x, n = 4;
# the other cases take the MMA kernel)
FORMS = [("kernel", 16), ("kernel", 8), ("gemm", None), ("mma", None), ("mma-ku1", None), ("mma-ku4", None),
         ("mma-finish8", None), ("mma-wg", None)]
FORM_IDS = ["kernel-tb16", "kernel-tb8", "gemm", "mma", "mma-ku1", "mma-ku4", "mma-finish8", "mma-wg"]
# the tensor-core kernel is CUDA only (never dispatched on Metal)
FLAVOURED_FORMS = [pytest.param(fl, form, tb, id=f"{fl}-{fid}") for fl in FLAVOURS
                   for (form, tb), fid in zip(FORMS, FORM_IDS) if not (fl == "metal" and form.startswith("mma"))]


@pytest.mark.parametrize("flavour,form,tb", FLAVOURED_FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
# T = 70: three of the finishing kernel's 32-token blocks, the last one partial; n*C = 800: the
# tensor-core form splits K seven ways (the finish's sums over splits: four at a time, then the rest)
@pytest.mark.parametrize("n,C,T", [(4, 40, 19), (2, 33, 5), (8, 16, 9), (4, 24, 70), (4, 200, 37)])
def test_dynamic_coefficients_forward(monkeypatch, flavour, form, tb, dtype, n, C, T):
    monkeypatch.setattr(coefficients, "SMALL_TOKENS", 0)  # the tiled kernel at every T here
    if form.startswith("mma-ku"):
        monkeypatch.setattr(coefficients_mma, "X_UNROLL", int(form[-1]))
        form = "mma"
    if form == "mma-finish8":
        monkeypatch.setattr(coefficients_mma, "FINISH_TOKENS", 8)
        form = "mma"
    wg = form == "mma-wg" and dtype == mx.bfloat16 and n == 4
    if form == "mma-wg":
        monkeypatch.setattr(coefficients_mma, "WGMMA", True)
        monkeypatch.setattr(coefficients_mma, "hopper", lambda: True)  # the emulated GPU is an sm_90
        form = "mma"
    if form == "mma":
        monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
        monkeypatch.setattr(coefficients, "MMA_MIN_ELEMENTS", 0)
    if tb:
        monkeypatch.setattr(coefficients, "TOKENS_PER_BLOCK_SMALL_N", tb)
    monkeypatch.setattr(coefficients, "DYNAMIC_FORM", form)
    x, phi, alpha, bias = _dynamic_inputs(T, n, C, dtype)
    H_pre, H_post, H_res, m, invr = coefficients.dynamic_coefficients_forward(x, phi, alpha, bias, n, 20, 1e-6)
    want = ref64.coefficients(np64(x), np64(phi), np64(alpha), np64(bias), 20, 1e-6)
    for got, w in zip((H_pre, H_post, H_res), want):
        assert rel(got, w) <= 1e-5  # coefficients are float32 whatever x's dtype
    # the saved logits the backward uses: m = (xf @ phi) / r and 1/r
    x64 = np64(x).reshape(T, n * C)
    invr64 = 1.0 / np.sqrt(np.mean(x64 ** 2, axis=-1) + 1e-6)
    assert rel(m, (x64 @ np64(phi)) * invr64[:, None]) <= 1e-5
    assert rel(invr, invr64) <= 1e-6
    names = {name for name, *_ in emu.launched}
    if dtype != mx.float32 and form == "mma":
        assert (coefficients_mma.MMA_WG.name in names) == wg
        assert ("mhc_coefficients_dynamic_mma" in names) == (not wg)
        mma_templates = [t for name, t, *_ in emu.launched if name == "mhc_coefficients_dynamic_mma"]
        assert all(t["KU"] == coefficients_mma.X_UNROLL for t in mma_templates)
        assert all(t["MT"] == coefficients_mma.token_tiles_per_warp(t["NT"]) for t in mma_templates)
        assert {t["TB"] for name, t, *_ in emu.launched
                if name == "mhc_coefficients_dynamic_finish"} == {coefficients_mma.FINISH_TOKENS}
    if form == "kernel" or dtype == mx.float32:
        assert "mhc_coefficients_dynamic" in names


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("tb", [16, 8])
@pytest.mark.parametrize("dtype", DTYPES)
# T = 37 with 8 or 16 tokens per block: several blocks, the last partial; odd C; n = 1 and 8
@pytest.mark.parametrize("n,C,T", [(4, 40, 37), (2, 33, 5), (8, 16, 9), (1, 7, 20), (3, 1, 17)])
def test_dynamic_coefficients_with_pre_in_one_launch(monkeypatch, flavour, tb, dtype, n, C, T):
    # coefficients.DYNAMIC_PRE (the read step's one-launch forward): the DYNAMIC kernel's five
    # outputs unchanged, and h[t, c] = sum_i H_pre[t, i] x[t, i, c] equal to pre's own kernel's
    monkeypatch.setattr(coefficients, "TOKENS_PER_BLOCK_SMALL_N", tb)
    monkeypatch.setattr(coefficients, "SMALL_TOKENS", 0)  # the tiled kernel at every T here
    x, phi, alpha, bias = _dynamic_inputs(T, n, C, dtype)
    x2 = x.reshape(T, n * C)
    emu.launched.clear()
    *five, h = coefficients.dynamic_read_forward(x2, phi, alpha, bias, n, 20, 1e-6)
    assert [name for name, *_ in emu.launched] == ["mhc_coefficients_dynamic_pre"]
    alone = coefficients.dynamic_forward(x2, phi, alpha, bias, n, 20, 1e-6, form="kernel")
    for got, want in zip(five, alone):
        assert np.array_equal(np64(got), np64(want))
    assert h.shape == (T, C) and h.dtype == dtype
    assert rel(h, ref64.pre(np64(x), np64(five[0]))) <= TOL[dtype]
    assert np.array_equal(np64(h), np64(site.pre_forward(x, five[0])))
    # the tensor-core and GEMM forms have no one-launch read step: the caller takes two launches
    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    # (float32 x takes the kernel form whatever the setting: TF32 would round it)
    for form in ("gemm", "mma"):
        one = coefficients.dynamic_read_forward(x2, phi, alpha, bias, n, 20, 1e-6, form=form)
        assert (one is None) == (dtype != mx.float32), form


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("dtype", DTYPES)
# odd C, C = 1, n = 1 and 8, K below, at and above the threadgroup's 256 rows (several rows a
# thread), one token and several
@pytest.mark.parametrize("n,C,T", [(4, 40, 3), (2, 33, 5), (8, 16, 2), (1, 7, 1), (3, 1, 4), (4, 64, 1), (4, 300, 2),
                                   (8, 100, 1)])
# split: DYNAMIC_SPLIT_PARTIAL + DYNAMIC_SPLIT_FINISH (coefficients.SPLIT_SMALL, the default;
# K = n * C over 256 rows takes several partial threadgroups); one: DYNAMIC_ONE (coefficients.
# ONE_LAUNCH_SMALL, where n <= ONE_MAX_N and K <= ONE_MAX_K, else the split form); small: one
# threadgroup of 256 threads per token
@pytest.mark.parametrize("form", ["split", "one", "small"])
def test_dynamic_coefficients_one_threadgroup_per_token(monkeypatch, flavour, dtype, n, C, T, form):
    # the few-token forms (up to SMALL_TOKENS tokens): the five outputs against float64 as the
    # tiled kernel's, the read step's h as pre's own kernel's
    monkeypatch.setattr(coefficients, "SMALL_TOKENS", 8)
    monkeypatch.setattr(coefficients, "SPLIT_SMALL", form != "small")
    monkeypatch.setattr(coefficients, "ONE_LAUNCH_SMALL", form == "one")
    one = form == "one" and n <= coefficients.ONE_MAX_N and n * C <= coefficients.ONE_MAX_K
    split = form != "small" and not one
    x, phi, alpha, bias = _dynamic_inputs(T, n, C, dtype)
    x2 = x.reshape(T, n * C)
    emu.launched.clear()
    five = coefficients.dynamic_forward(x2, phi, alpha, bias, n, 20, 1e-6, form="kernel")
    small = (["mhc_coefficients_one"] if one else
             ["mhc_coefficients_split_partial", "mhc_coefficients_split_finish"] if split
             else ["mhc_coefficients_dynamic_small"])
    assert [name for name, *_ in emu.launched] == small
    if one:
        tg = emu.launched[0][3]
        assert emu.launched[0][2] == T * tg and tg == coefficients.one_threads(n * C)
        assert emu.launched[0][1]["PRE"] is False
    if split:
        assert emu.launched[0][2] == T * -(-(n * C) // 256) * 256 and emu.launched[1][1]["PRE"] is False
    want = ref64.coefficients(np64(x), np64(phi), np64(alpha), np64(bias), 20, 1e-6)
    for got, w in zip(five[:3], want):
        assert rel(got.reshape(w.shape), w) <= 1e-5
    x64 = np64(x2)
    invr64 = 1.0 / np.sqrt(np.mean(x64 ** 2, axis=-1) + 1e-6)
    assert rel(five[3], (x64 @ np64(phi)) * invr64[:, None]) <= 1e-5
    assert rel(five[4], invr64) <= 1e-6
    emu.launched.clear()
    *again, h = coefficients.dynamic_read_forward(x2, phi, alpha, bias, n, 20, 1e-6)
    assert [name for name, *_ in emu.launched] == (small if split or one else ["mhc_coefficients_dynamic_small_pre"])
    for a, b in zip(again, five):
        assert np.array_equal(np64(a), np64(b))
    assert h.shape == (T, C) and h.dtype == dtype
    assert np.array_equal(np64(h), np64(site.pre_forward(x, five[0])))
    # above SMALL_TOKENS, or with a tokens-per-block asked for, the tiled kernel
    emu.launched.clear()
    coefficients.dynamic_forward(x2, phi, alpha, bias, n, 20, 1e-6, tb=8, form="kernel")
    monkeypatch.setattr(coefficients, "SMALL_TOKENS", T - 1)
    coefficients.dynamic_forward(x2, phi, alpha, bias, n, 20, 1e-6, form="kernel")
    assert [name for name, *_ in emu.launched] == ["mhc_coefficients_dynamic"] * 2


def small_launches(pre: bool, n: int = 4, K: int = 96) -> list[str]:
    """The few-token coefficient forward's launches under coefficients.ONE_LAUNCH_SMALL (where n
    and K = n C allow it) and SPLIT_SMALL."""
    if coefficients.one_launch_applies(n, K):
        return ["mhc_coefficients_one"]
    if coefficients.SPLIT_SMALL:
        return ["mhc_coefficients_split_partial", "mhc_coefficients_split_finish"]
    return ["mhc_coefficients_dynamic_small_pre" if pre else "mhc_coefficients_dynamic_small"]


def test_one_threadgroup_per_token_is_the_default_up_to_16_tokens():
    # the default since the H200 (2026-11-30): B = 1 and 16 tokens take one threadgroup per
    # token, 17 the tiled kernel
    assert coefficients.SMALL_TOKENS == 16
    launched = []
    for T in (1, 16, 17):
        x, phi, alpha, bias = _dynamic_inputs(T, 4, 24, mx.bfloat16)
        emu.launched.clear()
        coefficients.dynamic_forward(x.reshape(T, 96), phi, alpha, bias, 4, 20, 1e-6, form="kernel")
        launched += [name for name, *_ in emu.launched]
    assert launched == small_launches(False) * 2 + ["mhc_coefficients_dynamic"]


@pytest.mark.parametrize("ku", [1, 2, 4])
@pytest.mark.parametrize("K,W", [(32, 24), (96, 24), (40, 15), (7, 80), (1, 3), (300, 24)])
def test_pack_phi_kernel_equals_its_mlx_statement(K, W, ku):
    # bit for bit: the kernel's round-to-nearest-even parts and layout are pack_phi_reference's
    phi = mx.random.normal((K, W)) * mx.exp(4 * mx.random.normal((K, W)))
    got = coefficients_mma.pack_phi(phi, ku=ku)
    want = coefficients_mma.pack_phi_reference(phi, ku=ku)
    assert got.shape == want.shape and got.dtype == mx.bfloat16
    assert mx.array_equal(got.view(mx.uint16), want.view(mx.uint16)).item()


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
# T not a multiple of 16 and splits over tokens; K a multiple of 8 (16-byte loads) or not, and
# not a multiple of 64 (a partial k block); W = 3, 8, 15, 24 (n = 1..4)
@pytest.mark.parametrize("n,C,T", [(4, 40, 37), (1, 33, 5), (2, 64, 70), (3, 20, 16), (4, 24, 300)])
def test_tensor_core_coefficient_backward_products(dtype, n, C, T):
    # coefficients_mma_vjp: dx = gs phi^T - x c2 (+ H_pre (x) dh) and dphi = x^T gs
    W, K = n * (n + 2), n * C
    x = mx.random.normal((T, K)).astype(dtype)
    phi = mx.random.normal((K, W)) / np.sqrt(K)
    gs = mx.random.normal((T, W)) * mx.exp(mx.random.normal((T, 1)))
    c2 = mx.random.normal((T,))
    H_pre, dh = mx.random.uniform(shape=(T, n)), mx.random.normal((T, C)).astype(dtype)
    x64, phi64, gs64, c264 = np64(x), np64(phi), np64(gs), np64(c2)
    want_dx = gs64 @ phi64.T - x64 * c264[:, None]
    want_pre = want_dx + (np64(H_pre)[:, :, None] * np64(dh)[:, None, :]).reshape(T, K)
    got_dx, got_dphi = coefficients_mma_vjp.vjp_x_phi(x, phi, gs, c2)
    assert got_dx.dtype == dtype and got_dphi.dtype == mx.float32
    # dx in x's dtype: its rounding (bfloat16 3.9e-3, float16 4.9e-4 of each element) and
    # no more (the products carry ~16 significant bits)
    assert rel(got_dx, want_dx) <= (4e-3 if dtype == mx.bfloat16 else 6e-4)
    assert rel(got_dphi, x64.T @ gs64) <= 1e-5  # float32 accuracy
    got_pre = coefficients_mma_vjp.dx(x, phi, gs, c2, (H_pre, dh))
    assert rel(got_pre, want_pre) <= (4e-3 if dtype == mx.bfloat16 else 6e-4)
    # the accumulating form (the chained x cotangent): + gacc in the same pass, with pre or not;
    # gacc as [T, n, C], and as a strided view (copied to rows by MLX before the launch)
    gacc = mx.random.normal((T, n, C)).astype(dtype)
    for with_pre, want in ((False, want_dx), (True, want_pre)):
        for g in (gacc, mx.swapaxes(mx.swapaxes(gacc, 0, 1).astype(dtype), 0, 1)):
            got_acc = coefficients_mma_vjp.dx(x, phi, gs, c2, (H_pre, dh) if with_pre else None, g)
            assert rel(got_acc, want + np64(gacc).reshape(T, K)) <= (4e-3 if dtype == mx.bfloat16 else 6e-4)


@pytest.mark.parametrize("wg_tokens", [128, 64])
@pytest.mark.parametrize("T,C", [(21, 33), (130, 17), (5, 64), (129, 1)])
def test_wgmma_partials_at_odd_widths_and_token_counts(monkeypatch, T, C, wg_tokens):
    # MMA_WG where x is not 16-byte loadable (K = 4 C not a multiple of 8: the element loads),
    # K not a multiple of 64 (a partial chunk) and T not a multiple of its 128 tokens: the sums of
    # its partials against float64 and against the MMA kernel's (float32 rounding apart); at 64
    # tokens a block (WG_TOKENS, MW = 1) too
    monkeypatch.setattr(coefficients_mma, "hopper", lambda: True)  # the emulated GPU is an sm_90
    monkeypatch.setattr(coefficients_mma, "WG_TOKENS", wg_tokens)
    K = 4 * C
    x = mx.random.normal((T, K)).astype(mx.bfloat16)
    phi = mx.random.normal((K, 24)) / np.sqrt(K)
    sums = {}
    for on in (False, True):
        monkeypatch.setattr(coefficients_mma, "WGMMA", on)
        emu.launched.clear()
        part, ssq = coefficients_mma.partial_products(x, phi)
        assert any(name == coefficients_mma.MMA_WG.name for name, *_ in emu.launched) == on
        sums[on] = (mx.sum(part, axis=0)[:, :24], mx.sum(ssq, axis=0))
    x64 = np64(x)
    assert rel(sums[True][0], x64 @ np64(phi)) <= 1e-5
    assert rel(sums[True][1], np.sum(x64 ** 2, axis=1)) <= 1e-6
    assert rel(sums[True][0], np64(sums[False][0])) <= 1e-5


def test_wgmma_only_on_hopper(monkeypatch):
    # wgmma exists on compute capability 9.x only: elsewhere (Ampere, Blackwell, no GPU) the
    # candidate leaves the partials to the MMA kernel
    x = mx.zeros((4, 16), mx.bfloat16)
    asks_the_device = coefficients_mma.hopper.__wrapped__
    monkeypatch.setattr(coefficients_mma, "WGMMA", True)
    for hopper in (True, False):
        monkeypatch.setattr(coefficients_mma, "hopper", lambda h=hopper: h)
        assert coefficients_mma.wg_applies(x, 24) == hopper
    monkeypatch.setattr(coefficients_mma, "hopper", lambda: True)
    assert not coefficients_mma.wg_applies(x.astype(mx.float16), 24)  # bfloat16 x only
    assert not coefficients_mma.wg_applies(x, 15)  # n = 4 (24 columns) only
    # asking the device does not fail (a CPU-only MLX answers no)
    assert isinstance(asks_the_device(), bool)
    if not mx.metal.is_available() and not (getattr(mx, "cuda", None) and mx.cuda.is_available()):
        assert asks_the_device() is False


@pytest.mark.parametrize("T", [16, 37, 300, 5])
def test_pack_gs_wg_matches_its_statement(T):
    # PACK_WG in gs's order (one launch) against pack_gs_wg_reference (MLX ops): the same bits, zeros past T
    gs = mx.random.normal((T, 24)) * mx.exp(2 * mx.random.normal((T, 1)))
    got, want = coefficients_mma_vjp.pack_gs_wg(gs), coefficients_mma_vjp.pack_gs_wg_reference(gs)
    assert got.shape == want.shape == (-(-T // 16), coefficients_mma_vjp.DPHI_PARTS, 2, 3, 8, 8)
    assert np.array_equal(np.array(got.view(mx.uint16)), np.array(want.view(mx.uint16)))
    # element [step, part, half, group, column, token] is part of gs[16 step + 8 half + token, 8 group + column]
    g64 = np64(gs)
    summed = np.sum(np64(want), axis=1)  # the parts add up to gs
    for st, h, ng, n8, l8 in [(0, 0, 0, 0, 0), (0, 1, 2, 7, 3), (-(-T // 16) - 1, 0, 1, 2, 4)]:
        t = 16 * st + 8 * h + l8
        want_v = g64[t, 8 * ng + n8] if t < T else 0.0
        assert abs(summed[st, h, ng, n8, l8] - want_v) <= 1e-6 * max(1.0, abs(want_v))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
# T not a multiple of 16 and splits over tokens; K a multiple of 8 or not, not of 256 (a partial
# k group of the warpgroup), n = 4 (DPHI_WG's only width) and n = 2 (the DPHI kernel)
@pytest.mark.parametrize("n,C,T,blocks", [(4, 40, 37, 384), (4, 24, 300, 2), (4, 33, 70, 3), (2, 64, 20, 384)])
def test_dphi_by_warpgroup_mma(monkeypatch, dtype, n, C, T, blocks):
    # coefficients_mma_vjp.DPHI_WGMMA (the default on Hopper): x^T gs against float64 and, where it applies
    # (bfloat16 x, n = 4), equal to DPHI's bits (the same order of terms per accumulator)
    monkeypatch.setattr(coefficients_mma, "hopper", lambda: True)  # the emulated GPU is an sm_90
    monkeypatch.setattr(coefficients_mma_vjp, "DPHI_WG_TARGET_BLOCKS", blocks)
    W, K = n * (n + 2), n * C
    x = mx.random.normal((T, K)).astype(dtype)
    gs = mx.random.normal((T, W)) * mx.exp(mx.random.normal((T, 1)))
    got = {}
    for on in (False, True):
        monkeypatch.setattr(coefficients_mma_vjp, "DPHI_WGMMA", on)
        emu.launched.clear()
        got[on] = coefficients_mma_vjp.dphi(x, gs)
        names = {name for name, *_ in emu.launched}
        wg = on and dtype == mx.bfloat16 and n == 4
        assert (coefficients_mma_vjp.DPHI_WG.name in names) == wg
        assert (coefficients_mma_vjp.DPHI.name in names) == (not wg)
    assert rel(got[True], np64(x).T @ np64(gs)) <= 1e-5
    if dtype == mx.bfloat16 and n == 4:
        # a different split of the tokens sums in another order: equal bits only at equal splits
        kb, kg = -(-K // 64), -(-K // 256)
        same = (coefficients_mma_vjp._token_splits(T, kb, 16, coefficients_mma_vjp.TARGET_WARPS)
                == coefficients_mma_vjp._token_splits(T, kg, 16, blocks))
        if same:
            assert np.array_equal(np64(got[True]), np64(got[False]))


@pytest.mark.parametrize("K", [64, 800, 130, 8])
def test_pack_phi_wg_matches_its_statement(K):
    # PACK_WG (one launch) against pack_phi_wg_reference (MLX ops): the same bits, zeros past K
    phi = mx.random.normal((K, 24)) * mx.exp(2 * mx.random.normal((K, 1)))
    got, want = coefficients_mma.pack_phi_wg(phi), coefficients_mma.pack_phi_wg_reference(phi)
    assert got.shape == want.shape == (-(-K // 64), 4, coefficients_mma.PHI_PARTS, 2, 3, 8, 8)
    assert np.array_equal(np.array(got.view(mx.uint16)), np.array(want.view(mx.uint16)))
    # the parts add up to phi to float32's precision: the first part alone is phi to bfloat16's
    summed = mx.sum(want.astype(mx.float32), axis=2)
    assert rel(summed, np64(coefficients_mma.pack_phi_wg_reference(phi, 1)[:, :, 0])) < 1e-2
    # (magnitudes, in float64: a signed float32 total can cancel to far less than its terms)
    assert abs(np.sum(np.abs(np64(summed))) / np.sum(np.abs(np64(phi))) - 1) < 1e-5


def _dx_inputs(n: int, C: int, T: int, dtype):
    """DX's inputs for x [T, n*C]: x, phi, gs, c2, pre = (H_pre, dh) and gacc, random."""
    W, K = n * (n + 2), n * C
    x = mx.random.normal((T, K)).astype(dtype)
    phi = mx.random.normal((K, W)) / np.sqrt(K)
    gs, c2 = mx.random.normal((T, W)), mx.random.normal((T,))
    pre = (mx.random.uniform(shape=(T, n)), mx.random.normal((T, C)).astype(dtype))
    return x, phi, gs, c2, pre, mx.random.normal((T, K)).astype(dtype)


@pytest.mark.parametrize("n,C,T,acc", [(4, 40, 37, True), (1, 33, 5, False), (3, 20, 70, True), (4, 96, 100, False)])
def test_tensor_core_dx_in_token_major_order(monkeypatch, n, C, T, acc):
    # coefficients_mma_vjp.DX_TOKEN_MAJOR (the default): DX's warps in token-group-first order
    # give the same bits as the k-group-first order (the same arithmetic per element); partial
    # token and k groups included (T not a multiple of 32, K not of 64)
    x, phi, gs, c2, pre, gacc = _dx_inputs(n, C, T, mx.bfloat16)
    gacc = gacc if acc else None
    monkeypatch.setattr(coefficients_mma_vjp, "DX_TOKEN_MAJOR", False)
    k_major = coefficients_mma_vjp.dx(x, phi, gs, c2, pre, gacc)
    monkeypatch.setattr(coefficients_mma_vjp, "DX_TOKEN_MAJOR", True)
    emu.launched.clear()
    token_major = coefficients_mma_vjp.dx(x, phi, gs, c2, pre, gacc)
    assert [t["TM"] for name, t, *_ in emu.launched if name == "mhc_coefficients_dynamic_vjp_dx_mma"] == [True]
    assert np.array_equal(np64(token_major), np64(k_major))  # NaN (an unwritten element) fails too


def _dx_res(n: int, C: int, T: int, dtype):
    """DX's RES inputs: (H_res [T, n, n], g [T, n, C]), random."""
    return mx.random.uniform(shape=(T, n, n)), mx.random.normal((T, n, C)).astype(dtype)


@pytest.mark.parametrize("pre,acc,res", [(False, True, False), (True, True, False), (True, False, False),
                                         (False, False, False), (True, False, True), (False, True, True)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("n,C,T", [(4, 48, 37), (4, 40, 70), (1, 33, 5), (3, 64, 20)])
@pytest.mark.parametrize("tiles", [2, 1])  # DX_TOKEN_TILES
def test_tensor_core_dx_with_rows_loaded_together(monkeypatch, pre, acc, res, dtype, n, C, T, tiles):
    # coefficients_mma_vjp.DX_RAW_ROWS (the default): every row's x and gacc loaded as vectors
    # before any dx is stored gives the same bits as the row-by-row form (the same sums in the
    # same order); C = 40 and 33 put lanes on the element-wise path beside vector ones
    x, phi, gs, c2, pre_in, gacc = _dx_inputs(n, C, T, dtype)
    args = (x, phi, gs, c2, pre_in if pre else None, gacc if acc else None, None,
            _dx_res(n, C, T, dtype) if res else None)
    monkeypatch.setattr(coefficients_mma_vjp, "DX_TOKEN_TILES", tiles)
    monkeypatch.setattr(coefficients_mma_vjp, "DX_RAW_ROWS", False)
    rows = coefficients_mma_vjp.dx(*args)
    monkeypatch.setattr(coefficients_mma_vjp, "DX_RAW_ROWS", True)
    emu.launched.clear()
    together = coefficients_mma_vjp.dx(*args)
    assert [t["RAW"] for name, t, *_ in emu.launched if name == "mhc_coefficients_dynamic_vjp_dx_mma"] == [True]
    assert np.array_equal(np64(together), np64(rows))
    if tiles == 1:  # one token tile per warp: the same products per tile, so the same bits as two
        monkeypatch.setattr(coefficients_mma_vjp, "DX_TOKEN_TILES", 2)
        assert np.array_equal(np64(coefficients_mma_vjp.dx(*args)), np64(together))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("n,C,T", [(4, 48, 37), (2, 128, 20), (4, 4096 // 64, 3)])
def test_tensor_core_dx_pre_share_by_vectors(monkeypatch, dtype, n, C, T):
    # DX's pre share (the fused read step): with C a multiple of 16 each lane's 16 k lie in one
    # stream, and H_pre and dh are read once / by 16-byte vectors; the result equals the
    # per-element path's (taken on misaligned buffers) bit for bit, and float64 within rounding
    K = n * C
    x, phi, gs, c2, (H_pre, dh), gacc = _dx_inputs(n, C, T, dtype)
    aligned = coefficients_mma_vjp.dx(x, phi, gs, c2, (H_pre, dh), gacc)
    monkeypatch.setattr(emu, "MISALIGN", True)
    per_element = coefficients_mma_vjp.dx(x, phi, gs, c2, (H_pre, dh), gacc)
    assert np.array_equal(np64(aligned), np64(per_element))
    want = (np64(gs) @ np64(phi).T - np64(x) * np64(c2)[:, None]
            + (np64(H_pre)[:, :, None] * np64(dh)[:, None, :]).reshape(T, K) + np64(gacc))
    assert rel(aligned, want) <= (4e-3 if dtype == mx.bfloat16 else 6e-4)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("n,C,T", [(4, 48, 37), (2, 128, 20), (3, 40, 17), (1, 33, 5)])
@pytest.mark.parametrize("acc", [False, True])
def test_tensor_core_dx_res_share(monkeypatch, dtype, n, C, T, acc):
    # DX's RES (one_pass_vjp FORM "mma"): post's deferred share H_res^T g added in the same pass
    # as pre's, against float64; by vectors (C a multiple of 16: each stream's g at the lane's
    # channels) or per element (C = 40 / 33, or misaligned buffers), the same bits either way
    K = n * C
    x, phi, gs, c2, (H_pre, dh), gacc = _dx_inputs(n, C, T, dtype)
    H_res, g = _dx_res(n, C, T, dtype)
    gacc = gacc if acc else None
    got = coefficients_mma_vjp.dx(x, phi, gs, c2, (H_pre, dh), gacc, res=(H_res, g))
    want = (np64(gs) @ np64(phi).T - np64(x) * np64(c2)[:, None]
            + (np64(H_pre)[:, :, None] * np64(dh)[:, None, :]).reshape(T, K)
            + np.einsum("tji,tjc->tic", np64(H_res), np64(g)).reshape(T, K))
    if acc:
        want = want + np64(gacc)
    assert rel(got, want) <= (4e-3 if dtype == mx.bfloat16 else 6e-4)
    monkeypatch.setattr(emu, "MISALIGN", True)
    assert np.array_equal(np64(coefficients_mma_vjp.dx(x, phi, gs, c2, (H_pre, dh), gacc, res=(H_res, g))), np64(got))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
# launch shapes: the default, and 64 threads per block (two k blocks, the second partial) with 4
# tokens per split (two splits, the second partial): gpu_experiments.py times these. "mma": the
# candidate tensor-core backward (CUDA, 16-bit x; float32 x keeps the FP32 kernel)
@pytest.mark.parametrize("flavour,threads,per_split", [
    (fl, th, ps) for fl in FLAVOURS for th, ps in ((None, None), (64, 4), ("mma", None))
    if not (fl == "metal" and th == "mma")])  # the tensor-core kernels are CUDA only
def test_dynamic_coefficients_backward(monkeypatch, flavour, threads, per_split, dtype):
    if threads == "mma":
        monkeypatch.setattr(coefficients, "MMA_VJP", True)
        monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    elif threads:
        monkeypatch.setattr(coefficients, "VJP_THREADS", threads)
        monkeypatch.setattr(coefficients, "VJP_TOKENS_PER_SPLIT", per_split)
    n, C, T = 4, 24, 7
    x, phi, alpha, bias = _dynamic_inputs(T, n, C, dtype)
    outputs = coefficients.dynamic_coefficients_forward(x, phi, alpha, bias, n, 20, 1e-6)
    cots = [mx.random.normal(o.shape) for o in outputs[:3]]
    got = coefficients.dynamic_vjp([x, phi, alpha, bias], cots, outputs, n, 20)
    want = mx.vjp(lambda *a: reference.mhc_coefficients(*a, 20, 1e-6), [x, phi, alpha, bias], cots)[1]
    scale = 0.01 * largest(want)
    for name, g, w in zip(("x", "phi", "alpha", "bias"), got, want):
        tol = GRAD_TOL if name != "x" or dtype == mx.float32 else TOL[dtype]
        assert grad_rel(g, w, scale) <= tol, name
    names = {name for name, *_ in emu.launched}
    tensor_cores = threads == "mma" and dtype != mx.float32
    assert ("mhc_coefficients_dynamic_vjp_dphi_mma" in names) == tensor_cores
    assert ("mhc_coefficients_dynamic_vjp" in names) == (not tensor_cores)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("dtype", DTYPES)
# n = 9 (the warp Sinkhorn's first n past the one-thread form), 16 and 32; odd C; one token
@pytest.mark.parametrize("n,C,T", [(9, 7, 5), (16, 5, 3), (32, 3, 2), (12, 1, 1)])
def test_wide_n_dynamic_coefficients(monkeypatch, flavour, dtype, n, C, T):
    # coefficients.WIDE_N (default): n > MAX_N_DYNAMIC on the kernel path, the products as
    # MLX matmuls, the activations and Sinkhorn (and its backward) by their kernels; forward
    # against float64, gradients against the reference's autodiff, with pre's share and the
    # chained cotangent added as the read step and the chain would
    monkeypatch.setattr(coefficients, "WIDE_N", True)
    x, phi, alpha, bias = _dynamic_inputs(T, n, C, dtype)
    emu.launched.clear()
    outputs = coefficients.dynamic_coefficients_forward(x, phi, alpha, bias, n, 20, 1e-6)
    assert [name for name, *_ in emu.launched] == ["mhc_coefficients_static"]  # ACTIVATE
    want = ref64.coefficients(np64(x), np64(phi), np64(alpha), np64(bias), 20, 1e-6)
    for got, w in zip(outputs[:3], want):
        assert rel(got, w) <= 1e-5
    assert coefficients.dynamic_read_forward(x.reshape(T, n * C), phi, alpha, bias, n, 20, 1e-6) is None
    cots = [mx.random.normal(o.shape) for o in outputs[:3]]
    emu.launched.clear()
    got = coefficients.dynamic_vjp([x, phi, alpha, bias], cots, outputs, n, 20)
    assert "mhc_sinkhorn_vjp" in {name for name, *_ in emu.launched}
    want = mx.vjp(lambda *a: reference.mhc_coefficients(*a, 20, 1e-6), [x, phi, alpha, bias], cots)[1]
    scale = 0.01 * largest(want)
    for name, g, w in zip(("x", "phi", "alpha", "bias"), got, want):
        tol = GRAD_TOL if name != "x" or dtype == mx.float32 else TOL[dtype]
        assert grad_rel(g, w, scale) <= tol, name
    H_pre, dh, gacc = outputs[0], mx.random.normal((T, C)).astype(dtype), mx.random.normal((T, n, C)).astype(dtype)
    both = coefficients.dynamic_vjp([x, phi, alpha, bias], cots, outputs, n, 20, pre=(H_pre, dh), gacc=gacc)
    extra = np64(H_pre)[:, :, None] * np64(dh)[:, None, :] + np64(gacc)
    assert rel(both[0], np64(got[0]) + extra) <= TOL[dtype]
    assert all(np.array_equal(np64(a), np64(b)) for a, b in zip(both[1:], got[1:]))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("chain", [False, True])
def test_wide_n_dynamic_site(monkeypatch, dtype, chain):
    # a HyperConnection with n = 12 on the (emulated) CUDA kernels with WIDE_N on, plain and
    # with the chained x cotangent: outputs and gradients as the reference backend's
    from mhc_mlx import dispatch, kernels

    as_cuda(monkeypatch)
    monkeypatch.setattr(coefficients, "WIDE_N", True)
    monkeypatch.setattr(kernels, "CHAIN_X_COTANGENT", chain)
    n, C, T = 12, 9, 4
    hc, names, params = random_dynamic_site(C, n)
    x, cot, w = mx.random.normal((T, n, C)), mx.random.normal((T, n, C)), mx.random.normal((C,))

    def site_fn(x_, *ps):
        hc.update(dict(zip(names, ps)))
        return hc(x_, lambda h: (h.astype(mx.float32) * w).astype(h.dtype))

    emu.launched.clear()
    out, got = mx.vjp(site_fn, [x.astype(dtype), *params], [cot.astype(dtype)])
    launched = {name for name, *_ in emu.launched}
    assert {"mhc_coefficients_static", "mhc_sinkhorn_vjp", "mhc_pre", "mhc_post"} <= launched, launched
    with dispatch.use_backend("reference"):
        want_out, want = mx.vjp(site_fn, [x.astype(dtype).astype(mx.float32), *params], [cot.astype(dtype).astype(mx.float32)])
    assert rel(out[0], want_out[0], floor=0.1 * float(np.linalg.norm(np64(x)))) <= TOL[dtype]
    scale = 0.05 * largest(want)
    for name, a, b in zip(["x", *names], got, want):
        assert grad_rel(a, b, scale) <= (GRAD_TOL if dtype == mx.float32 else TOL[dtype]), name


def test_wide_n_dynamic_coefficients_dispatch(monkeypatch):
    # on (the default) n > 8 dynamic coefficients take the kernels, but not the one-launch read
    # step; off, the compiled path, with the reason
    from mhc_mlx import dispatch, kernels

    as_cuda(monkeypatch)
    x, phi, alpha, bias = _dynamic_inputs(2, 16, 5, mx.bfloat16)
    assert coefficients.WIDE_N is True
    assert dispatch.choose("mhc_coefficients", x, phi, alpha, bias, iters=20, eps=1e-6)[0] == "kernels"
    assert not coefficients.read_step_in_one_launch(x)
    monkeypatch.setattr(coefficients, "WIDE_N", False)
    assert dispatch.choose("mhc_coefficients", x, phi, alpha, bias, iters=20, eps=1e-6)[0] != "kernels"
    assert "n=16" in kernels._shape_reason("mhc_coefficients", [x, phi, alpha, bias], {})


SITE_SHAPES = [(1, 33, (3,)), (2, 64, (2, 3)), (3, 1, (4,)), (4, 40, (5,)), (4, 1031, (2,)), (8, 24, (3,)),
               (16, 8, (2,)), (32, 5, (1,))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,C,lead", SITE_SHAPES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_pre_and_post_forward_and_backward(flavour, dtype, n, C, lead, shared):
    x = mx.random.normal((*lead, n, C)).astype(dtype)
    f = mx.random.normal((*lead, C)).astype(dtype)
    clead = () if shared else lead
    hp = mx.random.uniform(shape=(*clead, n))
    hq = mx.random.uniform(shape=(*clead, n))
    hr = mx.random.uniform(shape=(*clead, n, n))
    assert rel(site.pre_forward(x, hp), ref64.pre(np64(x), np64(hp))) <= TOL[dtype]
    assert rel(site.post_forward(x, f, hq, hr), ref64.post(np64(x), np64(f), np64(hq), np64(hr))) <= TOL[dtype]

    g_pre = mx.random.normal((*lead, C)).astype(dtype)
    got = site.pre_vjp(x, hp, g_pre)
    want = mx.vjp(reference.mhc_pre, [x, hp], [g_pre])[1]
    g_post = mx.random.normal((*lead, n, C)).astype(dtype)
    got += site.post_vjp(x, f, hq, hr, g_post)
    want += mx.vjp(reference.mhc_post, [x, f, hq, hr], [g_post])[1]
    tol = GRAD_TOL if dtype == mx.float32 else TOL[dtype]
    scale = 0.01 * largest(want)
    for name, g, w in zip(("pre: x", "pre: H_pre", "post: x", "post: f", "post: H_post", "post: H_res"), got, want):
        assert grad_rel(g, w, scale) <= tol, name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,C,lead", [(1, 33, (3,)), (4, 40, (2, 3)), (8, 24, (5,)), (4, 1031, (2,))])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_pre_coefficient_gradient_alone(flavour, dtype, n, C, lead):
    # site.PRE_VJP at DX = false: dH_pre[t, i] = sum_c g[t, c] x[t, i, c], per token (the fused read step's)
    x = mx.random.normal((*lead, n, C)).astype(dtype)
    g = mx.random.normal((*lead, C)).astype(dtype)
    got = site.pre_vjp_coefficients(x, g)
    want = np.einsum("...c,...ic->...i", np64(g), np64(x)).reshape(-1, n)
    assert rel(got, want) <= 1e-5  # float32 sums of the same 16-bit values


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("n,C,lead", [(4, 24, (7,)), (2, 33, (2, 3)), (1, 40, (5,)), (8, 16, (3,))])
@pytest.mark.parametrize("flavour", FLAVOURS + ("cuda-mma-vjp",))
def test_fused_read_step_forward_and_backward(monkeypatch, flavour, dtype, n, C, lead):
    mma_vjp = flavour == "cuda-mma-vjp"  # with the candidate tensor-core backward (n <= 4, 16-bit x)
    if mma_vjp:
        monkeypatch.setattr(coefficients, "MMA_VJP", True)
    monkeypatch.setattr(build, "gpu_backend", lambda: "metal" if flavour == "metal" else "cuda")
    # the dynamic site's read step as one custom function (candidate, kernels.FUSED_READ_STEP):
    # the same forward as the two ops, and a backward whose x cotangent (pre's share folded into
    # the coefficient kernel's single write) matches the reference's autodiff of the whole site
    x, phi, alpha, bias = _dynamic_inputs(int(np.prod(lead)), n, C, dtype)
    x = x.reshape(*lead, n, C)
    f_weight = mx.random.normal((C,))

    def site_fn(read_step):
        def fn(x_, phi_, alpha_, bias_):
            h, H_pre, H_post, H_res = read_step(x_, phi_, alpha_, bias_)
            f = (h.astype(mx.float32) * f_weight).astype(x_.dtype)  # a sublayer with a gradient
            return site.mhc_post(x_, f, H_post, H_res) if read_step is pre_step.mhc_pre_step \
                else reference.mhc_post(x_, f, H_post, H_res)
        return fn

    def ref_read(x_, phi_, alpha_, bias_):
        H_pre, H_post, H_res = reference.mhc_coefficients(x_, phi_, alpha_, bias_, 20, 1e-6)
        return reference.mhc_pre(x_, H_pre), H_pre, H_post, H_res

    primals = [x, phi, alpha, bias]
    emu.launched.clear()
    h, H_pre, H_post, H_res = pre_step.mhc_pre_step(*primals, 20, 1e-6)
    # these sizes take the kernel form: on CUDA, coefficients and h from one launch
    # (DYNAMIC_PRE); on Metal the two ops' kernels (the ones its first-use checks cover)
    # (up to coefficients.SMALL_TOKENS tokens, as here, their one-threadgroup-per-token forms)
    one_launch = build.gpu_backend() == "cuda"
    assert [name for name, *_ in emu.launched] == (
        small_launches(True, n, n * C) if one_launch else small_launches(False, n, n * C) + ["mhc_pre"])
    want = ref64.coefficients(np64(x), np64(phi), np64(alpha), np64(bias), 20, 1e-6)
    for got, w in zip((H_pre, H_post, H_res), want):
        assert rel(got, w.reshape(got.shape)) <= 1e-5
    assert rel(h, ref64.pre(np64(x), np64(H_pre))) <= TOL[dtype]
    # the same sums in the same order as pre's own kernel: h equals the two launches' h
    two = site.pre_forward(x, coefficients.mhc_coefficients(x, phi, alpha, bias, 20, 1e-6)[0])
    assert np.array_equal(np64(h), np64(two))

    cot = mx.random.normal(x.shape).astype(dtype)
    emu.launched.clear()
    got = mx.vjp(site_fn(pre_step.mhc_pre_step), primals, [cot])[1]
    # "mhc_pre_vjp_h": pre's backward without its dx (site.PRE_VJP at DX = false)
    names = [name + ("_h" if t.get("DX") is False else "") for name, t, *_ in emu.launched]
    assert "mhc_pre_vjp_h" in names and "mhc_pre_vjp" not in names
    tensor_cores = mma_vjp and dtype != mx.float32 and n <= 4
    assert ("mhc_coefficients_dynamic_vjp_dx_mma" in names) == tensor_cores
    assert ("mhc_coefficients_dynamic_vjp_pre" in names) == (not tensor_cores)
    assert "mhc_coefficients_dynamic_vjp" not in names
    # the reference in float32 on the same (16-bit valued) inputs, as the layer backward's test
    up = [x.astype(mx.float32), phi, alpha, bias]
    want = mx.vjp(site_fn(ref_read), up, [cot.astype(mx.float32)])[1]
    # ... and the reference run in x's dtype: f is rounded to 16 bits before post mixes it, so
    # dH_post = sum g f, and through it the coefficient gradients, carry that rounding in every
    # implementation (over 40 seeds at n = 1, C = 40, bf16: the fused step, the two ops and the
    # bf16 reference erred alike, up to 5.7 % on bias). Allowed up to twice that, as gpu_check.
    in_dtype = mx.vjp(site_fn(ref_read), primals, [cot])[1]
    tol = GRAD_TOL if dtype == mx.float32 else TOL[dtype]
    scale = 0.01 * largest(want)
    for name, g, w, d in zip(("x", "phi", "alpha", "bias"), got, want, in_dtype):
        assert g.shape == w.shape, name
        bound = tol
        if dtype != mx.float32:
            own = float(np.linalg.norm(np64(d) - np64(w)) / max(np.linalg.norm(np64(w)), scale, 1e-12))
            bound = ref64.rounding_bound(tol, own)
        assert grad_rel(g, w, scale) <= bound, name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,C,T", [(1, 33, 2), (4, 40, 3), (4, 512, 1), (8, 100, 2), (4, 2056, 2)])
# the single launch by LAYER_LATENCY (layer.LATENCY_KERNEL, T <= LATENCY_TOKENS) or by LAYER's
# inline form; then the two launches
@pytest.mark.parametrize("inline,latency", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_layer_forward(monkeypatch, flavour, dtype, n, C, T, inline, latency):
    monkeypatch.setattr(layer, "LATENCY_KERNEL", latency)
    x = mx.random.normal((T, n, C)).astype(dtype)
    pre, post = mx.random.normal((n,)), mx.random.normal((n,))
    res, w = 2 * mx.random.normal((n, n)), mx.random.uniform(0.5, 1.5, (C,))
    got = layer.mhc_layer(x, pre, post, res, w, 20, 1e-5, inline=inline)
    names = [name for name, *_ in emu.launched]
    assert names[-1] == ("mhc_layer_latency" if latency else "mhc_layer"), names
    assert rel(got, ref64.layer(np64(x), np64(pre), np64(post), np64(res), np64(w), 20, 1e-5)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("eps", [1e-5, 0.37, 3.0])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_layer_latency_kernel_reads_eps_and_iters_from_its_template(flavour, dtype, eps):
    # LAYER_LATENCY takes eps as its float32 bits (EPS_BITS) and the iterations as ITERS: a large
    # eps and 3 iterations change the result, so a wrong read of either is caught
    n, C, T = 4, 24, 2
    x = (0.3 * mx.random.normal((T, n, C))).astype(dtype)
    pre, post = mx.random.normal((n,)), mx.random.normal((n,))
    res, w = 2 * mx.random.normal((n, n)), mx.random.uniform(0.5, 1.5, (C,))
    got = layer.latency_forward(x, pre, post, res, w, 3, eps)
    name, template, grid, tg = emu.launched[-1]
    assert name == "mhc_layer_latency" and template["ITERS"] == 3 and grid == T * tg
    assert rel(got, ref64.layer(np64(x), np64(pre), np64(post), np64(res), np64(w), 3, eps)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fast_norm", [True, False])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_layer_forward_composed_above_max_n_fused(monkeypatch, flavour, dtype, fast_norm):
    # n > layer.MAX_N_FUSED: the coefficient, pre and post kernels chained, the RMSNorm between
    # them by mx.fast.rms_norm (layer.COMPOSITE_FAST_RMS_NORM, the default) or by the ops
    monkeypatch.setattr(layer, "COMPOSITE_FAST_RMS_NORM", fast_norm)
    n, C, T = layer.MAX_N_FUSED + 4, 40, layer.LATENCY_TOKENS + 1
    x = mx.random.normal((T, n, C)).astype(dtype)
    pre, post = mx.random.normal((n,)), mx.random.normal((n,))
    res, w = 2 * mx.random.normal((n, n)), mx.random.uniform(0.5, 1.5, (C,))
    got = layer.mhc_layer(x, pre, post, res, w, 20, 1e-5)
    assert [name for name, *_ in emu.launched] == ["mhc_coefficients_static", "mhc_pre", "mhc_post"]
    assert got.dtype == dtype
    assert rel(got, ref64.layer(np64(x), np64(pre), np64(post), np64(res), np64(w), 20, 1e-5)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,C,T", [(12, 40, 3), (32, 64, 1), (32, 2048, 2), (32, 100, 17)])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_layer_single_launch_above_max_n_fused(monkeypatch, flavour, dtype, n, C, T):
    # layer.INLINE_MAX_N (the default 32): one launch with its Sinkhorn inside up to n = 32 at
    # T <= LATENCY_TOKENS; more tokens (T = 17) keep the composite
    monkeypatch.setattr(layer, "INLINE_MAX_N", 32)
    x = mx.random.normal((T, n, C)).astype(dtype)
    pre, post = mx.random.normal((n,)), mx.random.normal((n,))
    res, w = 2 * mx.random.normal((n, n)), mx.random.uniform(0.5, 1.5, (C,))
    got = layer.mhc_layer(x, pre, post, res, w, 20, 1e-5)
    single = T <= layer.LATENCY_TOKENS
    assert [name for name, *_ in emu.launched] == (["mhc_layer_latency"] if single else
                                                   ["mhc_coefficients_static", "mhc_pre", "mhc_post"])
    if single:
        assert emu.launched[0][1]["N"] == n
    assert rel(got, ref64.layer(np64(x), np64(pre), np64(post), np64(res), np64(w), 20, 1e-5)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
# more tokens than threadgroups (each group loops, its first token loaded before the
# coefficients are ready): x held in registers (CPT > 0) at C = 64, re-read (CPT = 0) at C = 1031
@pytest.mark.parametrize("n,C,T,groups,registers", [(4, 64, 7, 2, True), (4, 1031, 5, 2, False), (2, 40, 5, 3, True)])
@pytest.mark.parametrize("inline", [True, False])
@pytest.mark.parametrize("prefetch", [0, 1, 2])  # layer.PREFETCH_TOKENS: a hint, results unchanged
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_layer_forward_with_fewer_groups_than_tokens(monkeypatch, flavour, dtype, n, C, T, groups, registers, inline,
                                                     prefetch):
    monkeypatch.setattr(layer, "PREFETCH_TOKENS", prefetch)
    x = mx.random.normal((T, n, C)).astype(dtype)
    pre, post = mx.random.normal((n,)), mx.random.normal((n,))
    res, w = 2 * mx.random.normal((n, n)), mx.random.uniform(0.5, 1.5, (C,))
    if inline:
        got = layer.forward(x, pre, post, res, w, 20, 1e-5, True, 32, groups)
    else:
        H = coefficients.activate(pre.reshape(1, n), post.reshape(1, n), res.reshape(1, n, n), 20)
        got = layer.forward(x, H[0][0], H[1][0], H[2][0], w, 20, 1e-5, False, 32, groups)
    name, template, grid, tg = emu.launched[-1]
    assert name == "mhc_layer" and grid == groups * tg and (template["CPT"] > 0) == registers, template
    assert template["PF"] == prefetch
    assert rel(got, ref64.layer(np64(x), np64(pre), np64(post), np64(res), np64(w), 20, 1e-5)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
# threads/groups/budget: (None) the defaults; 32 threads and 2 groups (tokens 0, 2 share one)
# give several dw chunks per thread summed over several tokens: CPT = 3 and 4 in registers
# (CPT * V <= 16, a partial last chunk at C = 260), C = 520 too many (CPT = 0: dw in memory)
@pytest.mark.parametrize("n,C,T,threads,groups,budget,registers", [
    (1, 33, 2, None, None, None, True), (4, 40, 3, None, None, None, True),
    (8, 64, 2, None, None, None, True), (4, 260, 3, 32, 2, None, True), (4, 512, 3, 32, 2, 16, True),
    (4, 520, 3, 32, 2, None, False), (4, 512, 5, 32, 2, 16, "prefetch"),
])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_layer_one_pass_backward(monkeypatch, flavour, dtype, n, C, T, threads, groups, budget, registers):
    # registers == "prefetch": CPT > 0 with the next token's x and g hinted to L2 (layer.PREFETCH_TOKENS
    # = 1); the other cases without the hint. With groups given, the coefficient gradients take
    # the candidate layer.COEFFICIENTS_VJP (several partials to sum)
    monkeypatch.setattr(layer, "PREFETCH_TOKENS", 1 if registers == "prefetch" else 0)
    monkeypatch.setattr(layer, "FUSED_COEFFICIENT_VJP", bool(groups))
    x = mx.random.normal((T, n, C)).astype(dtype)
    primals = [x, mx.random.normal((n,)), mx.random.normal((n,)), 2 * mx.random.normal((n, n)),
               mx.random.uniform(0.5, 1.5, (C,))]
    g = mx.random.normal((T, n, C)).astype(dtype)
    kw = {k: v for k, v in (("threads", threads), ("groups", groups), ("budget", budget)) if v}
    got = layer._fused_layer_vjp(primals, g, 20, 1e-5, **kw)
    template = next(t for name, t, *_ in emu.launched if name == "mhc_layer_vjp")
    assert (template["CPT"] > 0) == bool(registers) and template["PF"] == (registers == "prefetch"), template
    # The reference gradient in float32 on the same (16-bit valued) inputs: the kernel
    # accumulates in float32 too, while the reference run in bfloat16 rounds every op and
    # carries noise of the order of the tolerance itself (up to 3.6e-2 seen over 40 seeds).
    up = [primals[0].astype(mx.float32), *primals[1:]]
    want = mx.vjp(lambda *a: reference.mhc_layer(*a, 20, 1e-5), up, [g.astype(mx.float32)])[1]
    # ... and the reference run in the activation dtype, whose own error is the rounding the
    # dtype's semantics carry: the sublayer output f is rounded to bfloat16 before it is mixed,
    # so dH_post = sum g f holds that rounding in both (equal to it over 40 seeds: up to 5.6 %
    # when the sum nearly cancels at n = 1, C = 33). The kernel may err up to twice as much.
    in_dtype = mx.vjp(lambda *a: reference.mhc_layer(*a, 20, 1e-5), primals, [g])[1]
    tol = GRAD_TOL if dtype == mx.float32 else TOL[dtype]
    top = largest(want)
    for name, a, b, d in zip(("x", "H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight"), got, want, in_dtype):
        # dH_pre = sum_c dy_c x_c nearly cancels (RMSNorm's backward removes dy's component
        # along y = H_pre x; exactly at n = 1), so in 16 bits its error is measured against 5 %
        # of the largest gradient: 3.9e-3 at most over 40 seeds at C = 512 (median 7.7e-4)
        scale = 0.05 * top if name == "H_pre_raw" and dtype != mx.float32 else 0.01 * top
        if n == 1 and name == "H_pre_raw":
            # RMSNorm is scale-invariant at n = 1 up to its eps: the gradient is ~0 (exactly 0
            # without eps; eps / mean(y^2) of the others when H_pre is small) and both sides hold
            # cancellation noise (seen up to 1e-4 of the largest gradient in float32, 1.2e-3 in
            # bfloat16); a wrong formula gives an error of the order of the largest gradient
            err = float(np.linalg.norm(np64(a) - np64(b)))
            assert err <= (1e-3 if dtype == mx.float32 else TOL[dtype]) * top, name
            continue
        own = float(np.linalg.norm(np64(d) - np64(b)) / max(np.linalg.norm(np64(b)), scale, 1e-12))
        bound = tol if dtype == mx.float32 else ref64.rounding_bound(tol, own)
        assert grad_rel(a, b, scale) <= bound, name


@pytest.mark.parametrize("flavour", FLAVOURS)
# groups: one, a few, more than the kernel's 256 threads; iters 40 at n = 4 and n = 8 take the
# one-warp Sinkhorn backward, the others the one-thread form
@pytest.mark.parametrize("n,iters", [(1, 20), (2, 20), (3, 20), (4, 20), (4, 40), (8, 20)])
@pytest.mark.parametrize("groups", [1, 5, 300])
@pytest.mark.parametrize("jacobian", [False, True])
def test_layer_coefficient_backward_in_one_launch(monkeypatch, flavour, n, iters, groups, jacobian):
    # layer.COEFFICIENTS_VJP: the sum of the layer backward's per-group partials (res | post |
    # pre), the sigmoid derivatives and the Sinkhorn backward, against the same steps as MLX ops
    # and the reference's autodiff of the activations; with layer.COEFFICIENTS_JACOBIAN (the
    # default) that backward by n^2 lanes of forward mode where the one-thread form would apply
    monkeypatch.setattr(layer, "COEFFICIENTS_JACOBIAN", jacobian)
    gcoef = mx.random.normal((groups, n * n + 2 * n))
    raw = [mx.random.normal((n,)), mx.random.normal((n,)), 2 * mx.random.normal((n, n))]
    H_pre, H_post = mx.sigmoid(raw[0]), 2 * mx.sigmoid(raw[1])
    emu.launched.clear()
    got = layer.coefficients_vjp(gcoef, H_pre[None], H_post[None], raw[2], iters)
    assert [name for name, *_ in emu.launched] == ["mhc_layer_coefficients_vjp"]
    assert emu.launched[0][1]["THREAD"] == sinkhorn.uses_thread_vjp(n, iters)
    assert emu.launched[0][1]["JAC"] == (jacobian and sinkhorn.uses_thread_vjp(n, iters))
    s = np64(gcoef).sum(axis=0)
    cots = [mx.array(s[n * n + n :]), mx.array(s[n * n : n * n + n]), mx.array(s[: n * n].reshape(n, n))]

    def activations(pre_raw, post_raw, res_raw):
        return mx.sigmoid(pre_raw), 2 * mx.sigmoid(post_raw), reference.sinkhorn_knopp(res_raw, iters)

    want = mx.vjp(activations, raw, [c.astype(mx.float32) for c in cots])[1]
    # The kernel sums up to 300 partials in float32 (the reference's cotangents are float64
    # sums), and a 2 x 2 Sinkhorn backward can be ill-conditioned: over 4000 drawn cases the
    # error reached 1.8e-5 of max(each gradient, 1 % of the largest); 1e-4 allowed. A wrong
    # kernel errs by far more (a wrong post derivative, or one partial left out of the sum,
    # each failed every case).
    top = largest(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert grad_rel(a, b, 0.01 * top) <= 1e-4


def test_layer_coefficient_backward_falls_back_for_long_sinkhorn():
    # past sinkhorn.MAX_BACKWARD_WORK the fused Sinkhorn backward would spill: no kernel (None)
    n = 8
    iters = sinkhorn.MAX_BACKWARD_WORK // n + 1
    assert layer.coefficients_vjp(mx.zeros((3, n * n + 2 * n)), mx.zeros((n,)), mx.zeros((n,)),
                                  mx.zeros((n, n)), iters) is None


@pytest.mark.parametrize("fused_coefficients", [False, True])
@pytest.mark.parametrize("inline", [False, True])
def test_layer_gradients_through_mx_vjp_reuse_the_forward_coefficients(monkeypatch, inline, fused_coefficients):
    # the whole static layer under mx.vjp (float32): the two-launch form's backward reuses the
    # coefficients its forward computed (one coefficient launch in all); the single-launch form
    # computes them inside its kernel, so its backward launches their kernel once. With the
    # candidate layer.FUSED_COEFFICIENT_VJP the coefficient gradients take one launch more.
    monkeypatch.setattr(layer, "FUSED_COEFFICIENT_VJP", fused_coefficients)
    n, C, T = 4, 40, 5
    x = mx.random.normal((T, n, C))
    primals = [x, mx.random.normal((n,)), mx.random.normal((n,)), 2 * mx.random.normal((n, n)),
               mx.random.uniform(0.5, 1.5, (C,))]
    g = mx.random.normal((T, n, C))
    emu.launched.clear()
    y, got = mx.vjp(lambda *a: layer.mhc_layer(*a, 20, 1e-5, inline=inline), primals, [g])
    names = [name for name, *_ in emu.launched]
    assert names.count("mhc_coefficients_static") == 1, names
    forward = "mhc_layer_latency" if inline and layer.LATENCY_KERNEL else "mhc_layer"
    assert names.count(forward) == 1 and names.count("mhc_layer_vjp") == 1, names
    assert names.count("mhc_layer_coefficients_vjp") == fused_coefficients, names
    want_y, want = mx.vjp(lambda *a: reference.mhc_layer(*a, 20, 1e-5), primals, [g])
    assert rel(y[0], np64(want_y[0])) <= 1e-5
    top = largest(want)
    for name, a, b in zip(("x", "H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight"), got, want):
        assert grad_rel(a, b, 0.01 * top) <= GRAD_TOL, name


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,C,lead,shared", [(4, 40, (3,), False), (4, 40, (3,), True), (3, 33, (2, 3), False),
                                             (8, 16, (5,), True), (1, 7, (4,), False)])
def test_pre_backward_with_posts_deferred_share(monkeypatch, flavour, dtype, n, C, lead, shared):
    # site.PRE_VJP_RES (kernels.DEFER_POST_X): from x, h's cotangent dh and post's output
    # cotangent g, in one pass: dx = H_pre (x) dh + H_res^T g, dH_pre = x . dh, dH_res = g x^T
    # (per token, or summed when shared; odd C the scalar path; two threadgroups, so each loops
    # over several tokens); and post's deferred backward: g as x's cotangent, zeros as H_res's,
    # f's and H_post's as without deferral
    monkeypatch.setattr(site, "MAX_GROUPS", 2)
    x = mx.random.normal((*lead, n, C)).astype(dtype)
    dh = mx.random.normal((*lead, C)).astype(dtype)
    g = mx.random.normal((*lead, n, C)).astype(dtype)
    f = mx.random.normal((*lead, C)).astype(dtype)
    H_pre = mx.random.uniform(shape=(n,) if shared else (*lead, n))
    H_post = mx.random.uniform(shape=(n,) if shared else (*lead, n))
    H_res = mx.random.uniform(shape=(n, n) if shared else (*lead, n, n))
    emu.launched.clear()
    gx, gp, gr = site.pre_vjp_res(x, H_pre, H_res, dh, g)
    assert [name for name, *_ in emu.launched] == ["mhc_pre_vjp_res"]
    x64, dh64, g64 = np64(x), np64(dh), np64(g)
    hp = np.broadcast_to(np64(H_pre), (*lead, n))
    hr = np.broadcast_to(np64(H_res), (*lead, n, n))
    want_dx = hp[..., None] * dh64[..., None, :] + np.einsum("...ij,...ic->...jc", hr, g64)
    want_gp = np.einsum("...c,...jc->...j", dh64, x64)
    want_gr = np.einsum("...ic,...jc->...ij", g64, x64)
    if shared:
        axes = tuple(range(len(lead)))
        want_gp, want_gr = want_gp.sum(axis=axes), want_gr.sum(axis=axes)
    assert gx.dtype == dtype and gp.shape == H_pre.shape and gr.shape == H_res.shape
    assert rel(gx, want_dx) <= TOL[dtype]
    assert rel(gp, want_gp) <= 1e-5 and rel(gr, want_gr) <= 1e-5  # float32 sums of the exact 16-bit products
    emu.launched.clear()
    dx_post, df, dpost, dres = site.post_vjp(x, f, H_post, H_res, g, defer=True)
    assert [t["DEFER"] for name, t, *_ in emu.launched if name == "mhc_post_vjp"] == [True]
    assert dx_post.dtype == dtype and np.array_equal(np64(dx_post), g64)
    assert dres.shape == H_res.shape and not np64(dres).any()
    _, df_full, dpost_full, _ = site.post_vjp(x, f, H_post, H_res, g)
    assert np.array_equal(np64(df), np64(df_full)) and np.array_equal(np64(dpost), np64(dpost_full))


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,C,lead,shared", [(4, 40, (3,), False), (4, 40, (3,), True), (2, 33, (2, 3), False),
                                             (8, 16, (5,), True), (1, 7, (4,), False)])
def test_pre_backward_adds_the_chained_x_cotangent(flavour, dtype, n, C, lead, shared):
    # site.PRE_VJP_ACC (the chained read, kernels.CHAIN_X_COTANGENT): dx = gacc + H_pre (x) g in
    # the pass that writes it, dH_pre as without gacc; odd C takes the scalar path
    x = mx.random.normal((*lead, n, C)).astype(dtype)
    g = mx.random.normal((*lead, C)).astype(dtype)
    gacc = mx.random.normal((*lead, n, C)).astype(dtype)
    H_pre = mx.random.uniform(shape=(n,) if shared else (*lead, n))
    emu.launched.clear()
    gx, gh = site.pre_vjp(x, H_pre, g, gacc=gacc)
    assert [name for name, *_ in emu.launched] == ["mhc_pre_vjp_acc"]
    hp = np.broadcast_to(np64(H_pre), (*lead, n))
    want = np64(gacc) + hp[..., None] * np64(g)[..., None, :]
    assert rel(gx, want) <= TOL[dtype]
    _, gh_alone = site.pre_vjp(x, H_pre, g)
    assert np.array_equal(np64(gh), np64(gh_alone))


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_pre", [False, True])
@pytest.mark.parametrize("n,C,T", [(4, 24, 7), (2, 33, 40), (8, 16, 3)])
def test_coefficient_backward_adds_the_chained_x_cotangent(flavour, dtype, with_pre, n, C, T):
    # coefficients.DYNAMIC_VJP_ACC and DYNAMIC_VJP_PRE_ACC: the same dx plus gacc, the same dphi
    x, phi, alpha, bias = _dynamic_inputs(T, n, C, dtype)
    x2 = x.reshape(T, n * C)
    W = n * (n + 2)
    gs, c2 = mx.random.normal((T, W)), mx.random.normal((T,))
    pre = (mx.random.uniform(shape=(T, n)), mx.random.normal((T, C)).astype(dtype)) if with_pre else None
    gacc = mx.random.normal((T, n, C)).astype(dtype)
    emu.launched.clear()
    gx, gphi = coefficients.dynamic_vjp_x_phi(x2, phi, gs, c2, pre, gacc)
    assert [name for name, *_ in emu.launched] == [
        "mhc_coefficients_dynamic_vjp_pre_acc" if with_pre else "mhc_coefficients_dynamic_vjp_acc"]
    gx_alone, gphi_alone = coefficients.dynamic_vjp_x_phi(x2, phi, gs, c2, pre)
    assert np.array_equal(np64(gphi), np64(gphi_alone))
    want = np64(gx_alone) + np64(gacc).reshape(T, n * C)  # both rounded once to x's dtype
    assert rel(gx, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("with_pre", [False, True])
def test_tensor_core_coefficient_backward_adds_the_chained_x_cotangent(monkeypatch, dtype, with_pre):
    # with the tensor-core backward (CUDA, 16-bit x) the chained x cotangent goes into its DX
    # kernel (ACC) as well: no MLX add after it
    monkeypatch.setattr(coefficients, "MMA_VJP", True)
    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    n, C, T = 4, 40, 19
    x, phi, alpha, bias = _dynamic_inputs(T, n, C, dtype)
    x2 = x.reshape(T, n * C)
    gs, c2 = mx.random.normal((T, n * (n + 2))), mx.random.normal((T,))
    pre = (mx.random.uniform(shape=(T, n)), mx.random.normal((T, C)).astype(dtype)) if with_pre else None
    gacc = mx.random.normal((T, n, C)).astype(dtype)
    emu.launched.clear()
    gx, gphi = coefficients.dynamic_vjp_x_phi(x2, phi, gs, c2, pre, gacc)
    dx_launches = [t for name, t, *_ in emu.launched if name == "mhc_coefficients_dynamic_vjp_dx_mma"]
    assert len(dx_launches) == 1 and dx_launches[0]["ACC"] and dx_launches[0]["PRE"] == with_pre
    gx_alone, gphi_alone = coefficients.dynamic_vjp_x_phi(x2, phi, gs, c2, pre)
    assert np.array_equal(np64(gphi), np64(gphi_alone))
    assert rel(gx, np64(gx_alone) + np64(gacc).reshape(T, n * C)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("form", ["two ops", "read step", "tensor-core backward", "static"])
@pytest.mark.parametrize("use", SITE_USES)
@pytest.mark.parametrize("defer", [False, True])
def test_hyper_connection_with_the_chained_x_cotangent(monkeypatch, defer, dtype, form, use):
    # kernels.CHAIN_X_COTANGENT through a HyperConnection on the emulated CUDA kernels: gradients
    # as the reference backend's autodiff, whether post reads the chained x' (the site call, or
    # pre then post with the same x), pre's output alone is used (x' unused: a zero cotangent
    # comes down the chain), post is given another array than pre's x (no chain), post reads x'
    # twice, or the caller also uses H_res; with post's x and H_res cotangents deferred to pre's
    # backward (kernels.DEFER_POST_X, where pre is its own op) or not
    import mhc_mlx as mhc
    from mhc_mlx import kernels

    monkeypatch.setattr(kernels, "DEFER_POST_X", defer)
    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(build, "on_gpu", lambda *a: True)
    monkeypatch.setattr(kernels, "gpu_backend", build.gpu_backend)
    monkeypatch.setattr(kernels, "on_gpu", build.on_gpu)
    monkeypatch.setattr(kernels, "CHAIN_X_COTANGENT", True)
    monkeypatch.setattr(kernels, "FUSED_READ_STEP", form == "read step")
    monkeypatch.setattr(coefficients, "MMA_VJP", form.startswith("tensor-core"))
    n, C, T = 4, 24, 5
    hc = mhc.HyperConnection(C, n, dynamic=form != "static", init="paper")
    W = n * (n + 2)
    if form != "static":
        hc.phi = mx.random.normal((n * C, W)) / np.sqrt(n * C)
        hc.alpha = mx.random.uniform(0.2, 1.5, (3,))
    hc.bias = mx.random.normal((W,))
    names = [k for k in ("phi", "alpha", "bias") if k in hc]
    params = [getattr(hc, k) for k in names]
    x = mx.random.normal((T, n, C)).astype(dtype)
    cot = mx.random.normal((T, n, C)).astype(dtype)
    w = mx.random.normal((C,))

    site_fn = site_use(hc, names, use, w)

    emu.launched.clear()
    out, got = mx.vjp(site_fn, [x, *params], [cot])
    launched = [name for name, *_ in emu.launched]
    chained_kernels = {"mhc_pre_vjp_acc", "mhc_coefficients_dynamic_vjp_acc", "mhc_coefficients_dynamic_vjp_pre_acc",
                       "mhc_pre_vjp_res"}
    assert chained_kernels & set(launched), launched
    deferred = defer and form != "read step"
    assert ("mhc_pre_vjp_res" in launched) == deferred, launched
    post_vjps = [t for name, t, *_ in emu.launched if name == "mhc_post_vjp"]
    if use != "pre only":  # deferred where post reads the chained x'
        assert [t["DEFER"] for t in post_vjps] == [deferred and use != "post with other x"] * len(post_vjps)
    assert_site_matches_reference(site_fn, x, params, names, cot, out, got, TOL[dtype],
                                  GRAD_TOL if dtype == mx.float32 else TOL[dtype])


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("lead", [(0,), (2, 3)])
@pytest.mark.parametrize("defer", [False, True])
def test_chained_x_cotangent_with_no_tokens_and_two_leading_dims(monkeypatch, defer, dynamic, lead):
    # the chain (kernels.CHAIN_X_COTANGENT) on an empty batch (empty gradients for x, zero for the
    # parameters) and on [B, T, n, C] (gradients as the reference backend's); pre's accumulating
    # backward, or pre's backward with post's deferred share (kernels.DEFER_POST_X)
    import mhc_mlx as mhc
    from mhc_mlx import dispatch, kernels

    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(build, "on_gpu", lambda *a: True)
    monkeypatch.setattr(kernels, "gpu_backend", build.gpu_backend)
    monkeypatch.setattr(kernels, "on_gpu", build.on_gpu)
    monkeypatch.setattr(kernels, "CHAIN_X_COTANGENT", True)
    monkeypatch.setattr(kernels, "FUSED_READ_STEP", False)  # pre as its own op
    monkeypatch.setattr(kernels, "DEFER_POST_X", defer)
    # bfloat16 x with the tensor-core backward where the post share is deferred (the dynamic
    # sites' deferred chain on these shapes, DX adding the chained cotangent)
    tensor_cores = defer and dynamic
    monkeypatch.setattr(coefficients, "MMA_VJP", tensor_cores)
    n, C = 4, 24
    hc = mhc.HyperConnection(C, n, dynamic=dynamic, init="paper")
    hc.bias = mx.random.normal(hc.bias.shape)
    names = ["phi", "alpha", "bias"] if dynamic else ["bias"]
    params = [getattr(hc, k) for k in names]
    x = mx.random.normal((*lead, n, C)).astype(mx.bfloat16 if tensor_cores else mx.float32)
    cot = mx.random.normal(x.shape)

    def site_fn(x_, *ps):
        hc.update(dict(zip(names, ps)))
        return hc(x_, lambda h: h * 2)

    emu.launched.clear()
    out, got = mx.vjp(site_fn, [x, *params], [cot.astype(x.dtype)])
    assert ("mhc_pre_vjp_res" if defer else "mhc_pre_vjp_acc") in {name for name, *_ in emu.launched}
    assert out[0].shape == x.shape and [g.shape for g in got] == [p.shape for p in [x, *params]]
    with dispatch.use_backend("reference"):
        _, want = mx.vjp(site_fn, [x.astype(mx.float32), *params], [cot])
    if lead == (0,):
        assert all(float(mx.abs(g).sum()) == 0.0 for g in got[1:])
    else:
        top = largest(want)
        tol = TOL[mx.bfloat16] if tensor_cores else GRAD_TOL
        for name, a, b in zip(["x", *names], got, want):
            assert grad_rel(a, b, 0.05 * top) <= tol, name


@pytest.mark.parametrize("flavour", ["metal"])
@pytest.mark.parametrize("op", ["sinkhorn_knopp", "mhc_coefficients", "mhc_pre", "mhc_post", "mhc_layer"])
def test_metal_first_use_checks_pass_on_the_emulated_metal_kernels(monkeypatch, flavour, op):
    # kernels.safety on the Metal source run by the emulator: every op's check (forward, and
    # gradients through its backward kernels) passes, so a Mac would keep the kernels
    from mhc_mlx import kernels
    from mhc_mlx.kernels import safety

    monkeypatch.setattr(build, "gpu_backend", lambda: "metal")
    safety.reset()
    try:
        emu.launched.clear()
        assert safety.verified(op, kernels._implementation(op)), safety.result(op)
        names = {name for name, *_ in emu.launched}
        backward = {"sinkhorn_knopp": "mhc_sinkhorn_vjp", "mhc_coefficients": "mhc_coefficients_dynamic_vjp",
                    "mhc_pre": "mhc_pre_vjp", "mhc_post": "mhc_post_vjp", "mhc_layer": "mhc_layer_vjp"}[op]
        assert any(name.startswith(backward) for name in names), names  # its backward kernel ran
    finally:
        safety.reset()


@pytest.fixture
def metal_checks(monkeypatch):
    """kernels.safety with the Metal source run by the emulator: a function that runs op's
    first-use check from a clean state and returns (whether it passed, the launches it made)."""
    from mhc_mlx import kernels
    from mhc_mlx.kernels import safety

    monkeypatch.setattr(build, "gpu_backend", lambda: "metal")

    def check(op: str):
        safety.reset()
        emu.launched.clear()
        return safety.verified(op, kernels._implementation(op)), list(emu.launched)

    yield check
    safety.reset()


@pytest.mark.parametrize("flavour", ["metal"])
def test_metal_first_use_check_runs_every_form_of_the_layer(monkeypatch, flavour, metal_checks):
    # the layer's check runs the latency kernel, the layer kernel's inline form (what
    # layer.INLINE_ALWAYS runs above LATENCY_TOKENS) and its two-launch form; an inline form
    # wrong only above LATENCY_TOKENS fails the check
    ok, launched = metal_checks("mhc_layer")
    assert ok
    forms = {(name, template.get("INLINE")) for name, template, *_ in launched
             if name.startswith("mhc_layer") and not name.startswith("mhc_layer_vjp")}
    assert {("mhc_layer_latency", None), ("mhc_layer", True), ("mhc_layer", False)} <= forms, forms
    right = layer.forward
    signature = inspect.signature(right)

    def wrong_inline(x, *a, **k):
        out = right(x, *a, **k)
        inline = signature.bind(x, *a, **k).arguments["inline"]
        return out * 1.05 if inline and x.shape[0] > layer.LATENCY_TOKENS else out

    monkeypatch.setattr(layer, "forward", wrong_inline)
    with pytest.warns(RuntimeWarning, match="one launch"):
        assert not metal_checks("mhc_layer")[0]


@pytest.mark.parametrize("flavour", ["metal"])
def test_metal_first_use_check_runs_both_few_token_coefficient_forms(monkeypatch, flavour, metal_checks):
    # the coefficient check runs the one-launch form (coefficients.ONE_LAUNCH_SMALL, n C up to
    # ONE_MAX_K) and the split form past it, in every dtype of safety.CASES; a split form wrong
    # only there fails the check
    ok, launched = metal_checks("mhc_coefficients")
    assert ok
    dtypes = {}
    for name, template, *_ in launched:
        if name in ("mhc_coefficients_one", "mhc_coefficients_split_partial"):
            dtypes.setdefault(name, set()).add(template.get("T"))
    assert set(dtypes) == {"mhc_coefficients_one", "mhc_coefficients_split_partial"}, dtypes
    assert all(len(seen) == 3 for seen in dtypes.values()), dtypes  # float32, bfloat16, float16
    right = coefficients._split_small
    monkeypatch.setattr(coefficients, "_split_small", lambda *a: tuple(o * 1.05 for o in right(*a)))
    with pytest.warns(RuntimeWarning):
        assert not metal_checks("mhc_coefficients")[0]


@pytest.mark.parametrize("flavour", ["metal"])
def test_check_metal_kernels_passes_on_the_emulated_metal_kernels(monkeypatch, flavour):
    # kernels.check_metal_kernels() (what the training loop runs before compiling its step) on
    # the Metal source run by the emulator: every op's check passes
    from mhc_mlx import kernels
    from mhc_mlx.kernels import safety

    monkeypatch.setattr(build, "gpu_backend", lambda: "metal")
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "metal")
    monkeypatch.setattr(kernels, "on_gpu", lambda *a: True)
    monkeypatch.delenv(build.ENV_DISABLE_METAL, raising=False)
    safety.reset()
    try:
        assert kernels.check_metal_kernels() == {op: "ok" for op in kernels.OPS if op != "rms_norm"}
    finally:
        safety.reset()


@pytest.mark.parametrize("flavour", ["metal"])
def test_metal_first_use_check_catches_a_wrong_backward(monkeypatch, flavour):
    # a backward kernel that is wrong while the forward is right fails the first-use check
    from mhc_mlx import kernels
    from mhc_mlx.kernels import safety

    monkeypatch.setattr(build, "gpu_backend", lambda: "metal")
    right = site.pre_vjp
    monkeypatch.setattr(site, "pre_vjp", lambda x, H_pre, g, gacc=None: tuple(
        a * 1.01 for a in right(x, H_pre, g, gacc)))
    safety.reset()
    try:
        with pytest.warns(RuntimeWarning, match="gradient"):
            assert not safety.verified("mhc_pre", kernels._implementation("mhc_pre"))
    finally:
        safety.reset()


def _same_coefficient_gradients(got, other, primals, cots, iters: int):
    """The dynamic coefficient backward's (x, phi, alpha, bias) cotangents `got` equal `other`'s
    (another form of it) to float32 rounding and the reference's autodiff within GRAD_TOL."""
    want = mx.vjp(lambda *a: reference.mhc_coefficients(*a, iters, 1e-6), primals, cots)[1]
    top = largest(want)
    for name, a, b, w in zip(("x", "phi", "alpha", "bias"), got, other, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert grad_rel(a, b, 0.01 * top) <= 1e-5, name
        assert grad_rel(a, w, 0.01 * top) <= GRAD_TOL, name


def _backward_and_launches(primals, cots, outputs, n: int, iters: int):
    """(the dynamic coefficients' backward, the names of the kernels it launched)."""
    emu.launched.clear()
    got = coefficients.dynamic_vjp(primals, cots, outputs, n, iters)
    return got, [name for name, *_ in emu.launched]


def _glue_inputs(T: int, n: int, iters: int, dtype=mx.float32, C: int = 12):
    """(primals, cotangents of H_pre/H_post/H_res, forward outputs) of the dynamic coefficients
    for x [T, n, C], for the coefficient backward's glue tests."""
    x, phi, alpha, bias = _dynamic_inputs(T, n, C, dtype)
    outputs = coefficients.dynamic_coefficients_forward(x, phi, alpha, bias, n, iters, 1e-6)
    return [x, phi, alpha, bias], [mx.random.normal(o.shape) for o in outputs[:3]], outputs


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("n,iters", [(1, 20), (2, 20), (3, 20), (4, 20), (2, 40)])
@pytest.mark.parametrize("T,threads", [(1, 128), (7, 128), (130, 128), (130, 32), (7, 32)])
def test_dynamic_backward_glue_in_one_launch(monkeypatch, flavour, n, iters, T, threads):
    # coefficients.DYNAMIC_VJP_GLUE (FUSED_VJP_GLUE, the default): the coefficient backward's
    # gradients with the glue as one kernel equal those with the glue as MLX ops (T = 130: two
    # threadgroups of 128 or five of 32, the last partial), and the reference's autodiff; the
    # one-kernel form (SPLIT_GLUE_SINKHORN off: its Sinkhorn backward inside)
    monkeypatch.setattr(coefficients, "GLUE_THREADS", threads)
    monkeypatch.setattr(coefficients, "SPLIT_GLUE_SINKHORN", False)
    primals, cots, outputs = _glue_inputs(T, n, iters)
    monkeypatch.setattr(coefficients, "FUSED_VJP_GLUE", False)
    ops_form, names = _backward_and_launches(primals, cots, outputs, n, iters)
    assert "mhc_coefficients_dynamic_vjp_glue" not in names
    monkeypatch.setattr(coefficients, "FUSED_VJP_GLUE", True)
    got, names = _backward_and_launches(primals, cots, outputs, n, iters)
    assert names[0] == "mhc_coefficients_dynamic_vjp_glue" and "mhc_sinkhorn_vjp_thread" not in names, names
    _same_coefficient_gradients(got, ops_form, primals, cots, iters)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("n,iters", [(1, 20), (2, 20), (3, 20), (4, 20), (2, 40)])
@pytest.mark.parametrize("T", [1, 7, 33, 130])
@pytest.mark.parametrize("jacobian", [False, True])
def test_dynamic_backward_glue_after_the_split_off_sinkhorn_backward(monkeypatch, flavour, n, iters, T, jacobian):
    # coefficients.SPLIT_GLUE_SINKHORN (the default): the res logits' Sinkhorn backward in
    # launches of its own, then the glue without it. SINKHORN_JACOBIAN (the default): the
    # Jacobian from the forward's logits (n^2 lanes per token), then its transpose on the
    # cotangent; off: the backward replayed on Q lanes per token (one row each; n = 3 leaves a
    # dead row in each group of 4). T = 33 and 130 end mid-threadgroup. The same gradients as
    # the glue with the one-thread backward inside (to float32 rounding: sums in another order)
    # and as the reference's autodiff
    primals, cots, outputs = _glue_inputs(T, n, iters)
    monkeypatch.setattr(coefficients, "SINKHORN_JACOBIAN", jacobian)
    monkeypatch.setattr(coefficients, "SPLIT_GLUE_SINKHORN", False)
    one_kernel, names = _backward_and_launches(primals, cots, outputs, n, iters)
    assert not any("sinkhorn" in name for name in names), names
    monkeypatch.setattr(coefficients, "SPLIT_GLUE_SINKHORN", True)
    got, names = _backward_and_launches(primals, cots, outputs, n, iters)
    split = (["mhc_coefficients_dynamic_sinkhorn_jacobian", "mhc_coefficients_dynamic_vjp_sinkhorn_apply"] if jacobian
             else ["mhc_coefficients_dynamic_vjp_sinkhorn"])
    assert names[:len(split) + 1] == split + ["mhc_coefficients_dynamic_vjp_glue_after"], names
    _same_coefficient_gradients(got, one_kernel, primals, cots, iters)


def _sinkhorn_logits_m(L: np.ndarray) -> mx.array:
    """The coefficient kernels' m [M, W] whose res logits are L [M, n, n] (alpha = 1, bias = 0)."""
    M, n = L.shape[0], L.shape[-1]
    m = np.zeros((M, n * (n + 2)), np.float32)
    m[:, 2 * n:] = L.reshape(M, n * n)
    return mx.array(m)


def _row_lane_backward(L: np.ndarray, g: mx.array, iters: int) -> mx.array:
    """dL of the Sinkhorn for logits L [M, n, n] and cotangent g by DYNAMIC_VJP_SINKHORN."""
    from mhc_mlx.kernels.build import int_params, launch

    M, n = L.shape[0], L.shape[-1]
    q = coefficients.group_lanes(n)
    W = n * (n + 2)
    return launch(
        coefficients.DYNAMIC_VJP_SINKHORN, [_sinkhorn_logits_m(L), mx.ones((3,)), mx.zeros((W,)), g.reshape(M, n * n),
                                            int_params(M)],
        [((M, n * n), mx.float32)], -(-M * q // 32) * 32, 32, [("N", n), ("Q", q), ("ITERS", iters)],
    )[0].reshape(M, n, n)


def _jacobian_backward(L: np.ndarray, g: mx.array, iters: int) -> tuple[mx.array, mx.array]:
    """(dL, the Jacobian [M, n^2, n^2]) of the Sinkhorn for logits L [M, n, n] and cotangent g
    by DYNAMIC_SINKHORN_JACOBIAN and DYNAMIC_VJP_SINKHORN_APPLY."""
    from mhc_mlx.kernels.build import int_params, launch

    M, n = L.shape[0], L.shape[-1]
    W = n * (n + 2)
    lanes = -(-M * n * n // 32) * 32
    jac = launch(coefficients.DYNAMIC_SINKHORN_JACOBIAN,
                 [_sinkhorn_logits_m(L), mx.ones((3,)), mx.zeros((W,)), int_params(M, iters)],
                 [((M, n * n, n * n), mx.float32)], lanes, 32, [("N", n)])[0]
    got = launch(coefficients.DYNAMIC_VJP_SINKHORN_APPLY, [jac, g.reshape(M, n * n), int_params(M)],
                 [((M, n * n), mx.float32)], lanes, 32, [("N", n)])[0]
    return got.reshape(M, n, n), jac


@pytest.mark.parametrize("form", ["row lanes", "jacobian"])
@pytest.mark.parametrize("iters", [20, 1])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_split_off_sinkhorn_backward_at_ties_and_underflow(monkeypatch, flavour, iters, form):
    # the split-off Sinkhorn backward, both forms: ksinkhorn_rows_vjp (DYNAMIC_VJP_SINKHORN) and
    # ksinkhorn_thread_jvp's Jacobian transposed onto g (DYNAMIC_SINKHORN_JACOBIAN, then
    # DYNAMIC_VJP_SINKHORN_APPLY), with m = the logits, alpha = 1, bias = 0, on the one-thread
    # form's hard cases: a tie at the max, a row that underflows, a 5e3 spread, a row / a row
    # and a column clamped; against the one-thread form and, where clamped, float64 central
    # differences; and one Jacobian column against float64 differences of the forward
    n, M = 4, 5
    L = np.array(2 * mx.random.normal((M, n, n)), dtype=np.float32)
    L[0, 1, 2] = L[0, 3, 0] = L[0].max() + 1.0
    L[1, 2, :] -= 200.0
    L[2] *= 5e3
    L[3, 1, :] = L[3].max() - 75.0 + 0.1 * np.arange(n)
    L[4, 1, :] = L[4].max() - 75.0 + 0.1 * np.arange(n)
    L[4, :, 2] = L[4].max() - 75.0 - 0.1 * np.arange(n)
    g = mx.random.normal((M, n, n))
    got, jac = _jacobian_backward(L, g, iters) if form == "jacobian" else (_row_lane_backward(L, g, iters), None)
    monkeypatch.setattr(sinkhorn, "THREAD_VJP_MAX_WORK", sinkhorn.THREAD_VJP_DEFAULT_WORK)
    thread = sinkhorn.project_vjp(mx.array(L), g, iters)
    assert np.isfinite(np64(got)).all()
    assert grad_rel(got, thread) <= 1e-5
    for k in (3, 4):
        Lk, gk, fd = L[k].astype(np.float64), np64(g[k]), np.zeros((n, n))
        for idx in np.ndindex(n, n):
            up, down = Lk.copy(), Lk.copy()
            up[idx] += 1e-6
            down[idx] -= 1e-6
            fd[idx] = ((ref64.sinkhorn(up, iters) - ref64.sinkhorn(down, iters)) * gk).sum() / 2e-6
        assert rel(got[k], fd) <= 1e-4, k
    if jac is not None:  # column a of token 0's Jacobian: d P / d L_a
        a = 6
        up, down = L[0].astype(np.float64), L[0].astype(np.float64)
        up.flat[a] += 1e-6
        down.flat[a] -= 1e-6
        column = ((ref64.sinkhorn(up, iters) - ref64.sinkhorn(down, iters)) / 2e-6).reshape(n * n)
        assert np.isfinite(np64(jac)).all() and rel(np64(jac)[0, :, a], column) <= 1e-4


def test_dynamic_backward_glue_only_where_the_one_thread_sinkhorn_backward_applies(monkeypatch):
    # n = 8 (or n * iters above sinkhorn.THREAD_VJP_MAX_WORK): the glue stays MLX ops
    monkeypatch.setattr(coefficients, "FUSED_VJP_GLUE", True)
    for n, iters in ((8, 10), (4, 40)):
        x, phi, alpha, bias = _dynamic_inputs(3, n, 8, mx.float32)
        outputs = coefficients.dynamic_coefficients_forward(x, phi, alpha, bias, n, iters, 1e-6)
        emu.launched.clear()
        coefficients.dynamic_vjp([x, phi, alpha, bias], [mx.ones(o.shape) for o in outputs[:3]], outputs, n, iters)
        names = [name for name, *_ in emu.launched]
        assert not any(name.startswith("mhc_coefficients_dynamic_vjp_glue") for name in names), names
        assert "mhc_coefficients_dynamic_vjp_sinkhorn" not in names, names
        assert "mhc_coefficients_dynamic_sinkhorn_jacobian" not in names, names


def test_emulator_reports_a_deadlock_and_a_partial_warp_exchange():
    from mhc_mlx.kernels.build import KernelSpec

    # half the lanes wait in a warp sum while the other half wait at the block barrier
    stuck = KernelSpec("stuck", ("a",), ("o",),
                       "float v = a[KTID]; if (KLANE < 16) v = kwarp_sum(v); KBARRIER(); o[KTID] = v;")
    with pytest.raises(RuntimeError, match="deadlock"):
        emu.launch(stuck, [mx.ones((32,))], [((32,), mx.float32)], 32, 32, [])
    # lanes that returned early cannot take part in a full-mask exchange
    early = KernelSpec("early", ("a",), ("o",), "if (KLANE >= 16) return; o[KTID] = kwarp_sum(a[KTID]);")
    with pytest.raises(RuntimeError, match="exited"):
        emu.launch(early, [mx.ones((32,))], [((32,), mx.float32)], 32, 32, [])
    fine = KernelSpec("fine", ("a",), ("o",), "const int i = KBID * KNT + KTID; o[i] = kwarp_sum(a[i]);")
    out = emu.launch(fine, [mx.arange(64).astype(mx.float32)], [((64,), mx.float32)], 64, 32, [])[0]
    assert out.tolist() == [float(sum(range(32)))] * 32 + [float(sum(range(32, 64)))] * 32


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_emulator_reports_out_of_bounds_and_input_writes(dtype):
    from mhc_mlx.kernels.build import KernelSpec

    a = mx.arange(32).astype(dtype)
    # one element past the end of the output (the last thread off by one)
    past = KernelSpec("past", ("a",), ("o",), "o[KTID + (KTID == 31 ? 1 : 0)] = a[KTID];")
    with pytest.raises(RuntimeError, match="out of bounds after output 0"):
        emu.launch(past, [a], [((32,), dtype)], 32, 32, [])
    before = KernelSpec("before", ("a",), ("o",), "o[KTID - 1] = a[KTID];")
    with pytest.raises(RuntimeError, match="out of bounds before output 0"):
        emu.launch(before, [a], [((32,), dtype)], 32, 32, [])
    # a kernel must never write its inputs (on a GPU that changes an MLX array under MLX's feet)
    into = KernelSpec("into", ("a",), ("o",), "o[KTID] = a[KTID]; if (KTID == 0) const_cast<T*>(a)[5] = a[0];")
    with pytest.raises(RuntimeError, match="wrote into input 0"):
        emu.launch(into, [a], [((32,), dtype)], 32, 32, [("T", dtype)])
    # a prefetch hint for memory outside every buffer of the launch
    hint = KernelSpec("hint", ("a",), ("o",), "KPREFETCH_L2(a + 64); o[KTID] = a[KTID];")
    with pytest.raises(RuntimeError, match="prefetch hints outside every buffer"):
        emu.launch(hint, [a], [((32,), dtype)], 32, 32, [])
    # a read past the end of an input sees poison (NaN), which reaches the output
    over = KernelSpec("over", ("a",), ("o",), "o[KTID] = a[KTID + 1];")
    out = np64(emu.launch(over, [a], [((32,), dtype)], 32, 32, [])[0])
    assert np.isnan(out[31]) and np.array_equal(out[:31], np.arange(1, 32))


@pytest.mark.parametrize("mma_vjp", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_candidates_with_no_tokens(monkeypatch, dtype, mma_vjp):
    # an empty batch through the fused read step and the tensor-core backward: empty outputs,
    # zero parameter gradients, nothing unwritten
    monkeypatch.setattr(coefficients, "MMA_VJP", mma_vjp)
    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    n, C = 4, 24
    x = mx.zeros((0, n, C), dtype=dtype)
    primals = [x, mx.random.normal((n * C, 24)), mx.ones((3,)), mx.random.normal((24,))]

    def site_fn(x_, phi_, alpha_, bias_):
        h, _, H_post, H_res = pre_step.mhc_pre_step(x_, phi_, alpha_, bias_, 20, 1e-6)
        return site.mhc_post(x_, h, H_post, H_res)

    out, grads = mx.vjp(site_fn, primals, [mx.zeros((0, n, C), dtype=dtype)])
    assert out[0].shape == (0, n, C)
    assert [tuple(g.shape) for g in grads] == [tuple(p.shape) for p in primals]
    assert all(float(mx.abs(g).sum()) == 0.0 for g in grads[1:])


def test_emulator_misaligns_every_buffer(monkeypatch):
    # what the misaligned runs below rely on: under MISALIGN a kernel sees no 16-byte aligned buffer
    from mhc_mlx.kernels.build import KernelSpec

    probe = KernelSpec("probe", ("a",), ("o",), "if (KTID == 0) o[0] = KALIGNED16(a) && KALIGNED16(o) ? 1.0f : 0.0f;")
    a = mx.ones((8,), mx.bfloat16)
    assert emu.launch(probe, [a], [((1,), mx.float32)], 32, 32, [])[0].item() == 1.0
    monkeypatch.setattr(emu, "MISALIGN", True)
    assert emu.launch(probe, [a], [((1,), mx.float32)], 32, 32, [])[0].item() == 0.0


# Every kernel family on buffers that are not 16-byte aligned (MLX hands kernels views at an
# offset, e.g. a slice): the element-wise fallbacks of the vector loads and stores, at shapes
# whose channel counts would otherwise take the 16-byte path.
MISALIGNED_CASES = {
    "pre-post": lambda mp: test_pre_and_post_forward_and_backward("cuda", mx.bfloat16, 4, 64, (3,), False),
    "layer-forward": lambda mp: test_layer_forward(mp, "cuda", mx.bfloat16, 4, 64, 3, False, False),
    "layer-forward-inline": lambda mp: test_layer_forward(mp, "cuda", mx.float16, 4, 64, 2, True, False),
    "layer-forward-latency": lambda mp: test_layer_forward(mp, "cuda", mx.bfloat16, 4, 64, 2, True, True),
    "layer-forward-groups": lambda mp: test_layer_forward_with_fewer_groups_than_tokens(
        mp, "cuda", mx.bfloat16, 4, 64, 7, 2, True, True, 1),
    "layer-backward": lambda mp: test_layer_one_pass_backward(mp, "cuda", mx.bfloat16, 4, 64, 3, None, None, None, True),
    "coefficients-kernel": lambda mp: test_dynamic_coefficients_forward(mp, "cuda", "kernel", 8, mx.bfloat16, 4, 40, 19),
    "coefficients-mma": lambda mp: test_dynamic_coefficients_forward(mp, "cuda", "mma", None, mx.bfloat16, 4, 40, 19),
    "coefficients-mma-f16": lambda mp: test_dynamic_coefficients_forward(mp, "cuda", "mma", None, mx.float16, 4, 24, 70),
    "coefficients-small": lambda mp: test_dynamic_coefficients_one_threadgroup_per_token(
        mp, "cuda", mx.bfloat16, 4, 40, 3, False),
    "coefficients-split": lambda mp: test_dynamic_coefficients_one_threadgroup_per_token(
        mp, "cuda", mx.bfloat16, 4, 300, 2, True),
    "coefficients-backward": lambda mp: test_dynamic_coefficients_backward(mp, "cuda", None, None, mx.bfloat16),
    "mma-backward": lambda mp: test_tensor_core_coefficient_backward_products(mx.bfloat16, 4, 40, 37),
    "read-step": lambda mp: test_fused_read_step_forward_and_backward(mp, "cuda", mx.bfloat16, 4, 24, (7,)),
    "sinkhorn": lambda mp: test_sinkhorn_forward_and_backward("cuda", 4),
}


@pytest.mark.parametrize("case", list(MISALIGNED_CASES))
def test_kernels_on_misaligned_buffers(monkeypatch, case):
    monkeypatch.setattr(emu, "MISALIGN", True)
    MISALIGNED_CASES[case](monkeypatch)


@pytest.mark.parametrize("flavour", ["metal"])
@pytest.mark.parametrize("case", range(4))
def test_metal_first_use_check_covers_each_dtype_and_the_wide_forms(monkeypatch, flavour, case):
    # each of safety.CASES is run: a post kernel wrong only in that case's instantiation (one
    # dtype at n = 4, or n = 16) fails the op's check, naming the case
    from mhc_mlx import kernels
    from mhc_mlx.kernels import safety

    n_bad, dtype_bad = safety.CASES[case]
    monkeypatch.setattr(build, "gpu_backend", lambda: "metal")
    right = site.post_forward

    def wrong_in_one_case(x, f, H_post, H_res):
        out = right(x, f, H_post, H_res)
        return out * 1.05 if (x.shape[-2], x.dtype) == (n_bad, dtype_bad) else out

    monkeypatch.setattr(site, "post_forward", wrong_in_one_case)
    safety.reset()
    try:
        with pytest.warns(RuntimeWarning, match=f"n={n_bad}, {str(dtype_bad).split('.')[-1]}"):
            assert not safety.verified("mhc_post", kernels._implementation("mhc_post"))
    finally:
        safety.reset()


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("n,T,threads", [(4, 1, 128), (4, 17, 128), (2, 40, 32), (1, 130, 128), (3, 16, 32)])
def test_glue_writes_the_tensor_core_fragments(monkeypatch, split, dtype, n, T, threads):
    # coefficients.GLUE_PACKS (candidate): the glue kernel's gs fragments equal pack_a's and
    # pack_b's bit for bit (rows padded to 16 and columns to the fragments' width with zeros:
    # T = 1, 17, 130; one and several threadgroups), and the coefficient backward with them
    # equals the one with the two pack launches, which it no longer makes; also in the glue's
    # form after the split-off Sinkhorn backward (SPLIT_GLUE_SINKHORN)
    from mhc_mlx.kernels import coefficients_mma_vjp as cmv

    monkeypatch.setattr(coefficients, "SPLIT_GLUE_SINKHORN", split)
    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(coefficients, "MMA_MIN_ELEMENTS", 0)  # the tensor-core backward at this size
    monkeypatch.setattr(coefficients, "GLUE_THREADS", threads)
    C = 12
    primals, cots, outputs = _glue_inputs(T, n, 20, dtype, C)
    x, phi, alpha, bias = primals
    H_pre, H_post, _, m, invr = outputs
    *plain, none = coefficients._glue_kernel(m, invr, alpha, bias, H_pre, H_post, cots, n, n * C, 20)
    gs, c2, g_bias, g_alpha, (gsa, gsb) = coefficients._glue_kernel(m, invr, alpha, bias, H_pre, H_post, cots,
                                                                       n, n * C, 20, packs=True)
    assert none is None
    for a, b in zip((gs, c2, g_bias, g_alpha), plain):
        assert np.array_equal(np.array(a), np.array(b))
    for got, want in ((gsa, cmv.pack_a(gs, cmv.DX_PARTS)), (gsb, cmv.pack_b(gs, cmv.DPHI_PARTS, False))):
        assert got.shape == want.shape and got.dtype == want.dtype == mx.bfloat16
        assert np.array_equal(np64(got), np64(want))  # NaN (an unwritten element) fails too

    emu.launched.clear()
    without = coefficients.dynamic_vjp(primals, cots, outputs, n, 20)
    assert [name for name, *_ in emu.launched].count("mhc_pack_b_fragments") == 2
    monkeypatch.setattr(coefficients, "GLUE_PACKS", True)
    emu.launched.clear()
    got = coefficients.dynamic_vjp(primals, cots, outputs, n, 20)
    names = [name for name, *_ in emu.launched]
    glue = "mhc_coefficients_dynamic_vjp_glue_after_packs" if split else "mhc_coefficients_dynamic_vjp_glue_packs"
    # after the split-off Sinkhorn backward's two launches (its Jacobian, then the product)
    assert names[2 * int(split)] == glue, names
    assert "mhc_pack_a_fragments" not in names and names.count("mhc_pack_b_fragments") == 1, names  # phi's
    for name, a, b in zip(("x", "phi", "alpha", "bias"), got, without):
        assert np.array_equal(np64(a), np64(b)), name


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("T,threads", [(1, 128), (17, 32), (130, 128), (48, 32)])
def test_glue_writes_dphi_wg_fragments_where_dphi_wg_takes_them(monkeypatch, split, T, threads):
    # coefficients.GLUE_PACKS where DPHI_WG takes dphi (bfloat16 x, n = 4, Hopper): the glue's
    # second pack is in pack_gs_wg's order, bit for bit (rows padded to 16 with zeros: T = 1, 17,
    # 130), and the backward with it equals the one with the pack launches, making none for gs
    from mhc_mlx.kernels import coefficients_mma_vjp as cmv

    monkeypatch.setattr(coefficients, "SPLIT_GLUE_SINKHORN", split)
    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(coefficients_mma, "hopper", lambda: True)  # the emulated GPU is an sm_90
    monkeypatch.setattr(coefficients, "MMA_MIN_ELEMENTS", 0)  # the tensor-core backward at this size
    monkeypatch.setattr(coefficients, "GLUE_THREADS", threads)
    n, C = 4, 16
    primals, cots, outputs = _glue_inputs(T, n, 20, mx.bfloat16, C)
    x, phi, alpha, bias = primals
    H_pre, H_post, _, m, invr = outputs
    assert cmv.dphi_wg_applies(x.reshape(T, n * C), n * (n + 2))
    gs, c2, g_bias, g_alpha, (gsa, gsw) = coefficients._glue_kernel(m, invr, alpha, bias, H_pre, H_post, cots,
                                                                       n, n * C, 20, packs=True, wg=True)
    for got, want in ((gsa, cmv.pack_a(gs, cmv.DX_PARTS)), (gsw, cmv.pack_gs_wg(gs)),
                      (gsw, cmv.pack_gs_wg_reference(gs))):
        assert got.shape == want.shape and got.dtype == want.dtype == mx.bfloat16
        assert np.array_equal(np64(got), np64(want))  # NaN (an unwritten element) fails too

    emu.launched.clear()
    without = coefficients.dynamic_vjp(primals, cots, outputs, n, 20)
    names = [name for name, *_ in emu.launched]
    assert "mhc_pack_a_fragments" in names and names.count("mhc_pack_wg_fragments") == 1, names  # gs's
    monkeypatch.setattr(coefficients, "GLUE_PACKS", True)
    emu.launched.clear()
    got = coefficients.dynamic_vjp(primals, cots, outputs, n, 20)
    names = [name for name, *_ in emu.launched]
    assert any(name.endswith("_packs_wg") for name in names), names
    assert "mhc_pack_a_fragments" not in names and "mhc_pack_wg_fragments" not in names, names
    assert cmv.DPHI_WG.name in names, names
    for name, a, b in zip(("x", "phi", "alpha", "bias"), got, without):
        assert np.array_equal(np64(a), np64(b)), name


def test_glue_packs_only_where_the_backward_takes_tensor_cores(monkeypatch):
    # float32 x (the FP32 backward kernel) or below MMA_MIN_ELEMENTS: the plain glue kernel
    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(coefficients, "GLUE_PACKS", True)
    for dtype in (mx.float32, mx.bfloat16):
        x, phi, alpha, bias = _dynamic_inputs(5, 4, 8, dtype)
        outputs = coefficients.dynamic_coefficients_forward(x, phi, alpha, bias, 4, 20, 1e-6)
        emu.launched.clear()
        coefficients.dynamic_vjp([x, phi, alpha, bias], [mx.ones(o.shape) for o in outputs[:3]], outputs, 4, 20)
        names = [name for name, *_ in emu.launched]
        assert "mhc_coefficients_dynamic_vjp_glue_after" in names, names  # (SPLIT_GLUE_SINKHORN)
        assert not any(name.endswith("_packs") for name in names), names
    with pytest.raises(ValueError, match="fragments"):
        coefficients.dynamic_vjp_x_phi(x.reshape(5, 32), phi, mx.zeros((5, 24)), mx.zeros((5,)),
                                       packed=(mx.zeros((1,)), mx.zeros((1,))))
