"""On a GPU (CUDA or Metal): kernels against the float64 statement of the math, outputs
poisoned with NaN so unwritten elements fail. The full sweep is scripts/gpu_check.py."""

import mlx.core as mx
import numpy as np
import pytest

import kernels_ref64 as ref64
from mhc_mlx.kernels import build, coefficients, layer, sinkhorn, site

pytestmark = pytest.mark.gpu
TOL = {mx.float32: 1e-5, mx.bfloat16: 2e-2, mx.float16: 2e-2}


@pytest.fixture(autouse=True)
def poisoned():
    build.poison_outputs(float("nan"))
    yield
    build.poison_outputs(None)


def np64(a):
    return np.array(a.astype(mx.float32)).astype(np.float64)


@pytest.mark.parametrize("n", [1, 4, 32])
def test_sinkhorn(n):
    L = 3 * mx.random.normal((5, n, n))
    assert ref64.rel_err(np64(sinkhorn.sinkhorn_knopp(L, 20)), ref64.sinkhorn(np64(L), 20)) <= 1e-5


@pytest.mark.parametrize("thread", [False, True])
@pytest.mark.parametrize("n,M", [(2, 3), (4, 70)])
def test_sinkhorn_backward(monkeypatch, n, M, thread):
    # the warp form and the one-thread-per-matrix candidate against float64 central differences
    monkeypatch.setattr(sinkhorn, "THREAD_VJP_MAX_WORK", sinkhorn.THREAD_VJP_DEFAULT_WORK if thread else 0)
    L, g = 2 * mx.random.normal((M, n, n)), mx.random.normal((M, n, n))
    got = np64(sinkhorn.project_vjp(L, g, 20))
    L64, g64, fd = np64(L), np64(g), np.zeros((M, n, n))
    for i, j in np.ndindex(n, n):
        up, down = L64.copy(), L64.copy()
        up[:, i, j] += 1e-6
        down[:, i, j] -= 1e-6
        fd[:, i, j] = ((ref64.sinkhorn(up, 20) - ref64.sinkhorn(down, 20)) * g64).sum(axis=(1, 2)) / 2e-6
    assert ref64.rel_err(got, fd) <= 1e-4


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("n,C", [(4, 33), (3, 64), (32, 40)])
def test_pre_post(dtype, n, C):
    x = mx.random.normal((6, n, C)).astype(dtype)
    f = mx.random.normal((6, C)).astype(dtype)
    hp, hq, hr = mx.random.uniform(shape=(6, n)), mx.random.uniform(shape=(n,)), mx.random.uniform(shape=(n, n))
    assert ref64.rel_err(np64(site.mhc_pre(x, hp)), ref64.pre(np64(x), np64(hp))) <= TOL[dtype]
    assert ref64.rel_err(np64(site.mhc_post(x, f, hq, hr)),
                         ref64.post(np64(x), np64(f), np64(hq), np64(hr))) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_dynamic_coefficients(dtype):
    n, C, T = 4, 96, 37
    x = mx.random.normal((T, n, C)).astype(dtype)
    phi = mx.random.normal((n * C, 24)) / 20
    alpha, bias = mx.array([0.7, 0.4, 1.1]), mx.random.normal((24,))
    got = coefficients.mhc_coefficients(x, phi, alpha, bias, 20, 1e-6)
    want = ref64.coefficients(np64(x), np64(phi), np64(alpha), np64(bias), 20, 1e-6)
    for g, w in zip(got, want):
        assert ref64.rel_err(np64(g), w) <= 1e-5


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_dynamic_coefficients_with_pre_in_one_launch(dtype):
    # the fused read step's one-launch forward (coefficients.DYNAMIC_PRE; CUDA and Metal source)
    n, C, T = 4, 97, 21
    x = mx.random.normal((T, n, C)).astype(dtype)
    phi = mx.random.normal((n * C, 24)) / 20
    alpha, bias = mx.array([0.7, 0.4, 1.1]), mx.random.normal((24,))
    *five, h = coefficients.dynamic_read_forward(x.reshape(T, n * C), phi, alpha, bias, n, 20, 1e-6, form="kernel")
    want = ref64.coefficients(np64(x), np64(phi), np64(alpha), np64(bias), 20, 1e-6)
    for g, w in zip(five[:3], want):
        assert ref64.rel_err(np64(g), w.reshape(g.shape)) <= 1e-5
    assert ref64.rel_err(np64(h), ref64.pre(np64(x), np64(five[0]))) <= TOL[dtype]
    assert np.array_equal(np64(h), np64(site.pre_forward(x, five[0])))  # pre's own kernel's sums


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("n,C,T", [(4, 97, 3), (8, 33, 2), (1, 700, 1), (4, 512, 1), (3, 1000, 2)])
@pytest.mark.parametrize("one_launch", [False, True])
def test_dynamic_coefficients_one_threadgroup_per_token(monkeypatch, dtype, n, C, T, one_launch):
    # the few-token forms (default up to 16 tokens), on the GPU: the split form (default), or
    # DYNAMIC_ONE (coefficients.ONE_LAUNCH_SMALL) where it applies
    monkeypatch.setattr(coefficients, "SMALL_TOKENS", 16)
    monkeypatch.setattr(coefficients, "ONE_LAUNCH_SMALL", one_launch)
    W = n * (n + 2)
    x = mx.random.normal((T, n, C)).astype(dtype)
    phi = mx.random.normal((n * C, W)) / np.sqrt(n * C)
    alpha, bias = mx.array([0.7, 0.4, 1.1]), mx.random.normal((W,))
    *five, h = coefficients.dynamic_read_forward(x.reshape(T, n * C), phi, alpha, bias, n, 20, 1e-6, form="kernel")
    alone = coefficients.dynamic_forward(x.reshape(T, n * C), phi, alpha, bias, n, 20, 1e-6, form="kernel")
    want = ref64.coefficients(np64(x), np64(phi), np64(alpha), np64(bias), 20, 1e-6)
    for g, a, w in zip(five[:3], alone[:3], want):
        assert ref64.rel_err(np64(g), w.reshape(g.shape)) <= 1e-5
        assert np.array_equal(np64(g), np64(a))
    assert ref64.rel_err(np64(h), ref64.pre(np64(x), np64(five[0]))) <= TOL[dtype]
    assert np.array_equal(np64(h), np64(site.pre_forward(x, five[0])))


