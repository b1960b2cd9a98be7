"""scripts/tile_reuse.py's experiment kernels on the CPU emulator against float64: the two-launch
form, the one-launch form whose last threadgroup per tile writes the tile, and both cluster forms
with clusters of one threadgroup. WAIT and clusters of several need their tile's threadgroups
resident together, which the emulator's one-at-a-time cannot give; they are checked against the
reference on the GPU before they are timed (gpu_experiments.py tile-reuse)."""

import os
import sys

import mlx.core as mx
import numpy as np
import pytest

import cpu_emulator as emu
from mhc_mlx.kernels import build

pytestmark = pytest.mark.slow
SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "..", "scripts")


@pytest.fixture
def tile_reuse(monkeypatch):
    return emu.script_module("tile_reuse", monkeypatch)


def _want(x):
    x64 = np.array(x.astype(mx.float32), dtype=np.float64)
    return x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + 1e-6)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("form", ["two launches", "last", "cluster", "persistent"])
def test_tile_reuse_forms_match_float64(tile_reuse, dtype, form):
    T, S, TT = 32, 4, 16
    x = (3 * mx.random.normal((T, 512 * S))).astype(dtype)
    # rows of very different scales, so a row given another row's sum would show
    x = x * mx.arange(1, T + 1).reshape(T, 1).astype(dtype)
    mx.eval(x)
    if form == "two launches":
        y = tile_reuse.two_launches(x)
    elif form == "last":
        y = tile_reuse.one_launch(x, "last", TT=TT, S=S)
    elif form == "cluster":  # one threadgroup a cluster, a tile of 4 rows, a row's 2048 channels a vector a thread
        y = tile_reuse.cluster_launch(x, TT=4, S=1)
    else:  # three threadgroups looping over the 8 tiles, the next one's loads before each exchange
        y = tile_reuse.persistent_launch(x, TT=4, S=1, groups=3)
    got = np.array(y.astype(mx.float32), dtype=np.float64)
    want = _want(x)
    assert np.isfinite(got).all()
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-2
    names = [name for name, *_ in emu.launched]
    if form in ("cluster", "persistent"):
        assert names == [f"mhc_tile_reuse_{form}1"]
    if form == "last":
        assert names == ["mhc_tile_reuse_last"]
        # the MLX-ops form the GPU experiment also times, as a check of the reference itself
        assert np.max(np.abs(np.array(tile_reuse.reference(x).astype(mx.float32)) - want)) / np.max(np.abs(want)) <= 1e-2


def test_tile_reuse_refuses_shapes_it_does_not_cover(tile_reuse):
    with pytest.raises(ValueError, match="K = 512 S"):
        tile_reuse.one_launch(mx.zeros((32, 1000), mx.bfloat16), "last", TT=16, S=4)
    with pytest.raises(ValueError, match="multiple of TT"):
        tile_reuse.one_launch(mx.zeros((30, 2048), mx.bfloat16), "last", TT=16, S=4)
    with pytest.raises(ValueError, match="16-bit"):
        tile_reuse.one_launch(mx.zeros((32, 2048)), "last", TT=16, S=4)


def test_scratch_inputs_are_the_only_inputs_a_kernel_may_write(tile_reuse):
    # the emulator's check that no input is written skips KernelSpec.scratch, and only it
    assert tile_reuse.LAST.scratch == ("counters",) and build.KernelSpec("k", ("a",), ("b",), "").scratch == ()
    spec = build.KernelSpec("mhc_writes_input", ("a", "iparam"), ("b",), "  ((float*)a)[KTID] = 1.0f; b[KTID] = 0.0f;\n")
    a = mx.zeros((32,))
    with pytest.raises(RuntimeError, match="wrote into input 0"):
        emu.launch(spec, [a, build.int_params(1)], [((32,), mx.float32)], 32, 32, [])
    allowed = build.KernelSpec(spec.name + "_scratch", spec.inputs, spec.outputs, spec.body, scratch=("a",))
    (b,) = emu.launch(allowed, [a, build.int_params(1)], [((32,), mx.float32)], 32, 32, [])
    assert not b.any().item()


def test_the_experiment_runs_and_reports_every_form(tile_reuse, monkeypatch, capsys):
    # gpu_experiments.py tile-reuse, small, on the emulator: every form checked, then timed. WAIT
    # cannot finish here (one threadgroup at a time): its bounded spin gives NaN, not a hang
    sys.path.insert(0, SCRIPTS)
    try:
        import gpu_experiments
    finally:
        sys.path.remove(SCRIPTS)
    monkeypatch.setattr(tile_reuse, "SPIN_LIMIT", 1000)
    # each form evaluated once in place of the timing's repeats: the emulator is slow, and only
    # that every form runs is checked here
    monkeypatch.setattr(gpu_experiments, "tput", lambda fn, sets, reps=10: (mx.eval([fn(*a) for a in sets]), 1.0)[1])
    gpu_experiments.tile_reuse_forms(rounds=1, T=16, K=1024, TT=16, S=2)
    out = capsys.readouterr().out
    for form in ("two launches", "last re-reads", "wait"):
        assert f"tile reuse check: {form}" in out and f"bf16, {form}" in out, out
    checks = {line.split("check: ")[1].split("  ")[0].strip(): line for line in out.splitlines() if "check:" in line}
    assert "all finite True" in checks["two launches"] and "all finite True" in checks["last re-reads"]
    assert "all finite False" in checks["wait"]
    for form in ("two launches", "last re-reads"):
        assert float(checks[form].split("max rel err ")[1].split()[0]) <= 1e-2


def test_the_cluster_form_refuses_shapes_it_does_not_cover(tile_reuse):
    with pytest.raises(ValueError, match="S in 1, 2, 4, 8"):
        tile_reuse.cluster_launch(mx.zeros((32, 2048), mx.bfloat16), TT=4, S=3)
    with pytest.raises(ValueError, match="K a multiple of"):
        tile_reuse.cluster_launch(mx.zeros((32, 2048), mx.bfloat16), TT=4, S=2)
