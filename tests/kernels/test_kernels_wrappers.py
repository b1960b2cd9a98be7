"""The Python side of the kernels, on the CPU: launch plans, and that every fused backward
returns one gradient per input with that input's shape (mx.custom_function does not check).

The launches are replaced by a stand-in that returns outputs of the declared shapes, so what
is tested here is the plumbing around the kernels; their numbers are checked on a GPU
(scripts/gpu_check.py and test_kernels_gpu.py)."""

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mhc_mlx.kernels import coefficients, coefficients_mma, coefficients_mma_vjp, layer, sinkhorn, site

MODULES = (coefficients, coefficients_mma, coefficients_mma_vjp, layer, sinkhorn, site)
launched = []


def _fused_dynamic(tokens: int, K: int, pre: bool = False, n: int = 4) -> str:
    """The fused dynamic coefficient kernel for this many tokens of K = n C columns (its last
    launch): up to coefficients.SMALL_TOKENS the one-launch form (coefficients.ONE_LAUNCH_SMALL,
    where n and K allow it), else the split form's finishing kernel (coefficients.SPLIT_SMALL) or
    one threadgroup per token; the tiled kernel above."""
    if tokens > coefficients.SMALL_TOKENS:
        return "mhc_coefficients_dynamic"
    if coefficients.one_launch_applies(n, K):
        return "mhc_coefficients_one"
    if coefficients.SPLIT_SMALL:
        return "mhc_coefficients_split_finish"
    return "mhc_coefficients_dynamic_small_pre" if pre else "mhc_coefficients_dynamic_small"


@pytest.fixture(autouse=True)
def stand_in_launch(monkeypatch):
    def fake(spec, inputs, outputs, grid, threadgroup, template, backend=None):
        assert grid % threadgroup == 0 and threadgroup % 32 == 0 and threadgroup <= 1024
        assert len(inputs) == len(spec.inputs) and len(outputs) == len(spec.outputs)
        launched.append((spec.name, dict(template), grid, threadgroup))
        return [mx.ones(shape, dtype) for shape, dtype in outputs]

    for m in MODULES:
        monkeypatch.setattr(m, "launch", fake)
    launched.clear()
    yield


def _grads_match_shapes(fn, primals):
    outs = fn(*primals)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    cots = [mx.ones(o.shape, o.dtype) for o in outs]
    _, grads = mx.vjp(fn, list(primals), cots)
    assert len(grads) == len(primals)
    for g, p in zip(grads, primals):
        assert tuple(g.shape) == tuple(p.shape)
        assert g.dtype == p.dtype


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_site_gradient_shapes(dtype):
    n, C = 4, 24
    x = mx.zeros((2, 3, n, C), dtype=dtype)
    f = mx.zeros((2, 3, C), dtype=dtype)
    for lead in ((), (2, 3), (2, 1), (1, 3)):
        hp, hq, hr = mx.zeros((*lead, n)), mx.zeros((*lead, n)), mx.zeros((*lead, n, n))
        _grads_match_shapes(site.mhc_pre, [x, hp])
        _grads_match_shapes(site.mhc_post, [x, f, hq, hr])


def test_wide_site_uses_matmul_for_coefficient_gradients():
    n, C = 16, 8
    x, f = mx.zeros((3, n, C)), mx.zeros((3, C))
    _grads_match_shapes(site.mhc_post, [x, f, mx.zeros((3, n)), mx.zeros((3, n, n))])
    post_vjp = [t for name, t, *_ in launched if name == "mhc_post_vjp"]
    assert post_vjp and post_vjp[-1]["HGRAD"] is False


def test_coefficient_and_sinkhorn_gradient_shapes():
    n, C = 4, 16
    x = mx.zeros((2, 3, n, C), dtype=mx.bfloat16)
    W = 2 * n + n * n
    phi, alpha, bias = mx.zeros((n * C, W)), mx.zeros((3,)), mx.zeros((W,))
    _grads_match_shapes(lambda *a: coefficients.mhc_coefficients(*a, 20, 1e-6), [x, phi, alpha, bias])
    _grads_match_shapes(lambda b: coefficients.mhc_coefficients(x, None, None, b, 20, 1e-6), [bias])
    _grads_match_shapes(lambda L: sinkhorn.sinkhorn_knopp(L, 20), [mx.zeros((2, 3, n, n))])
    # past the fused backward's size the compiled backward takes over (no vjp launch)
    launched.clear()
    _grads_match_shapes(lambda L: sinkhorn.sinkhorn_knopp(L, 40), [mx.zeros((1, 32, 32))])
    assert launched and {name for name, *_ in launched} == {"mhc_sinkhorn"}