@pytest.mark.parametrize("inline", [True, False])
def test_layer(inline):
    n, C, T = 4, 515, 9
    x = mx.random.normal((T, n, C))
    p = [mx.random.normal((n,)), mx.random.normal((n,)), mx.random.normal((n, n)), mx.random.uniform(0.5, 1.5, (C,))]
    got = layer.mhc_layer(x, *p, 20, 1e-5, inline=inline)
    want = ref64.layer(np64(x), *[np64(a) for a in p], 20, 1e-5)
    assert ref64.rel_err(np64(got), want) <= 1e-5


@pytest.mark.parametrize("dynamic,tensor_cores", [(True, False), (False, False), (True, True)])
def test_chained_x_cotangent_gradients(monkeypatch, dynamic, tensor_cores):
    # kernels.CHAIN_X_COTANGENT (on): a HyperConnection's gradients on the GPU against the
    # reference backend's float32 autodiff (CUDA: the chain is CUDA-only, elsewhere a no-op);
    # tensor_cores: bfloat16 x through the tensor-core backward, whose DX kernel adds the chain's
    # cotangent (ACC)
    import mhc_mlx as mhc
    from mhc_mlx import dispatch, kernels

    monkeypatch.setattr(kernels, "CHAIN_X_COTANGENT", True)
    monkeypatch.setattr(coefficients, "MMA_VJP", tensor_cores)
    n, C, T = 4, 136, 9
    hc = mhc.HyperConnection(C, n, dynamic=dynamic, init="paper")
    names = ["phi", "alpha", "bias"] if dynamic else ["bias"]
    hc.update({"bias": mx.random.normal(hc.bias.shape),
               **({"phi": mx.random.normal(hc.phi.shape) / 20} if dynamic else {})})
    params = [getattr(hc, k) for k in names]
    dt = mx.bfloat16 if tensor_cores else mx.float32
    # drawn in dt, so the float32 reference sees the kernels' very inputs (as the one-pass test)
    x, cot = (mx.random.normal((T, n, C)).astype(dt).astype(mx.float32) for _ in range(2))
    w = mx.random.normal((C,))

    def site_fn(x_, *ps):
        hc.update(dict(zip(names, ps)))
        return hc(x_, lambda h: (h.astype(mx.float32) * w).astype(h.dtype))

    _, got = mx.vjp(site_fn, [x.astype(dt), *params], [cot.astype(dt)])
    with dispatch.use_backend("reference"), mx.stream(mx.cpu):  # the CPU: no TF32 matmuls
        _, want = mx.vjp(site_fn, [x, *params], [cot])
        mx.eval(want)
    for g, r in zip(got, want):
        assert ref64.rel_err(np64(g), np64(r)) <= (2e-2 if tensor_cores else 1e-4)


