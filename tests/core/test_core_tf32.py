"""The compiled path stays float32-exact under TF32 matmuls, checked on the CPU by emulation.

MLX on CUDA (and Apple M5) runs float32 matmuls with TF32 inputs (10 mantissa bits) by
default. Here every product inside compiled/matmul.py is replaced by one that first rounds its
inputs to TF32 exactly as the hardware does (round to nearest, 13 low bits cleared), so the
split products' claim — float32 accuracy in forward and backward — is tested where no GPU
exists. The plain product under the same emulation must be visibly worse, or the emulation
would prove nothing.
"""

import mlx.core as mx
import numpy as np
import pytest

import reference64 as ref
from core_testlib import as_mx, assert_matches, draw, to_numpy
from mhc_mlx.compiled import matmul as split_mm
from mhc_mlx.compiled import site


def tf32(a: mx.array) -> mx.array:
    bits = a.astype(mx.float32).view(mx.uint32)
    return ((bits + 0x1000) & 0xFFFFE000).view(mx.float32)


def tf32_matmul(a, b):
    return mx.matmul(tf32(a), tf32(b))


def _clear_compiled():
    for fn in (site._pre, site._post, site._dynamic, site._static, site._layer, split_mm.exact_matmul):
        fn.cache_clear()


@pytest.fixture
def emulated_tf32(monkeypatch):
    monkeypatch.setattr(split_mm, "_mm", tf32_matmul)
    monkeypatch.setattr(site, "_needs_split", lambda: True)
    _clear_compiled()  # compiled functions traced with the real matmul must not be reused
    yield
    _clear_compiled()


def test_emulation_is_coarse_and_the_split_is_not(emulated_tf32, rng):
    a, a64 = draw(rng, (64, 300))
    b, b64 = draw(rng, (300, 24))
    exact = a64 @ b64
    plain = to_numpy(tf32_matmul(a, b))
    err_plain = np.linalg.norm(plain - exact) / np.linalg.norm(exact)
    assert err_plain > 1e-4, f"the TF32 emulation should cost ~1e-3, it cost {err_plain:.1e}"
    assert_matches(split_mm.split_product(a, b), exact, 2e-6, "split a @ b under TF32")


@pytest.mark.parametrize("a_dtype,b_dtype", [(mx.float32, mx.float32), (mx.bfloat16, mx.float32),
                                             (mx.float32, mx.float16), (mx.float16, mx.bfloat16)])
def test_split_matmul_forward_and_backward_under_tf32(emulated_tf32, rng, a_dtype, b_dtype):
    a, a64 = draw(rng, (3, 16, 40), a_dtype)
    b, b64 = draw(rng, (40, 24), b_dtype)  # broadcast over a's batch: b's gradient sums over it
    g, g64 = draw(rng, (3, 16, 24))
    fn = split_mm.exact_matmul(a_dtype in split_mm.EXACT_IN_TF32, b_dtype in split_mm.EXACT_IN_TF32)
    af, bf = a.astype(mx.float32), b.astype(mx.float32)
    out, (ga, gb) = mx.vjp(fn, [af, bf], [g])[0][0], mx.vjp(fn, [af, bf], [g])[1]
    assert_matches(out, a64 @ b64, 2e-6, "product")
    assert_matches(ga, g64 @ b64.T, 2e-6, "gradient of a")
    assert_matches(gb, np.einsum("tik,tij->kj", a64, g64), 2e-6, "gradient of b")


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_compiled_site_is_float32_exact_under_tf32(emulated_tf32, rng, dtype):
    n, C, T = 4, 96, 5
    x, x64 = draw(rng, (T, n, C), dtype)
    f, f64 = draw(rng, (T, C), dtype)
    phi, phi64 = draw(rng, (n * C, 2 * n + n * n), scale=0.05)
    alpha, alpha64 = draw(rng, (3,))
    bias, bias64 = draw(rng, (2 * n + n * n,))

    hp, hq, hr = site.mhc_coefficients(x, phi, alpha, bias)
    rp, rq, rr = ref.mhc_coefficients(x64, phi64, alpha64, bias64)
    for got, want, what in ((hp, rp, "H_pre"), (hq, rq, "H_post"), (hr, rr, "H_res")):
        assert_matches(got, want, 1e-5, what)

    # pre and post take coefficients as given: feed the same float32 values to both sides
    hp64, hq64, hr64 = to_numpy(hp), to_numpy(hq), to_numpy(hr)
    tol = 1e-5 if dtype == mx.float32 else 2e-2  # 16-bit outputs are rounded to their dtype
    assert_matches(site.mhc_pre(x, hp), ref.mhc_pre(x64, hp64), tol, "pre")
    assert_matches(site.mhc_post(x, f, hq, hr), ref.mhc_post(x64, f64, hq64, hr64), tol, "post")

    # gradient of a float32 loss through post: cotangent products split too
    W, W64 = draw(rng, (T, n, C))

    def loss(x, H_res):
        return (site.mhc_post(x, f, hq, H_res).astype(mx.float32) * W).sum()

    gx, gr = mx.grad(loss, argnums=(0, 1))(x.astype(mx.float32), hr)
    assert_matches(gx, np.einsum("tij,tic->tjc", hr64, W64), 1e-5, "d loss / d x")
    assert_matches(gr, np.einsum("tic,tjc->tij", W64, to_numpy(x)), 1e-5, "d loss / d H_res")


def test_16_bit_factors_are_not_split(emulated_tf32, rng, monkeypatch):
    # x cast up from bfloat16 is exact in TF32: x @ phi is one GEMM over [phi_hi | phi_lo]
    calls = []
    monkeypatch.setattr(split_mm, "_mm", lambda a, b: calls.append((a.shape, b.shape)) or tf32_matmul(a, b))
    x = as_mx(rng.standard_normal((8, 4 * 32)), mx.bfloat16)
    phi = as_mx(rng.standard_normal((4 * 32, 24)))
    split_mm.split_product(x.astype(mx.float32), phi, a_exact=True)
    assert calls == [((8, 128), (128, 48))]


@pytest.mark.parametrize("backend,arch,expected", [
    ("cuda", "", True),
    ("metal", "applegpu_g15s", False),   # M3 class: full float32 matmuls, no split needed
    ("metal", "applegpu_g16d", False),
    ("metal", "applegpu_g17s", True),    # M5 class: neural accelerators round like TF32
    ("metal", "applegpu_g17p", False),   # 'p' parts need generation 18
    ("metal", "applegpu_g18p", True),
    ("metal", "something-new", True),    # unreadable: split (always exact)
    (None, "x86_64", False),
])
def test_which_gpus_get_split_matmuls(monkeypatch, backend, arch, expected):
    from mhc_mlx.kernels import build

    monkeypatch.setattr(build, "gpu_backend", lambda: backend)
    monkeypatch.setattr(mx, "device_info", lambda *a: {"architecture": arch})
    split_mm._gpu_rounds_fp32_matmul.cache_clear()
    try:
        assert split_mm._gpu_rounds_fp32_matmul() is expected
    finally:
        split_mm._gpu_rounds_fp32_matmul.cache_clear()


def test_no_split_on_the_cpu_or_when_tf32_is_off(monkeypatch):
    monkeypatch.setattr(split_mm, "_gpu_rounds_fp32_matmul", lambda: True)
    if mx.default_device() == mx.gpu:
        monkeypatch.setenv("MLX_ENABLE_TF32", "0")
    assert split_mm.needs_split() is False