@pytest.mark.parametrize("inline", [True, False, None])
def test_layer_gradient_shapes_and_form(inline):
    n, C = 4, 40
    x = mx.zeros((5, n, C), dtype=mx.bfloat16)
    params = [mx.zeros((n,)), mx.zeros((n,)), mx.zeros((n, n)), mx.ones((C,))]
    launched.clear()
    out = layer.mhc_layer(x, *params, 20, 1e-5, inline=inline)
    names = [name for name, *_ in launched]
    assert out.shape == x.shape
    single = inline in (True, None)  # 5 tokens <= LATENCY_TOKENS: LAYER_LATENCY, one launch
    assert names == (["mhc_layer_latency"] if single else ["mhc_coefficients_static", "mhc_layer"])
    if single:
        assert launched[-1][1]["C"] == C and launched[-1][1]["ITERS"] == 20
    else:
        assert launched[-1][1]["INLINE"] is False
    _grads_match_shapes(lambda *a: layer.mhc_layer(*a, 20, 1e-5, inline=inline), [x, *params])


@settings(max_examples=60, deadline=None)
@given(C=st.integers(1, 5000), n=st.integers(1, 32), size=st.sampled_from([2, 4]))
def test_vector_width_divides_and_fits(C, n, size):
    for budget in (32, 64, 256):
        V = site.vector_width(C, size, n, budget)
        assert V >= 1 and C % V == 0 and V * size <= 16
        assert V == 1 or n * V <= budget


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 10000), n=st.integers(1, 32), C=st.integers(1, 9000))
def test_layer_plan(T, n, C):
    V, threads, cpt, groups = layer.plan(T, n, C, 2)
    assert C % V == 0 and threads % 32 == 0 and 32 <= threads <= 256
    assert cpt == 0 or (cpt * threads * V >= C and cpt * n * V <= layer.REGISTER_BUDGET)
    assert 1 <= groups <= min(T, layer.MAX_GROUPS)


@pytest.mark.parametrize("n", range(1, 9))
def test_dynamic_coefficient_kernel_fits_metal_threadgroup_memory(n):
    W, tb = n * (n + 2), coefficients.tokens_per_block(n)
    kc = 128 if W <= 32 else 64
    tile = kc * (tb + 4) + kc * W
    smem = 4 * max(tile, 8 * tb * W) + 4 * 8 * tb
    assert smem <= 32 * 1024 and tb % 4 == 0


@pytest.mark.parametrize("T", [layer.LATENCY_TOKENS + 1, 3])
def test_wide_layer_is_composed_from_the_site_kernels(T):
    # above MAX_N_FUSED: the site kernels chained, except at T <= LATENCY_TOKENS (up to
    # INLINE_MAX_N) one launch; either way the backward is the composite's
    n, C = 16, 24
    x = mx.zeros((T, n, C))
    params = [mx.zeros((n,)), mx.zeros((n,)), mx.zeros((n, n)), mx.ones((C,))]
    launched.clear()
    assert layer.mhc_layer(x, *params, 20, 1e-5).shape == x.shape
    composite = ["mhc_coefficients_static", "mhc_pre", "mhc_post"]
    assert [name for name, *_ in launched] == (["mhc_layer_latency"] if T <= layer.LATENCY_TOKENS else composite)
    launched.clear()
    _grads_match_shapes(lambda *a: layer.mhc_layer(*a, 20, 1e-5), [x, *params])
    assert "mhc_layer_vjp" not in [name for name, *_ in launched]
    assert set(composite) <= {name for name, *_ in launched}