def _coefficient_gradients_match_the_reference(args, cots):
    """The dynamic coefficients' gradients (x, phi, alpha, bias) on the GPU against the
    reference's on the CPU (no TF32 there), each within 1e-4 of max(its norm, 1 % of the largest)."""
    from mhc_mlx import reference

    _, got = mx.vjp(lambda *a: coefficients.mhc_coefficients(*a, 20, 1e-6), args, cots)
    with mx.stream(mx.cpu):
        _, want = mx.vjp(lambda *a: reference.mhc_coefficients(*a, 20, 1e-6), args, cots)
        mx.eval(want)
    top = max(float(np.linalg.norm(np64(w))) for w in want)
    for a, b in zip(got, want):
        err = float(np.linalg.norm(np64(a) - np64(b)))
        assert err <= 1e-4 * max(float(np.linalg.norm(np64(b))), 0.01 * top)


@pytest.mark.parametrize("glue,split", [(False, False), (True, False), (True, True)])
def test_dynamic_coefficient_gradients(monkeypatch, glue, split):
    # the dynamic coefficient backward (glue as MLX ops, DYNAMIC_VJP_GLUE, or the Sinkhorn
    # backward on row lanes then the glue after it; then the x/phi kernel) against the
    # reference on the CPU
    monkeypatch.setattr(coefficients, "FUSED_VJP_GLUE", glue)
    monkeypatch.setattr(coefficients, "SPLIT_GLUE_SINKHORN", split)
    n, C, T = 4, 96, 37
    x = mx.random.normal((T, n, C))
    args = [x, mx.random.normal((n * C, 24)) / 20, mx.array([0.7, 0.4, 1.1]), mx.random.normal((24,))]
    cots = [mx.random.normal((T, n)), mx.random.normal((T, n)), mx.random.normal((T, n, n))]
    _coefficient_gradients_match_the_reference(args, cots)


@pytest.mark.parametrize("n", [9, 32])
def test_wide_n_dynamic_coefficients(monkeypatch, n):
    # coefficients.WIDE_N (8 < n <= 32 on the kernel path) on the GPU: coefficients
    # against float64, gradients against the reference on the CPU
    monkeypatch.setattr(coefficients, "WIDE_N", True)
    C, T = 33, 7
    W = n * (n + 2)
    x = mx.random.normal((T, n, C))
    args = [x, mx.random.normal((n * C, W)) / np.sqrt(n * C), mx.array([0.7, 0.4, 1.1]), mx.random.normal((W,))]
    got_out = coefficients.mhc_coefficients(*args, 20, 1e-6)
    want_out = ref64.coefficients(*[np64(a) for a in args], 20, 1e-6)
    for g, w in zip(got_out, want_out):
        assert ref64.rel_err(np64(g), w) <= 1e-5
    cots = [mx.random.normal((T, n)), mx.random.normal((T, n)), mx.random.normal((T, n, n))]
    _coefficient_gradients_match_the_reference(args, cots)


