"""scripts/backward_tile.py's forms on the CPU emulator against float64: SHARE + FINISH, and the
fused persistent forms (the next tile in registers, or staged by asynchronous copies) with
clusters of one threadgroup (the emulator runs one threadgroup at a time; clusters of several are
checked against MLX's ops on the GPU before they are timed, gpu_experiments.py backward-tile)."""

import mlx.core as mx
import numpy as np
import pytest

import cpu_emulator as emu

pytestmark = pytest.mark.slow


@pytest.fixture
def backward_tile(monkeypatch):
    return emu.script_module("backward_tile", monkeypatch)


def _inputs(T, C, dtype):
    n = 4
    # tokens of very different scales, so a token given another token's sums would show
    scale = mx.arange(1, T + 1).reshape(T, 1, 1).astype(mx.float32)
    x = (mx.random.normal((T, n, C)) * scale).astype(dtype)
    g = mx.random.normal((T, n, C)).astype(dtype)
    dh = mx.random.normal((T, C)).astype(dtype)
    hpre, hres = mx.random.uniform(shape=(T, n)), mx.random.uniform(shape=(T, n, n))
    mx.eval(x, g, dh, hpre, hres)
    return x, g, dh, hpre, hres


def _want(x, g, dh, hpre, hres):
    x64, g64, d64 = (np.array(a.astype(mx.float32), dtype=np.float64) for a in (x, g, dh))
    hp, hr = np.array(hpre, dtype=np.float64), np.array(hres, dtype=np.float64)
    dpre = np.einsum("tc,tic->ti", d64, x64)
    dres = np.einsum("tic,tjc->tij", g64, x64).reshape(x64.shape[0], -1)
    s = 1.0 / (1.0 + (np.abs(dpre).sum(-1) + np.abs(dres).sum(-1)) / x64.shape[2])
    return hp[:, :, None] * d64[:, None, :] + np.einsum("tji,tjc->tic", hr, g64) + s[:, None, None] * x64


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("form", ["two", "fused", "fused async", "fused async reread", "fused async 3 stages",
                                  "fused async reread 256 threads 3 stages"])
def test_backward_tile_forms_match_float64(backward_tile, dtype, form):
    args = _inputs(16, 512, dtype)
    if form == "two":
        dx = backward_tile.two(*args)
        names = ["mhc_backward_tile_share", "mhc_backward_tile_finish"]
    elif form == "fused":  # three threadgroups looping over four tiles of 4 tokens, the next one's loads before each exchange
        dx = backward_tile.fused(*args, S=1, groups=3)
        names = ["mhc_backward_tile_fused1"]
    else:  # three threadgroups of 128 (256) looping over eight (four) tiles of 2 (4) tokens, staged 2 or 3 deep
        threads, stages = (256 if "256" in form else 128), (3 if "3 stages" in form else 2)
        dx = backward_tile.fused_async(*args, S=1, groups=3, reread="reread" in form, threads=threads, stages=stages)
        # past 40 KB the stage is dynamic shared memory (a static array on the emulator)
        dynamic = stages * threads * 9 * 16 > backward_tile.STATIC_STAGE_BYTES
        names = ["mhc_backward_tile_fused_async1" + ("_dyn" if dynamic else "")]
        assert backward_tile.fused_async_spec(1, stages * threads * 9 * 16 if dynamic else 0).shared_memory == (
            stages * threads * 9 * 16 if dynamic else 0)
    assert [name for name, *_ in emu.launched] == names
    got = np.array(dx.astype(mx.float32), dtype=np.float64)
    want = _want(*args)
    assert np.isfinite(got).all()
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-2
    # the MLX-ops form the GPU experiment checks the kernels against, itself against float64
    ref = np.array(backward_tile.reference(*args).astype(mx.float32), dtype=np.float64)
    assert np.max(np.abs(ref - want)) / np.max(np.abs(want)) <= 1e-2


def test_backward_tile_refuses_what_it_does_not_cover(backward_tile):
    x, g, dh, hpre, hres = _inputs(16, 512, mx.bfloat16)
    with pytest.raises(ValueError, match="16-bit"):
        backward_tile.two(x.astype(mx.float32), g, dh, hpre, hres)
    with pytest.raises(ValueError, match="dh"):
        backward_tile.fused(x, g, dh[:, :256], hpre, hres, S=1)
    with pytest.raises(ValueError, match="S in 1, 2, 4, 8"):
        backward_tile.fused(x, g, dh, hpre, hres, S=3)
    with pytest.raises(ValueError, match="multiple of its tile"):
        backward_tile.fused(*_inputs(6, 512, mx.bfloat16), S=1)
    with pytest.raises(ValueError, match="multiple of its tile"):
        backward_tile.fused_async(*_inputs(5, 512, mx.bfloat16), S=1)


def test_the_experiment_runs_and_reports_every_form(backward_tile, monkeypatch, capsys):
    # gpu_experiments.py backward-tile, small, on the emulator: every form checked against MLX's
    # ops, then timed (clusters of one here: the emulator runs one threadgroup at a time)
    import os
    import sys

    scripts = os.path.join(os.path.dirname(__file__), "..", "..", "scripts")
    sys.path.insert(0, scripts)
    try:
        import gpu_experiments
    finally:
        sys.path.remove(scripts)
    for name in ("fused", "fused_async"):
        form = getattr(backward_tile, name)
        monkeypatch.setattr(backward_tile, name, lambda *a, form=form, S=8, groups=0, **kw: form(*a, S=1, groups=3, **kw))
    # each form evaluated once in place of the timing's repeats: only that every form runs is checked
    monkeypatch.setattr(gpu_experiments, "tput", lambda fn, sets, reps=10: (mx.eval([fn(*a) for a in sets]), 1.0)[1])
    gpu_experiments.backward_tile_forms(rounds=1, T=16, C=512)
    out = capsys.readouterr().out
    checks = [line for line in out.splitlines() if "backward tile check:" in line]
    timed = [line for line in out.splitlines() if line.startswith("backward tile 16x4x512")]
    assert len(checks) == 17 and len(timed) == 18, out  # 17 forms, and the copy beside them
    for line in checks:
        assert "all finite True" in line and float(line.split("max rel err ")[1].split()[0]) <= 1e-2, line