def test_candidate_layer_backward_gradient_shapes(monkeypatch):
    monkeypatch.setattr(layer, "USE_FUSED_VJP", True)
    n, C = 4, 40
    x = mx.zeros((5, n, C), dtype=mx.bfloat16)
    params = [mx.zeros((n,)), mx.zeros((n,)), mx.zeros((n, n)), mx.ones((C,), dtype=mx.bfloat16)]
    launched.clear()
    _grads_match_shapes(lambda *a: layer.mhc_layer(*a, 20, 1e-5, inline=True), [x, *params])
    assert "mhc_layer_vjp" in [name for name, *_ in launched]


def test_empty_batch_launches_nothing(monkeypatch):
    from mhc_mlx.kernels import build

    for m in MODULES:
        monkeypatch.setattr(m, "launch", build.launch)
    x = mx.zeros((0, 4, 8))
    assert site.mhc_pre(x, mx.zeros((4,))).shape == (0, 8)
    assert site.mhc_post(x, mx.zeros((0, 8)), mx.zeros((4,)), mx.zeros((4, 4))).shape == (0, 4, 8)
    assert sinkhorn.sinkhorn_knopp(mx.zeros((0, 4, 4)), 5).shape == (0, 4, 4)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_candidate_gemm_form_of_dynamic_coefficients(monkeypatch, dtype):
    # 16-bit x: MLX matmul + the activations kernel, no fused dynamic kernel; float32 x keeps it
    monkeypatch.setattr(coefficients, "DYNAMIC_FORM", "gemm")
    n, C = 4, 16
    x = mx.zeros((2, 3, n, C), dtype=dtype)
    W = 2 * n + n * n
    launched.clear()
    _grads_match_shapes(lambda *a: coefficients.mhc_coefficients(*a, 20, 1e-6),
                        [x, mx.zeros((n * C, W)), mx.zeros((3,)), mx.zeros((W,))])
    names = [name for name, *_ in launched]
    if dtype == mx.float32:
        assert _fused_dynamic(6, n * C) in names
    else:
        assert _fused_dynamic(6, n * C) not in names and "mhc_coefficients_static" in names
        assert "mhc_coefficients_dynamic_vjp" in names  # the backward is the same kernel
    with pytest.raises(ValueError, match="unknown dynamic coefficient form"):
        coefficients.dynamic_forward(x.reshape(6, n * C), mx.zeros((n * C, W)), mx.zeros((3,)),
                                     mx.zeros((W,)), n, 20, 1e-6, form="fast")


def test_gemm_logits_match_float64():
    # the GEMM form's logits (the kernel's m and 1/r outputs) against float64 math
    import numpy as np

    rng = np.random.default_rng()
    T, K, W = 7, 3 * 40, 15
    x = mx.array(rng.standard_normal((T, K)).astype(np.float32)).astype(mx.bfloat16)
    phi = mx.array((rng.standard_normal((K, W)) / np.sqrt(K)).astype(np.float32))
    m, invr = coefficients.gemm_logits(x, phi, 1e-6)
    x64 = np.array(x.astype(mx.float32), dtype=np.float64)
    r64 = 1.0 / np.sqrt(np.mean(x64 ** 2, axis=-1) + 1e-6)
    m64 = (x64 @ np.array(phi, dtype=np.float64)) * r64[:, None]
    assert np.linalg.norm(np.array(m) - m64) / np.linalg.norm(m64) <= 1e-6
    assert np.abs(np.array(invr) - r64).max() / r64.max() <= 1e-6


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_mma_form_of_dynamic_coefficients(monkeypatch, dtype):
    # CUDA, 16-bit x: the tensor-core kernel + the activations kernel; float32 x keeps the fused one
    from mhc_mlx.kernels import build

    monkeypatch.setattr(coefficients, "DYNAMIC_FORM", "mma")
    monkeypatch.setattr(coefficients, "MMA_MIN_ELEMENTS", 0)
    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    n, C = 4, 24
    x = mx.zeros((2, 3, n, C), dtype=dtype)
    W = 2 * n + n * n
    launched.clear()
    _grads_match_shapes(lambda *a: coefficients.mhc_coefficients(*a, 20, 1e-6),
                        [x, mx.zeros((n * C, W)), mx.zeros((3,)), mx.zeros((W,))])
    names = [name for name, *_ in launched]
    if dtype == mx.float32:
        assert "mhc_coefficients_dynamic_mma" not in names and _fused_dynamic(6, n * C) in names
    else:
        assert "mhc_coefficients_dynamic_mma" in names and _fused_dynamic(6, n * C) not in names
        # three launches: phi packed, the tensor-core partials, the finish (no MLX-op glue)
        assert {"mhc_coefficients_pack_phi", "mhc_coefficients_dynamic_finish"} <= set(names)
        template = dict(next(t for name, t, *_ in launched if name == "mhc_coefficients_dynamic_mma"))
        assert template["NT"] == 3 and template["PB"] == 3 and template["T"] == dtype


