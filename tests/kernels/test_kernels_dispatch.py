"""Which path each op takes, per backend and shape, and the Metal first-use safety net."""

import warnings

import mlx.core as mx
import pytest

import mhc_mlx as mhc
from mhc_mlx import dispatch, kernels
from mhc_mlx.kernels import build, layer, safety

OPS_ARGS = {
    "sinkhorn_knopp": lambda n: (mx.zeros((2, n, n)),),
    "mhc_coefficients": lambda n: (mx.zeros((3, n, 8)), mx.zeros((8 * n, 2 * n + n * n)), mx.zeros((3,)),
                                   mx.zeros((2 * n + n * n,))),
    "mhc_pre": lambda n: (mx.zeros((3, n, 8)), mx.zeros((n,))),
    "mhc_post": lambda n: (mx.zeros((3, n, 8)), mx.zeros((3, 8)), mx.zeros((n,)), mx.zeros((n, n))),
    "mhc_layer": lambda n: (mx.zeros((3, n, 8)),),
}


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend this MLX has the given GPU backend (the kernels themselves are never launched)."""

    def use(backend):
        monkeypatch.setattr(build, "gpu_backend", lambda: backend)
        monkeypatch.setattr(kernels, "gpu_backend", lambda: backend)
        monkeypatch.setattr(kernels, "on_gpu", lambda *a: True)
        safety.reset()

    yield use
    safety.reset()


def test_cpu_takes_the_compiled_path_and_says_why():
    if build.gpu_backend() is not None:
        pytest.skip("this MLX has a GPU backend")
    for op, make in OPS_ARGS.items():
        assert kernels.kernel_for(op, *make(4)) is None
        assert "CPU only" in kernels.why_not(op)
        assert dispatch.explain(op).startswith("compiled")
        assert dispatch.choose(op, *make(4))[0] == "compiled"
    with dispatch.use_backend("kernels"):
        with pytest.raises(RuntimeError, match="no kernel can run"):
            dispatch.choose("mhc_pre", *OPS_ARGS["mhc_pre"](4))


def test_cuda_dispatch_by_shape(fake_gpu):
    fake_gpu("cuda")
    for op, make in OPS_ARGS.items():
        assert callable(kernels.kernel_for(op, *make(4))), op
        assert kernels.why_not(op) == ""
        assert dispatch.explain(op).startswith("kernels")
    # n above the kernels' limit (dynamic coefficients too: 8 < n <= 32 by their wide-n path),
    # rms_norm: compiled.
    assert kernels.kernel_for("mhc_pre", *OPS_ARGS["mhc_pre"](33)) is None
    assert "n=33" in kernels.why_not("mhc_pre", *OPS_ARGS["mhc_pre"](33))
    assert callable(kernels.kernel_for("mhc_coefficients", *OPS_ARGS["mhc_coefficients"](32)))
    assert kernels.kernel_for("mhc_coefficients", *OPS_ARGS["mhc_coefficients"](33)) is None
    static = OPS_ARGS["mhc_coefficients"](16)
    assert callable(kernels.kernel_for("mhc_coefficients", static[0], None, None, static[3]))
    assert kernels.kernel_for("rms_norm", mx.zeros((2, 8)), None) is None
    assert "mx.fast.rms_norm" in kernels.why_not("rms_norm")
    assert kernels.kernel_for("mhc_pre", mx.zeros((3, 4, 8), dtype=mx.int32), mx.zeros((4,))) is None
    # forcing a path still wins
    with dispatch.use_backend("reference"):
        assert dispatch.choose("mhc_pre", *OPS_ARGS["mhc_pre"](4))[0] == "reference"


def test_layer_policy_picks_latency_or_throughput_form(fake_gpu):
    fake_gpu("cuda")
    x = mx.zeros((3, 4, 8))
    assert kernels.kernel_for("mhc_layer", x, policy="latency", threads_per_group=64).keywords == {
        "inline": True, "threads": 64}
    assert kernels.kernel_for("mhc_layer", x, policy="throughput").keywords["inline"] is False
    assert kernels.kernel_for("mhc_layer", x, policy="auto").keywords["inline"] is None
    # auto: one launch (coefficients inside) for few tokens, two above
    assert layer.LATENCY_TOKENS >= 1


def test_metal_kernel_that_fails_its_first_use_check_warns_once_and_falls_back(fake_gpu, monkeypatch):
    fake_gpu("metal")
    monkeypatch.delenv(build.ENV_DISABLE_METAL, raising=False)
    args = OPS_ARGS["mhc_pre"](4)
    # On Linux a Metal kernel builds but cannot run: exactly a first-use failure.
    with pytest.warns(RuntimeWarning, match="failed its first-use check"):
        assert kernels.kernel_for("mhc_pre", *args) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert kernels.kernel_for("mhc_pre", *args) is None
    assert safety.result("mhc_pre").startswith("failed")
    assert "first use" in kernels.why_not("mhc_pre")
    assert kernels.status()["mhc_pre"]["metal_check"].startswith("failed")
    assert dispatch.choose("mhc_pre", *args)[0] == "compiled"
    # and the public op still computes the right thing
    x = mx.random.normal((3, 4, 8))
    h = mx.random.uniform(shape=(4,))
    assert mx.allclose(mhc.mhc_pre(x, h), mx.sum(h[:, None] * x, axis=-2), atol=1e-5)


def test_metal_checks_can_run_before_a_compiled_step(fake_gpu, monkeypatch):
    # kernels.check_metal_kernels(): every op's first-use check, eagerly (the training loop calls
    # it before compiling its step). On Linux a Metal kernel cannot run: every check fails, each
    # op warns once and takes the compiled path; on CUDA (or with Metal off) nothing to check.
    fake_gpu("cuda")
    assert kernels.check_metal_kernels() == {}
    fake_gpu("metal")
    monkeypatch.delenv(build.ENV_DISABLE_METAL, raising=False)
    with pytest.warns(RuntimeWarning, match="failed its first-use check"):
        results = kernels.check_metal_kernels()
    assert set(results) == set(kernels.OPS) - {"rms_norm"}
    assert all(r.startswith("failed") for r in results.values())
    assert dispatch.choose("mhc_post", *OPS_ARGS["mhc_post"](4))[0] == "compiled"
    monkeypatch.setenv(build.ENV_DISABLE_METAL, "1")
    assert kernels.check_metal_kernels() == {}


def test_disable_metal_env(fake_gpu, monkeypatch):
    fake_gpu("metal")
    monkeypatch.setenv(build.ENV_DISABLE_METAL, "1")
    assert kernels.kernel_for("mhc_post", *OPS_ARGS["mhc_post"](4)) is None
    assert "MHC_MLX_DISABLE_METAL" in kernels.why_not("mhc_post")


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="unknown op"):
        kernels.why_not("mhc_everything")
