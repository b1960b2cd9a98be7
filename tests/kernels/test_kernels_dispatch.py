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


def test_env_reads_follow_os_environ(monkeypatch):
    # dispatch._env reads os.environ's own dict on POSIX: it must see every way os.environ changes
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    assert dispatch._env(dispatch.ENV_BACKEND) is None
    assert dispatch.forced_backend() is None
    monkeypatch.setenv(dispatch.ENV_BACKEND, " Reference ")
    assert dispatch._env(dispatch.ENV_BACKEND) == " Reference "
    assert dispatch.forced_backend() == "reference"
    monkeypatch.setenv(dispatch.ENV_BACKEND, "auto")
    assert dispatch.forced_backend() is None
    monkeypatch.setenv(dispatch.ENV_BACKEND, "fastest")
    with pytest.raises(ValueError, match="MHC_MLX_BACKEND"):
        dispatch.forced_backend()
    monkeypatch.setenv(dispatch.ENV_DISABLE_METAL, "1")
    assert dispatch.metal_disabled()
    monkeypatch.setenv(dispatch.ENV_DISABLE_METAL, "0")
    assert not dispatch.metal_disabled()


def test_settings_epoch_moves_with_every_watched_setting(monkeypatch):
    from mhc_mlx import compiled, reference
    from mhc_mlx.kernels import coefficients, site

    watched = [(layer, "LATENCY_TOKENS", 3), (coefficients, "SPLIT_SMALL", False), (site, "FLAT_THREADS", 64),
               (kernels, "FUSED_READ_STEP", False), (build, "COMPILE_LATENCY", False),
               (dispatch, "ENV_BACKEND", "MHC_MLX_BACKEND"), (compiled, "mhc_layer", reference.mhc_layer)]
    for module, name, value in watched:
        before = build.settings_epoch()
        monkeypatch.setattr(module, name, value)
        assert build.settings_epoch() > before, (module.__name__, name)
    before = build.settings_epoch()
    build.poison_outputs(None)
    safety.reset()
    assert build.settings_epoch() >= before + 2
    # dispatch.state() (what decisions and traces are kept by) stays between changes, follows them,
    # use_candidates' assignments to the kernels package itself included
    state = dispatch.state()
    assert dispatch.state() == state
    monkeypatch.setattr(layer, "LATENCY_TOKENS", 5)
    assert dispatch.state() != state
    state = dispatch.state()
    kernels.use_candidates(True)
    try:
        assert dispatch.state() != state and kernels.FUSED_READ_STEP is True
    finally:
        kernels.use_candidates(False)


def test_state_follows_the_default_device_and_the_threads_forced_backend(monkeypatch):
    # state() keeps the last device's name (a Device compares by value, str() is dearer): it must
    # still change with every change of the default device, and use_backend is per thread
    import threading

    devices = iter([mx.Device(mx.cpu, 0), mx.Device(mx.gpu, 0), mx.Device(mx.gpu, 0), mx.Device(mx.cpu, 0)])
    monkeypatch.setattr(dispatch.mx, "default_device", lambda: next(devices))
    names = [dispatch.state()[3] for _ in range(4)]
    assert names == ["Device(cpu, 0)", "Device(gpu, 0)", "Device(gpu, 0)", "Device(cpu, 0)"]
    monkeypatch.undo()
    assert dispatch.state()[3] == str(mx.default_device())
    seen = {}
    with dispatch.use_backend("reference"):
        worker = threading.Thread(target=lambda: seen.update(other=dispatch.state()[0]))
        worker.start()
        worker.join()
        seen["here"] = dispatch.state()[0]
    assert seen == {"here": "reference", "other": None} and dispatch.state()[0] is None


def test_layer_keeps_its_decision_until_shape_dtype_or_state_change(monkeypatch):
    from mhc_mlx import reference

    decisions = []
    resolve = dispatch.resolve_layer

    def counting(*args, **kwargs):
        decisions.append(dispatch.forced_backend())
        return resolve(*args, **kwargs)

    monkeypatch.setattr(dispatch, "resolve_layer", counting)
    m = mhc.MHCLayer(4, 8, identity_init=False)
    m.update({"H_pre_raw": mx.random.normal((4,)), "H_post_raw": mx.random.normal((4,)),
              "H_res_raw": mx.random.normal((4, 4)), "rms_weight": mx.random.normal((8,))})
    x = mx.random.normal((3, 4, 8))
    params = [m.H_pre_raw, m.H_post_raw, m.H_res_raw, m.rms_weight]
    first = m(x)
    assert mx.array_equal(m(x), first) and len(decisions) == 1
    m(mx.random.normal((5, 4, 8)))
    m(x.astype(mx.bfloat16))
    assert len(decisions) == 3
    with dispatch.use_backend("reference"):
        got = m(x)
    assert decisions[-1] == "reference" and len(decisions) == 4
    assert mx.allclose(got, reference.mhc_layer(x, *params, 20, 1e-5), atol=1e-6)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "reference")
    m(x)
    assert decisions[-1] == "reference" and len(decisions) == 5
    monkeypatch.delenv(dispatch.ENV_BACKEND)
    # a changed setting of the layer itself, or of the kernels, decides again
    m.sinkhorn_iters = 3
    fresh = mhc.MHCLayer(4, 8, sinkhorn_iters=3, identity_init=False)
    fresh.update(dict(m.parameters()))
    assert mx.allclose(m(x), fresh(x), atol=1e-6) and not mx.allclose(m(x), first, atol=1e-4)
    count = len(decisions)
    monkeypatch.setattr(layer, "LATENCY_TOKENS", layer.LATENCY_TOKENS + 1)
    m(x)
    assert len(decisions) == count + 1
    # updated parameters are read on every call
    m.update({"rms_weight": 2 * m.rms_weight})
    params = [m.H_pre_raw, m.H_post_raw, m.H_res_raw, m.rms_weight]
    assert mx.allclose(m(x), reference.mhc_layer(x, *params, 3, 1e-5), atol=1e-5)
    assert not mx.allclose(m(x), fresh(x), atol=1e-4)  # fresh keeps the old weight
    # the kept decisions are no parameters
    assert set(dict(m.parameters())) == {"H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight"}