def test_cuda_only_kernel_never_runs_on_metal(monkeypatch):
    from mhc_mlx.kernels import build

    monkeypatch.setattr(coefficients, "DYNAMIC_FORM", "mma")
    monkeypatch.setattr(coefficients, "MMA_MIN_ELEMENTS", 0)
    monkeypatch.setattr(build, "gpu_backend", lambda: "metal")
    n, C = 4, 24
    W = 2 * n + n * n
    launched.clear()
    coefficients.mhc_coefficients(mx.zeros((3, n, C), dtype=mx.bfloat16), mx.zeros((n * C, W)), mx.zeros((3,)),
                                  mx.zeros((W,)), 20, 1e-6)
    names = [name for name, *_ in launched]
    assert "mhc_coefficients_dynamic_mma" not in names and _fused_dynamic(3, n * C) in names


@pytest.mark.parametrize("tokens,C", [(1, 8), (255, 4096), (256, 4096), (1000, 1280), (1024, 1024)])
def test_default_dynamic_form_is_the_fused_kernel_below_mma_min_elements(monkeypatch, tokens, C):
    # CUDA, bfloat16: one fused launch for small x (latency), the tensor-core path from
    # MMA_MIN_ELEMENTS elements of x up (throughput)
    from mhc_mlx.kernels import build

    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    n = 4
    W = 2 * n + n * n
    launched.clear()
    coefficients.mhc_coefficients(mx.zeros((tokens, n, C), dtype=mx.bfloat16), mx.zeros((n * C, W)),
                                  mx.zeros((3,)), mx.zeros((W,)), 20, 1e-6)
    names = [name for name, *_ in launched]
    if tokens * n * C >= coefficients.MMA_MIN_ELEMENTS:
        assert "mhc_coefficients_dynamic_mma" in names and _fused_dynamic(tokens, n * C) not in names
    else:
        assert _fused_dynamic(tokens, n * C) in names and "mhc_coefficients_dynamic_mma" not in names


def _last_op(a: mx.array, tmp_path) -> str:
    """The primitive that produces `a` (from MLX's DOT export of its unevaluated graph)."""
    import re

    path = tmp_path / "graph.dot"
    mx.export_to_dot(str(path), a)
    text = path.read_text()
    sink = re.search(r'rank=sink; "(\w+)"', text).group(1)
    node = re.search(r"(\d+) -> \"" + sink + '"', text).group(1)
    return re.search(node + r' \[label ="(\w+)"', text).group(1)


def test_static_coefficients_and_layer_backward_take_no_gather(monkeypatch, tmp_path):
    # the static coefficients and the layer backward reshape the kernels' [1, n] outputs: an
    # integer index ([0]) would be a gather launch in MLX's graph
    import re

    import mhc_mlx as mhc
    from mhc_mlx import kernels
    from mhc_mlx.kernels import build

    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(build, "on_gpu", lambda *a: True)
    monkeypatch.setattr(kernels, "gpu_backend", build.gpu_backend)
    monkeypatch.setattr(kernels, "on_gpu", build.on_gpu)
    n, C = 4, 24
    x = mx.zeros((40, n, C))  # 40 tokens: above the latency forms
    hc, ml = mhc.HyperConnection(C, n, dynamic=False), mhc.MHCLayer(n, C)
    mx.eval(hc.parameters(), ml.parameters())
    names = ["H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight"]

    def layer_fn(x_, *ps):
        for k, p in zip(names, ps):
            setattr(ml, k, p)
        return ml(x_)

    _, grads = mx.vjp(layer_fn, [x, *[getattr(ml, k) for k in names]], [mx.ones(x.shape)])
    path = tmp_path / "graph.dot"
    mx.export_to_dot(str(path), hc(x, lambda h: h), *grads)
    ops = re.findall(r'label ="(\w+)"', path.read_text())
    assert "CustomTransforms" in ops and "Gather" not in ops, ops