@pytest.mark.parametrize("fused_coefficients", [False, True])
@pytest.mark.parametrize("T", [9, 40])
def test_layer_gradients(monkeypatch, T, fused_coefficients):
    # the layer backward (LAYER_VJP, then the coefficient gradients as MLX ops or, the candidate,
    # COEFFICIENTS_VJP; above 16 tokens with the forward's coefficients reused) against the
    # reference on the CPU
    monkeypatch.setattr(layer, "FUSED_COEFFICIENT_VJP", fused_coefficients)

    n, C = 4, 260
    x = mx.random.normal((T, n, C))
    p = [mx.random.normal((n,)), mx.random.normal((n,)), 2 * mx.random.normal((n, n)), mx.random.uniform(0.5, 1.5, (C,))]
    _layer_gradients_match_the_reference([x, *p], mx.random.normal((T, n, C)))


def _layer_gradients_match_the_reference(primals, g):
    """The layer's gradients here against the reference's on the CPU: each within 1e-4 of its
    norm or of 1 % of the largest."""
    from mhc_mlx import reference

    _, got = mx.vjp(lambda *a: layer.mhc_layer(*a, 20, 1e-5), primals, [g])
    with mx.stream(mx.cpu):
        _, want = mx.vjp(lambda *a: reference.mhc_layer(*a, 20, 1e-5), primals, [g])
        mx.eval(want)
    top = max(float(np.linalg.norm(np64(w))) for w in want)
    for a, b in zip(got, want):
        err = float(np.linalg.norm(np64(a) - np64(b)))
        assert err <= 1e-4 * max(float(np.linalg.norm(np64(b))), 0.01 * top)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
# (32, 2048, 1) and (16, 4096, 1): 255 registers a thread, so at most 256 threads (LATENCY_MAX_THREADS_WIDE)
@pytest.mark.parametrize("n,C,T", [(4, 512, 1), (4, 2056, 2), (8, 100, 16), (1, 33, 3), (32, 300, 1), (32, 2048, 1),
                                   (16, 4096, 1)])