def test_layer_still_refuses_bad_input_after_good_calls():
    m = mhc.MHCLayer(4, 8)
    m(mx.zeros((2, 4, 8)))
    with pytest.raises(ValueError, match="expected n=4"):
        m(mx.zeros((2, 3, 8)))
    with pytest.raises(ValueError, match="expected C=8"):
        m(mx.zeros((2, 4, 9)))
    with pytest.raises(TypeError, match="dtype"):
        m(mx.zeros((2, 4, 8), dtype=mx.int32))
    with pytest.raises(TypeError, match="mlx.core.array"):
        m([[0.0] * 8] * 4)
    assert m(mx.zeros((2, 4, 8))).shape == (2, 4, 8)


def test_compiled_traces_follow_every_setting(monkeypatch):
    # a latency path's trace reads settings no key names (here one the trace keys did not list,
    # coefficients.ONE_MAX_K): any assignment to a watched module gives a new trace
    from mhc_mlx.kernels import coefficients

    def f(x):
        return x + 1

    kernel_level, module_level = build.compiled(f, "key"), dispatch.compiled_latency(f, "key")
    assert build.compiled(f, "key") is kernel_level and dispatch.compiled_latency(f, "key") is module_level
    monkeypatch.setattr(coefficients, "ONE_MAX_K", coefficients.ONE_MAX_K + 1)
    assert build.compiled(f, "key") is not kernel_level
    assert dispatch.compiled_latency(f, "key") is not module_level
    assert mx.array_equal(build.compiled(f, "key")(mx.array([1.0])), mx.array([2.0]))


@pytest.mark.parametrize("compiled_by", ["build.compiled", "dispatch.compiled_latency"])
def test_a_new_setting_is_traced_not_replayed(monkeypatch, compiled_by):
    # MLX keys its traces by the compiled function's identity: the traces of one function under
    # two settings must still be two (they were one until 2026-11-30, ninth session)
    from mhc_mlx.kernels import coefficients

    compile_ = build.compiled if compiled_by == "build.compiled" else dispatch.compiled_latency

    def f(x):
        return x + 1 if coefficients.ONE_LAUNCH_SMALL else x * 10

    x = mx.array([3.0])
    monkeypatch.setattr(coefficients, "ONE_LAUNCH_SMALL", False)
    assert [compile_(f, "key")(x).item() for _ in range(3)] == [30.0] * 3
    monkeypatch.setattr(coefficients, "ONE_LAUNCH_SMALL", True)
    assert [compile_(f, "key")(x).item() for _ in range(3)] == [4.0] * 3
    monkeypatch.setattr(coefficients, "ONE_LAUNCH_SMALL", False)
    assert [compile_(f, "key")(x).item() for _ in range(3)] == [30.0] * 3


def test_assign_settings_parses_checks_and_assigns(monkeypatch):
    # kernels.assign_settings (scripts/bench_with.py, the tests' MHC_TEST_KERNEL_SETTINGS)
    from mhc_mlx import kernels
    from mhc_mlx.kernels import coefficients_mma, one_pass_vjp

    for module, name in ((coefficients_mma, "WGMMA"), (coefficients_mma, "TARGET_WARPS"), (one_pass_vjp, "FORM"),
                         (kernels, "FUSED_READ_STEP")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    kernels.assign_settings(["coefficients_mma.WGMMA=1", "coefficients_mma.TARGET_WARPS=1024",
                             "one_pass_vjp.FORM=split", "kernels.FUSED_READ_STEP=on"])
    assert coefficients_mma.WGMMA is True and coefficients_mma.TARGET_WARPS == 1024
    assert one_pass_vjp.FORM == "split" and kernels.FUSED_READ_STEP is True
    kernels.assign_settings(["kernels.FUSED_READ_STEP=auto", "coefficients_mma.WGMMA=off"])
    assert kernels.FUSED_READ_STEP == "auto" and coefficients_mma.WGMMA is False
    # a bad item names itself, and nothing of the batch is assigned
    for bad, words in (("coefficients_mma.WGMMA", "module.ATTRIBUTE=value"), ("nosuch.X=1", "no kernel module"),
                       ("coefficients_mma.NOPE=1", "no setting NOPE"), ("coefficients_mma.WGMMA=maybe", "'maybe'"),
                       ("coefficients_mma.hopper=1", "no setting hopper")):
        with pytest.raises(ValueError, match=words):
            kernels.assign_settings(["coefficients_mma.TARGET_WARPS=7", bad])
        assert coefficients_mma.TARGET_WARPS == 1024