@pytest.mark.parametrize("chain", [False, True])
@pytest.mark.parametrize("form", ["dynamic", "read step", "static"])
@pytest.mark.parametrize("defer", [False, True])
def test_chained_x_cotangent_leaves_no_add_for_x(monkeypatch, tmp_path, defer, chain, form):
    # kernels.CHAIN_X_COTANGENT: x's gradient through a HyperConnection comes out of one backward
    # kernel (reshaped), not out of an MLX add of the ops' shares as without it; pre's backward
    # takes post's deferred share where pre is its own op and DEFER_POST_X is on
    import mhc_mlx as mhc
    from mhc_mlx import kernels
    from mhc_mlx.kernels import build

    monkeypatch.setattr(kernels, "CHAIN_X_COTANGENT", chain)
    monkeypatch.setattr(kernels, "FUSED_READ_STEP", form == "read step")
    monkeypatch.setattr(kernels, "DEFER_POST_X", defer)
    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(build, "on_gpu", lambda *a: True)
    monkeypatch.setattr(kernels, "gpu_backend", build.gpu_backend)
    monkeypatch.setattr(kernels, "on_gpu", build.on_gpu)
    n, C = 4, 24
    hc = mhc.HyperConnection(C, n, dynamic=form != "static")
    x = mx.zeros((2, 3, n, C), dtype=mx.bfloat16)
    mx.eval(x, hc.parameters())

    def site_fn(x_):
        h, coeffs = hc.pre(x_)
        return hc.post(x_, h * 2, coeffs)

    _, (gx,) = mx.vjp(site_fn, [x], [mx.ones(x.shape, x.dtype)])
    assert (_last_op(gx, tmp_path) == "Add") == (not chain)
    names = {name for name, *_ in launched}
    own_pre = chain and form != "read step"
    assert ("mhc_pre_vjp_acc" in names) == (own_pre and not defer)
    assert ("mhc_pre_vjp_res" in names) == (own_pre and defer)


@pytest.mark.parametrize("fused", [False, True])
def test_hyper_connection_takes_the_fused_read_step_only_when_on(monkeypatch, fused):
    # kernels.FUSED_READ_STEP (candidate): a dynamic site's read step as one custom function on
    # the kernel path; the static site, the "hc" variant and the compiled path never take it
    import mhc_mlx as mhc
    from mhc_mlx import kernels
    from mhc_mlx.kernels import build

    monkeypatch.setattr(kernels, "FUSED_READ_STEP", fused)
    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(build, "on_gpu", lambda *a: True)
    monkeypatch.setattr(kernels, "gpu_backend", build.gpu_backend)
    monkeypatch.setattr(kernels, "on_gpu", build.on_gpu)
    n, C = 4, 24
    x = mx.zeros((2, 3, n, C), dtype=mx.bfloat16)
    for dynamic, variant in ((True, "mhc"), (False, "mhc"), (True, "hc")):
        hc = mhc.HyperConnection(C, n, dynamic=dynamic, variant=variant)
        params = {k: v for k, v in hc.trainable_parameters().items()}
        names = list(params)

        def loss(x_, *ps):
            hc.update(dict(zip(names, ps)))
            return hc(x_, lambda h: h * 2).astype(mx.float32).sum()

        launched.clear()
        grads = mx.grad(loss, argnums=list(range(1 + len(names))))(x, *params.values())
        assert [tuple(g.shape) for g in grads] == [tuple(x.shape)] + [tuple(p.shape) for p in params.values()]
        # "mhc_pre_vjp_h": pre's backward without its dx (site.PRE_VJP at DX = false)
        kinds = {name + ("_h" if t.get("DX") is False else "") for name, t, *_ in launched}
        takes = fused and dynamic and variant == "mhc"
        assert ("mhc_coefficients_dynamic_vjp_pre" in kinds) == takes, (dynamic, variant, kinds)
        assert ("mhc_pre_vjp_h" in kinds) == takes
        if takes:
            assert "mhc_pre_vjp" not in kinds and "mhc_coefficients_dynamic_vjp" not in kinds
    with mhc.dispatch.use_backend("compiled"):
        launched.clear()
        mhc.HyperConnection(C, n)(x, lambda h: h)
        assert not launched