def test_layer_latency_path(monkeypatch, dtype, n, C, T):
    # T <= LATENCY_TOKENS: LAYER_LATENCY (eps and the iterations in its template) under one
    # mx.compile (build.COMPILE_LATENCY): against float64; equal to the eager launch; and new
    # parameter values of the same shapes are used (inputs of the compiled function, not
    # constants of its trace)
    x = mx.random.normal((T, n, C)).astype(dtype)
    p = [mx.random.normal((n,)), mx.random.normal((n,)), 2 * mx.random.normal((n, n)),
         mx.random.uniform(0.5, 1.5, (C,))]
    for eps in (1e-5, 0.5):
        got = layer.mhc_layer(x, *p, 20, eps)
        assert ref64.rel_err(np64(got), ref64.layer(np64(x), *[np64(a) for a in p], 20, eps)) <= TOL[dtype]
        monkeypatch.setattr(build, "COMPILE_LATENCY", False)
        eager = layer.mhc_layer(x, *p, 20, eps)
        monkeypatch.setattr(build, "COMPILE_LATENCY", True)
        assert np.array_equal(np64(got), np64(eager))
    p = [a + 0.5 for a in p]
    for iters in (20, 7):  # 20: the function compiled above, on the new values
        got = layer.mhc_layer(x, *p, iters, 1e-5)
        assert ref64.rel_err(np64(got), ref64.layer(np64(x), *[np64(a) for a in p], iters, 1e-5)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("T", [1, 16, 17])
def test_dynamic_site_latency_path(monkeypatch, dtype, T):
    # up to build.LATENCY_COMPILE_TOKENS tokens the dynamic read step and post run under
    # mx.compile: the site's output equals the eager path's, its gradients match them, and new
    # parameter values (same shapes) are used, not the trace's
    import mhc_mlx as mhc

    n, C = 4, 512
    hc = mhc.HyperConnection(C, n, init="paper")
    x = mx.random.normal((T, n, C)).astype(dtype)
    g = mx.random.normal((T, n, C)).astype(dtype)

    def site_fn(x, phi, alpha, bias):
        hc.phi, hc.alpha, hc.bias = phi, alpha, bias
        h, coeffs = hc.pre(x)
        return hc.post(x, h * 0.5, coeffs)

    def run(params, compile_latency):
        monkeypatch.setattr(build, "COMPILE_LATENCY", compile_latency)
        (out,), grads = mx.vjp(site_fn, [x, *params], [g])
        mx.eval(out, grads)
        return out, grads

    params = [0.05 * mx.random.normal(hc.phi.shape), mx.array([0.3, 0.2, 0.1]), 0.5 * mx.random.normal(hc.bias.shape)]
    for p in (params, [a * 1.5 + 0.01 for a in params]):
        out, grads = run(p, True)
        want_out, want_grads = run(p, False)
        assert np.array_equal(np64(out), np64(want_out))
        for a, b in zip(grads, want_grads):
            assert ref64.rel_err(np64(a), np64(b)) <= 1e-5


def test_layer_latency_path_gradients_under_a_users_compile():
    # the compiled latency path inside a user's mx.compile of a vjp, and under mx.vjp alone
    from mhc_mlx import reference

    n, C, T = 4, 260, 2
    primals = [mx.random.normal((T, n, C)), mx.random.normal((n,)), mx.random.normal((n,)),
               2 * mx.random.normal((n, n)), mx.random.uniform(0.5, 1.5, (C,))]
    g = mx.random.normal((T, n, C))
    step = mx.compile(lambda *a: mx.vjp(lambda *b: layer.mhc_layer(*b, 20, 1e-5), list(a), [g]))
    (y,), got = step(*primals)
    _layer_gradients_match_the_reference(primals, g)
    with mx.stream(mx.cpu):
        (want_y,), want = mx.vjp(lambda *a: reference.mhc_layer(*a, 20, 1e-5), primals, [g])
        mx.eval(want_y, want)
    assert ref64.rel_err(np64(y), np64(want_y)) <= 1e-5
    top = max(float(np.linalg.norm(np64(w))) for w in want)
    for a, b in zip(got, want):
        assert float(np.linalg.norm(np64(a) - np64(b))) <= 1e-4 * max(float(np.linalg.norm(np64(b))), 0.01 * top)


@pytest.mark.parametrize("n,T", [(16, 3), (32, 1), (32, 17)])
def test_wide_layer_forward_and_gradients(n, T):
    # above layer.MAX_N_FUSED: the single launch at T <= LATENCY_TOKENS (layer.INLINE_MAX_N, its
    # register spills at n = 32), the composite with mx.fast.rms_norm above; the backward is the
    # composite's either way. Forward against float64, gradients against the reference on the CPU
    C = 300
    x = mx.random.normal((T, n, C))
    p = [mx.random.normal((n,)), mx.random.normal((n,)), 2 * mx.random.normal((n, n)), mx.random.uniform(0.5, 1.5, (C,))]
    got = layer.mhc_layer(x, *p, 20, 1e-5)
    assert ref64.rel_err(np64(got), ref64.layer(np64(x), *[np64(a) for a in p], 20, 1e-5)) <= 1e-5
    _layer_gradients_match_the_reference([x, *p], mx.random.normal((T, n, C)))


def test_compiled_path_is_float32_exact_on_gpu():
    """On CUDA, MLX runs float32 matmuls in TF32 by default (MLX_ENABLE_TF32=1), ~1e-3 relative;
    the compiled path's pre/post/coefficients are matmuls, so on a GPU it splits each factor
    into a bfloat16-exact high part and the rest (compiled/site.py) to stay float32-exact."""
    from mhc_mlx import compiled

    n, C = 4, 4096
    x = mx.random.normal((16, n, C))
    f = mx.random.normal((16, C))
    hq, hr = mx.random.uniform(shape=(16, n)), mx.random.uniform(shape=(16, n, n))
    got = compiled.mhc_post(x, f, hq, hr)
    assert ref64.rel_err(np64(got), ref64.post(np64(x), np64(f), np64(hq), np64(hr))) <= 1e-5


@pytest.mark.parametrize("x_dtype", [mx.float32, mx.bfloat16])
def test_compiled_path_gradients_are_float32_exact_on_gpu(x_dtype):
    """The backward's matmuls split too (compiled/matmul.py): autodiff through the split
    forward would run the cotangent products in plain TF32 (~1e-3)."""
    from mhc_mlx import compiled

    n, C, T = 4, 2048, 16
    x = mx.random.normal((T, n, C)).astype(x_dtype).astype(mx.float32)
    f = mx.random.normal((T, C))
    hq, hr = mx.random.uniform(shape=(T, n)), mx.random.uniform(shape=(T, n, n))
    W = mx.random.normal((T, n, C))

    def loss(x, f, hq, hr):
        return (compiled.mhc_post(x, f, hq, hr) * W).sum()

    gx, gf, gq, gr = mx.grad(loss, argnums=(0, 1, 2, 3))(x, f, hq, hr)
    x64, f64, W64, hq64, hr64 = np64(x), np64(f), np64(W), np64(hq), np64(hr)
    assert ref64.rel_err(np64(gx), np.einsum("tij,tic->tjc", hr64, W64)) <= 1e-5
    assert ref64.rel_err(np64(gf), np.einsum("ti,tic->tc", hq64, W64)) <= 1e-5
    assert ref64.rel_err(np64(gq), np.einsum("tic,tc->ti", W64, f64)) <= 1e-5
    assert ref64.rel_err(np64(gr), np.einsum("tic,tjc->tij", W64, x64)) <= 1e-5


@pytest.mark.parametrize("op", ["sinkhorn_knopp", "mhc_coefficients", "mhc_pre", "mhc_post", "mhc_layer"])
def test_first_use_checks_pass_on_this_gpu(op):
    # kernels.safety's checks (a Mac runs them before trusting its Metal kernels) on this GPU's
    # kernels: every case (n = 4 in each dtype, n = 16) within the check's tolerances, so a
    # correct kernel does not fail them on real hardware (outputs NaN-poisoned, as elsewhere here)
    from mhc_mlx import kernels
    from mhc_mlx.kernels import safety

    for n, dtype in safety.CASES:
        safety._check_case(op, kernels._implementation(op), n, dtype)


@pytest.mark.parametrize("wg", [False, True])
@pytest.mark.parametrize("T", [1, 130])
def test_glue_writes_the_tensor_core_fragments(monkeypatch, T, wg):
    # the candidate coefficients.GLUE_PACKS on the GPU: the glue kernel's fragments of gs equal
    # pack_a's and pack_b's (wg: pack_gs_wg's, DPHI_WG's order on Hopper) bit for bit (outputs
    # NaN-poisoned: an unwritten element fails)
    from mhc_mlx.kernels import coefficients_mma, coefficients_mma_vjp as cmv

    if build.gpu_backend() != "cuda":
        pytest.skip("the tensor-core backward and its fragments are CUDA only")
    if wg and not coefficients_mma.hopper():
        pytest.skip("DPHI_WG's order is for Hopper GPUs (warpgroup MMA)")
    n, C = 4, 24
    W = n * (n + 2)
    x = mx.random.normal((T, n, C)).astype(mx.bfloat16)
    phi = mx.random.normal((n * C, W)) / np.sqrt(n * C)
    alpha, bias = mx.random.uniform(0.2, 1.5, (3,)), mx.random.normal((W,))
    H_pre, H_post, _, m, invr = coefficients.dynamic_coefficients_forward(x, phi, alpha, bias, n, 20, 1e-6)
    cots = [mx.random.normal((T, n)), mx.random.normal((T, n)), mx.random.normal((T, n, n))]
    gs, *_, (gsa, gsb) = coefficients._glue_kernel(m, invr, alpha, bias, H_pre, H_post, cots, n, n * C, 20,
                                                    packs=True, wg=wg)
    dphi_order = cmv.pack_gs_wg(gs) if wg else cmv.pack_b(gs, cmv.DPHI_PARTS, False)
    for got, want in ((gsa, cmv.pack_a(gs, cmv.DX_PARTS)), (gsb, dphi_order)):
        assert got.shape == want.shape
        assert np.array_equal(np64(got), np64(want))


@pytest.mark.parametrize("T,n,C", [(37, 4, 256), (4096, 4, 4096), (50, 2, 64), (16, 1, 128)])
def test_one_pass_vjp_candidate(monkeypatch, T, n, C):
    # kernels/one_pass_vjp.py (a candidate, CUDA only): its two forms (dx by the FP32 DX, "split",
    # or by the tensor-core DX adding both shares, "mma") give the same partials and glue bit for
    # bit, and each matches the kernels they would replace within bf16 rounding
    from kernel_compare import one_pass_composed, one_pass_inputs
    from mhc_mlx.kernels import one_pass_vjp

    if build.gpu_backend() != "cuda":
        pytest.skip("one_pass_vjp is CUDA-only (the tensor-core DX, phi staged as float4s)")
    a = one_pass_inputs(T, n, C, mx.bfloat16)
    want = one_pass_composed(a, n, C)
    outs = {}
    for form in ("split", "mma"):
        monkeypatch.setattr(one_pass_vjp, "FORM", form)
        outs[form] = one_pass_vjp.one_pass_vjp(**a)
        for got, ref, tol in zip(outs[form], want, (2e-2, 1e-5, 1e-5, 1e-5, 1e-5)):
            assert ref64.rel_err(np64(got), np64(ref)) <= tol  # NaN (an element left unwritten) fails too
    for got, same in zip(outs["mma"][1:], outs["split"][1:]):
        assert np.array_equal(np64(got), np64(same))


@pytest.mark.parametrize("form", ["split", "mma"])
@pytest.mark.parametrize("T,C", [(37, 256), (4096, 4096)])
def test_one_pass_vjp_through_a_hyper_connection(monkeypatch, T, C, form):
    # kernels.ONE_PASS_VJP (candidate, CUDA only): a dynamic site's gradients with the one-pass
    # backward (the partials, the glue, then either dx) against the reference backend's float32 autodiff on
    # the CPU, as the chained forms' GPU test
    import mhc_mlx as mhc
    from kernel_compare import site_use
    from mhc_mlx import dispatch, kernels
    from mhc_mlx.kernels import one_pass_vjp

    if build.gpu_backend() != "cuda":
        pytest.skip("one_pass_vjp is CUDA-only (the tensor-core DX, phi staged as float4s)")
    monkeypatch.setattr(kernels, "ONE_PASS_VJP", True)
    monkeypatch.setattr(coefficients, "MMA_VJP", True)
    monkeypatch.setattr(one_pass_vjp, "FORM", form)
    n = 4
    hc = mhc.HyperConnection(C, n, init="paper")
    hc.update({"bias": mx.random.normal(hc.bias.shape), "phi": mx.random.normal(hc.phi.shape) / 20})
    names = ["phi", "alpha", "bias"]
    params = [getattr(hc, k) for k in names]
    # drawn in bf16, so the float32 reference sees the kernels' very inputs: with float32 draws
    # alpha's gradient missed 2e-2 once on the H200 (2.17 % at 37 x 4 x 256, split) and in 60 draws
    # on the CPU emulator reached 2.43 %; with bf16 draws 200 emulated draws stayed under 1.67 %
    # in this form and the default backward alike (a one-off check, not kept: its sums cancel, so
    # input rounding carries far)
    x, cot = (mx.random.normal((T, n, C)).astype(mx.bfloat16).astype(mx.float32) for _ in range(2))
    w = mx.random.normal((C,))
    site_fn = site_use(hc, names, "site", w)

    _, got = mx.vjp(site_fn, [x.astype(mx.bfloat16), *params], [cot.astype(mx.bfloat16)])
    with dispatch.use_backend("reference"), mx.stream(mx.cpu):  # the CPU: no TF32 matmuls
        _, want = mx.vjp(site_fn, [x, *params], [cot])
        mx.eval(want)
    _all_close(got, want, 2e-2)
    # under mx.compile, twice (the trace replayed on new inputs)
    step = mx.compile(lambda x_, c_, *ps: mx.vjp(site_fn, [x_, *ps], [c_])[1])
    first = step(x.astype(mx.bfloat16), cot.astype(mx.bfloat16), *params)
    x2, cot2 = (mx.random.normal(x.shape).astype(mx.bfloat16).astype(mx.float32) for _ in range(2))
    second = step(x2.astype(mx.bfloat16), cot2.astype(mx.bfloat16), *params)
    with dispatch.use_backend("reference"), mx.stream(mx.cpu):
        _, want2 = mx.vjp(site_fn, [x2, *params], [cot2])
        mx.eval(want2)
    _all_close(first, want, 2e-2)
    _all_close(second, want2, 2e-2)
    # two sites in one compiled step, each with its own backward
    hc2 = mhc.HyperConnection(C, n, init="paper")
    hc2.update({"bias": mx.random.normal(hc2.bias.shape), "phi": mx.random.normal(hc2.phi.shape) / 20})

    def two_sites(x_, *ps):
        hc.update(dict(zip(names, ps)))
        y = hc(x_, lambda h: (h.astype(mx.float32) * w).astype(h.dtype))
        # the second site's input rounded to bf16 in the float32 reference too, as the kernels'
        # bf16 site writes it (a no-op there): unrounded, alpha's gradient (cancelling sums)
        # missed 3e-2 once on the H200 (4.6 %, split form), and seeded draws of this step put the
        # default backward at up to 1.1 % and this form at 1.35 % (gpu_experiments two-site-draws)
        y = y.astype(mx.bfloat16).astype(y.dtype)
        return hc2(y, lambda h: (h.astype(mx.float32) * w).astype(h.dtype))

    step2 = mx.compile(lambda x_, c_, *ps: mx.vjp(two_sites, [x_, *ps], [c_])[1])
    got2 = step2(x.astype(mx.bfloat16), cot.astype(mx.bfloat16), *params)
    with dispatch.use_backend("reference"), mx.stream(mx.cpu):
        _, want3 = mx.vjp(two_sites, [x, *params], [cot])
        mx.eval(want3)
    _all_close(got2, want3, 3e-2)


def _all_close(got, want, tol):
    for g, r in zip(got, want):
        assert ref64.rel_err(np64(g), np64(r)) <= tol


@pytest.mark.parametrize("T,C", [(37, 40), (300, 33), (4096, 4096)])
def test_warpgroup_mma_products_on_hopper(monkeypatch, T, C):
    # the warpgroup-MMA products (coefficients_mma.WGMMA, coefficients_mma_vjp.DPHI_WGMMA; bf16 x,
    # n = 4, compute capability 9.x): the forward's partials equal the MMA kernel's bit for bit
    # (same splits, same order of terms per accumulator), dphi equals x^T gs in float64 within
    # float32 rounding and DPHI's bits where their token splits agree. On the real sm_90, where the
    # emulator's tests cannot reach the descriptors' reading of shared memory
    from mhc_mlx.kernels import coefficients_mma as cm
    from mhc_mlx.kernels import coefficients_mma_vjp as cmv

    if build.gpu_backend() != "cuda" or not cm.hopper():
        pytest.skip("wgmma needs a compute capability 9.x GPU (Hopper)")
    n, W = 4, 24
    K = n * C
    x = mx.random.normal((T, K)).astype(mx.bfloat16)
    phi = mx.random.normal((K, W)) / np.sqrt(K)
    sums = {}
    for on in (False, True):
        monkeypatch.setattr(cm, "WGMMA", on)
        part, ssq = cm.partial_products(x, phi)
        assert cm.wg_applies(x, W) == on
        sums[on] = [np64(mx.sum(a, axis=0)) for a in (part[..., :W], ssq)]
    x64 = np64(x)
    assert ref64.rel_err(sums[True][0], x64 @ np64(phi)) <= 1e-5
    for got, want in zip(sums[True], sums[False]):
        assert np.array_equal(got, want)
    gs = mx.random.normal((T, W)) * mx.exp(mx.random.normal((T, 1)))
    dphi = {}
    for on in (False, True):
        monkeypatch.setattr(cmv, "DPHI_WGMMA", on)
        assert cmv.dphi_wg_applies(x, W) == on
        dphi[on] = np64(cmv.dphi(x, gs))
    assert ref64.rel_err(dphi[True], x64.T @ np64(gs)) <= 1e-5
    kb, kg = -(-K // 64), -(-K // 256)
    if cmv._token_splits(T, kb, 16, cmv.TARGET_WARPS) == cmv._token_splits(T, kg, 16, cmv.DPHI_WG_TARGET_BLOCKS):
        assert np.array_equal(dphi[True], dphi[False])