@pytest.mark.parametrize("backend,dtype,mma_min,one_launch", [
    ("cuda", mx.bfloat16, None, True),     # small x: the coefficients' kernel form
    ("cuda", mx.float32, 0, True),         # float32 x never takes the tensor-core form
    ("cuda", mx.bfloat16, 0, False)])      # the tensor-core form: two launches either way
def test_read_step_auto_only_where_its_forward_is_one_launch(monkeypatch, backend, dtype, mma_min, one_launch):
    # kernels.FUSED_READ_STEP "auto" (the default): the fused read step where the coefficients
    # and h come from one launch (CUDA, kernel form), the two ops elsewhere
    import mhc_mlx as mhc
    from mhc_mlx import kernels
    from mhc_mlx.kernels import build

    assert kernels.FUSED_READ_STEP == "auto"
    monkeypatch.setattr(build, "gpu_backend", lambda: backend)
    monkeypatch.setattr(build, "on_gpu", lambda *a: True)
    monkeypatch.setattr(kernels, "gpu_backend", build.gpu_backend)
    monkeypatch.setattr(kernels, "on_gpu", build.on_gpu)
    if mma_min is not None:
        monkeypatch.setattr(coefficients, "MMA_MIN_ELEMENTS", mma_min)
    n, C = 4, 24
    hc = mhc.HyperConnection(C, n)
    x = mx.zeros((2, 3, n, C), dtype=dtype)
    mx.eval(x, hc.parameters())
    launched.clear()
    mx.eval(hc(x, lambda h: h * 2))
    names = {name for name, *_ in launched}
    assert (_fused_dynamic(6, n * C, pre=True) in names) == one_launch, names  # 6 tokens
    assert ("mhc_pre" in names) == (not one_launch), names
    # on Metal there is no one-launch read step (the two ops' kernels carry the first-use checks)
    monkeypatch.setattr(build, "gpu_backend", lambda: "metal")
    assert not coefficients.read_step_in_one_launch(x)


@pytest.mark.parametrize("mma_min,tensor_cores", [(5 * 4 * 24, True), (5 * 4 * 24 + 1, False)])
def test_tensor_core_backward_auto_from_the_forwards_threshold(monkeypatch, mma_min, tensor_cores):
    # coefficients.MMA_VJP "auto" (the default): the tensor-core backward from
    # MMA_MIN_ELEMENTS elements of x (where the forward takes the tensor-core form), the FP32
    # kernel below (it was faster there on the H200)
    from mhc_mlx.kernels import build

    assert coefficients.MMA_VJP == "auto"
    monkeypatch.setattr(coefficients, "MMA_MIN_ELEMENTS", mma_min)
    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    n, C = 4, 24
    W = n * (n + 2)
    _grads_match_shapes(lambda *a: coefficients.mhc_coefficients(*a, 20, 1e-6),
                        [mx.zeros((5, n, C), dtype=mx.bfloat16), mx.zeros((n * C, W)), mx.zeros((3,)), mx.zeros((W,))])
    names = {name for name, *_ in launched}
    assert ("mhc_coefficients_dynamic_vjp_dx_mma" in names) == tensor_cores
    assert ("mhc_coefficients_dynamic_vjp" in names) == (not tensor_cores)


@pytest.mark.parametrize("backend,dtype,n,tensor_cores", [
    ("cuda", mx.bfloat16, 4, True), ("cuda", mx.float16, 1, True), ("cuda", mx.float32, 4, False),
    ("cuda", mx.bfloat16, 8, False), ("metal", mx.bfloat16, 4, False)])
def test_tensor_core_coefficient_backward_only_where_it_applies(monkeypatch, backend, dtype, n, tensor_cores):
    # coefficients.MMA_VJP True: CUDA, 16-bit x, n <= 4; elsewhere the FP32 kernel
    from mhc_mlx.kernels import build

    monkeypatch.setattr(coefficients, "MMA_VJP", True)
    monkeypatch.setattr(coefficients, "DYNAMIC_FORM", "kernel")
    monkeypatch.setattr(build, "gpu_backend", lambda: backend)
    C = 24
    W = n * (n + 2)
    _grads_match_shapes(lambda *a: coefficients.mhc_coefficients(*a, 20, 1e-6),
                        [mx.zeros((5, n, C), dtype=dtype), mx.zeros((n * C, W)), mx.zeros((3,)), mx.zeros((W,))])
    names = {name for name, *_ in launched}
    assert ("mhc_coefficients_dynamic_vjp_dx_mma" in names) == tensor_cores
    assert ("mhc_coefficients_dynamic_vjp_dphi_mma" in names) == tensor_cores
    assert ("mhc_coefficients_dynamic_vjp" in names) == (not tensor_cores)


@pytest.mark.parametrize("dynamic,dtype,n,mma_min,chained", [
    (True, mx.bfloat16, 4, 0, True),           # the tensor-core backward: chained
    (True, mx.float16, 2, 0, True),
    (True, mx.bfloat16, 4, None, False),       # below MMA_MIN_ELEMENTS: the FP32 backward, not chained
    (True, mx.float32, 4, 0, False),           # float32 x never takes the tensor-core backward
    (True, mx.bfloat16, 8, 0, False),          # nor n > 4
    (False, mx.bfloat16, 4, 0, False)])        # static sites: not chained
def test_chained_x_cotangent_auto_where_the_backward_takes_tensor_cores(monkeypatch, dynamic, dtype, n, mma_min,
                                                                        chained):
    # kernels.CHAIN_X_COTANGENT "auto" (the default): a HyperConnection chains x's cotangent where
    # its coefficient backward takes the tensor-core form (faster there on the H200), not elsewhere
    import mhc_mlx as mhc
    from mhc_mlx import kernels
    from mhc_mlx.kernels import build

    assert kernels.CHAIN_X_COTANGENT == "auto"
    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(build, "on_gpu", lambda *a: True)
    monkeypatch.setattr(kernels, "gpu_backend", build.gpu_backend)
    monkeypatch.setattr(kernels, "on_gpu", build.on_gpu)
    if mma_min is not None:
        monkeypatch.setattr(coefficients, "MMA_MIN_ELEMENTS", mma_min)
    C = 24
    hc = mhc.HyperConnection(C, n, dynamic=dynamic)
    x = mx.zeros((2, 3, n, C), dtype=dtype)
    mx.eval(x, hc.parameters())
    _, coeffs = hc.pre(x)
    assert (getattr(coeffs, "chain", None) is not None) == chained
    assert coefficients.backward_on_tensor_cores(x) == (chained or not dynamic)
    # on Metal never
    monkeypatch.setattr(build, "gpu_backend", lambda: "metal")
    assert not coefficients.backward_on_tensor_cores(x)


@pytest.mark.parametrize("device_params", [False, True])
def test_parameter_arrays_hold_their_values(monkeypatch, device_params):
    # build.DEVICE_PARAMS (the default) pads the arrays and copies them into GPU memory where the
    # CUDA backend exists; the kernels read only the leading values, so those must be exact
    from mhc_mlx.kernels import build

    monkeypatch.setattr(build, "DEVICE_PARAMS", device_params)
    ints, floats = build.int_params(7, 4096, 20), build.float_params(1e-5, 2.5)
    assert ints.dtype == mx.int32 and floats.dtype == mx.float32
    assert ints.tolist()[:3] == [7, 4096, 20]
    assert floats.tolist()[:2] == [mx.array(1e-5).item(), 2.5]
    padded = device_params and build._cuda_available() and mx.is_available(mx.gpu)
    assert ints.size == (build.PARAMS_PAD if padded else 3)
    assert floats.size == (build.PARAMS_PAD if padded else 2)
    assert not any(ints.tolist()[3:]) and not any(floats.tolist()[2:])
    assert build.int_params(7, 4096, 20) is ints  # cached: no new array per call


def test_static_layer_passes_its_logits_unreshaped(monkeypatch):
    # layer.FLAT_LOGITS: the two-launch form hands the [n], [n], [n, n] logits to the coefficient
    # kernel as they are (one row, M = 1), with no reshape node; False reshapes them first
    n, C = 4, 64
    x = mx.ones((32, n, C), dtype=mx.bfloat16)
    raw = [mx.zeros((n,)), mx.zeros((n,)), mx.zeros((n, n)), mx.ones((C,))]
    real = coefficients.activate
    for flat in (True, False):
        monkeypatch.setattr(layer, "FLAT_LOGITS", flat)
        seen = []

        def spy(rpre, rpost, rres, iters):
            seen.append((rpre.shape, rres.shape))
            return real(rpre, rpost, rres, iters)

        monkeypatch.setattr(coefficients, "activate", spy)
        launched.clear()
        layer.mhc_layer(x, *raw, 20, 1e-5, inline=False)
        assert seen == ([((n,), (n, n))] if flat else [((1, n), (1, n, n))])
        act = next(t for t in launched if t[0] == coefficients.ACTIVATE.name)
        assert act[2] >= 32  # one row: one warp


@pytest.mark.parametrize("n,C", [(32, 2048), (16, 4096), (9, 8192), (8, 8192), (4, 4096)])
def test_layer_latency_threadgroup_fits_wide_registers(n, C):
    # above MAX_N_FUSED the latency kernel's threads hold up to 255 registers: its threadgroup
    # (32 + S threads) must stay within LATENCY_MAX_THREADS_WIDE, or the launch fails
    x = mx.zeros((1, n, C), dtype=mx.bfloat16)
    launched.clear()
    layer.latency_forward(x, mx.zeros((n,)), mx.zeros((n,)), mx.zeros((n, n)), mx.ones((C,)), 20, 1e-5)
    name, template, grid, tg = launched[-1]
    assert name == "mhc_layer_latency" and grid == tg and tg % 32 == 0
    assert tg <= layer.LATENCY_MAX_THREADS_WIDE or n <= layer.MAX_N_FUSED


def test_unread_inputs_are_host_made_standins(monkeypatch):
    # an input a launch's template flags leave unread is build.standin's cached array, made from
    # host data: an mx.zeros made per call was one more launch (copy_s) in every dynamic backward
    from mhc_mlx.kernels import build

    seen = {}

    def recording(spec, inputs, outputs, grid, threadgroup, template, backend=None):
        seen[spec.name] = (list(inputs), dict(template))
        return [mx.ones(shape, dtype) for shape, dtype in outputs]

    for m in MODULES:
        monkeypatch.setattr(m, "launch", recording)
    T, n, C = 32, 4, 64
    x2 = mx.random.normal((T, n * C)).astype(mx.bfloat16)
    phi, gs, c2 = mx.random.normal((n * C, n * n + 2 * n)), mx.random.normal((T, n * n + 2 * n)), mx.ones((T,))
    mx.eval(x2, phi, gs, c2)
    coefficients_mma_vjp.dx(x2, phi, gs, c2)
    (_, _, _, _, hpre, dh, gacc, hres, g, _), flags = seen["mhc_coefficients_dynamic_vjp_dx_mma"]
    assert not flags["PRE"] and not flags["ACC"] and not flags["RES"]
    assert hpre is hres is build.standin(mx.float32) and dh is gacc is g is build.standin(mx.bfloat16)
    assert build.standin(mx.float32).tolist() == [0.0]
    x = x2.reshape(T, n, C)
    site.pre_vjp_coefficients(x, mx.ones((T, C), mx.bfloat16))
    inputs, flags = seen["mhc_pre_vjp"]
    assert not flags["DX"] and inputs[1] is build.standin(mx.float32)
