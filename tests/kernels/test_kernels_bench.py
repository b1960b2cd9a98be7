"""`mhc-mlx bench --quick` (the CI run) and the seed-package plumbing."""

import json
import os
import zipfile

import mlx.core as mx
import numpy as np
import pytest

from mhc_mlx.bench import cases, report, seeds
from mhc_mlx.cli import bench as bench_cli
from mhc_mlx.cli import main as cli_main

pytestmark = pytest.mark.slow  # about ten seconds on two cores


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench"))
    status = cli_main.main(["bench", "--quick", "--out", out, "--seeds", ""])
    return status, out


def test_quick_bench_writes_json_and_png(quick_run):
    status, out = quick_run
    assert status == 0
    with open(os.path.join(out, "bench.json")) as f:
        data = json.load(f)
    assert data["header"]["quick"] is True
    if hasattr(os, "sched_getaffinity"):  # the cores the run could use, recorded (Linux)
        assert data["header"]["cpu_affinity"] == sorted(os.sched_getaffinity(0))
    assert data["copy_floor"]["GBps"] > 0 and data["tiny_op_us"] > 0
    # the floor is the faster of the copies measured before and after the rows
    assert len(data["copy_floor_runs"]) == 2
    assert data["copy_floor"]["GBps"] == max(c["GBps"] for c in data["copy_floor_runs"])
    # and the B = 1 ratios' unit is the faster of two tiny-op evals (before and after the rows)
    assert len(data["tiny_op_runs_us"]) == 2 and data["tiny_op_us"] == min(data["tiny_op_runs_us"])
    for r in data["rows"]:
        assert r["x_tiny_op"] == pytest.approx(r["us"] / data["tiny_op_us"])
    # our latency rows were timed beside the tiny op, in alternating rounds (3 in a quick run)
    latency = [r for r in data["rows"] if r["case"]["mode"] == "latency"]
    assert latency
    for r in latency:
        rounds = r["paired_rounds"]
        assert len(rounds) == 3 and all(t > 0 and u > 0 for t, u in rounds)
        assert r["x_tiny_paired"] == pytest.approx(float(np.median([u / t for t, u in rounds])))
        assert r["tiny_paired_us"] == pytest.approx(float(np.median([t for t, _ in rounds])))
        assert r["us"] == pytest.approx(float(np.median([u for _, u in rounds])))
        assert r["x_tiny"] == r["x_tiny_paired"]
    impls = {r["impl"] for r in data["rows"]}
    assert {"compiled", "reference"} <= impls
    ids = {r["case"]["id"] for r in data["rows"]}
    assert {c.id for c in cases.quick_cases()} == ids
    for r in data["rows"]:
        assert isinstance(r["us"], float) and r["us"] > 0, r
        assert r["GBps"] == pytest.approx(r["case"]["floor_bytes"] / r["us"] / 1e3)
        assert r["pct_of_copy"] == pytest.approx(100 * r["GBps"] / data["copy_floor"]["GBps"])
    with open(os.path.join(out, "bench.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_records_the_kernel_settings_and_switches_candidates_on(quick_run, tmp_path):
    from mhc_mlx import kernels

    _, out = quick_run
    with open(os.path.join(out, "bench.json")) as f:
        header = json.load(f)["header"]
    assert header["kernel_settings"] == kernels.settings()
    assert header["device_name"] == mx.device_info().get("device_name", "")  # the device, named
    defaults = kernels.settings()
    try:
        assert cli_main.main(["bench", "--quick", "--candidates", "--out", str(tmp_path), "--seeds", "",
                              "--only", "static/fwd/1x4x64"]) == 0
        with open(tmp_path / "bench.json") as f:
            recorded = json.load(f)["header"]["kernel_settings"]
        # the static layer's single launch at every token count: the default, candidates or not
        assert recorded["layer_inline_always"] is True and defaults["layer_inline_always"] is True
        # the parameter arrays in GPU memory: the default since the eighteenth session, candidates or not
        assert recorded["device_params"] is True and defaults["device_params"] is True
        # the read step, the tensor-core backward and the chain: at every size with the
        # candidates, by size ("auto") by default
        for k in ("fused_read_step", "mma_vjp", "chain_x_cotangent"):
            assert recorded[k] is True and defaults[k] == "auto", k
    finally:
        kernels.use_candidates(False)
    assert kernels.settings() == defaults  # off again is exactly the shipped defaults


def test_bench_refuses_to_overwrite(quick_run, capsys):
    _, out = quick_run
    assert cli_main.main(["bench", "--quick", "--out", out, "--seeds", ""]) == 2
    assert "exists" in capsys.readouterr().err
    assert bench_cli.main(["--quick", "--out", out, "--seeds", "", "--impl", "fastest"]) == 2


def test_bench_refuses_an_only_filter_that_matches_nothing(tmp_path, capsys):
    out = tmp_path / "b"
    assert cli_main.main(["bench", "--quick", "--out", str(out), "--seeds", "", "--only", "no-such-case"]) == 2
    assert "matches none" in capsys.readouterr().err
    assert not (out / "bench.json").exists()


def test_floor_bytes():
    s = cases.Case("static", "fwd", (8, 4, 16), "bfloat16", "throughput")
    d = cases.Case("dynamic", "fwd+bwd", (8, 4, 16), "float32", "throughput")
    assert s.floor_bytes() == 2 * 8 * 4 * 16 * 2
    assert d.floor_bytes() == (7 * 4 + 2) * 16 * 8 * 4


def test_targets_are_judged_only_on_measured_rows():
    assert report.targets([], tiny_us=20.0) == []
    row = {"case": cases.Case("static", "fwd", (4096, 4, 4096), "bfloat16", "throughput").as_dict(),
           "impl": "kernels", "us": 120.0}
    report.enrich([row], copy_GBps=2600.0, tiny_us=20.0)
    (goal,) = report.targets([row], tiny_us=20.0)
    assert goal["met"] == (row["pct_of_copy"] >= 80)
    # the compiled-step rows are judged apart, on their own figures
    assert report.targets([row], tiny_us=20.0, impl="kernels+step") == []
    step = dict(row, impl="kernels+step", us=100.0)
    report.enrich([step], copy_GBps=2600.0, tiny_us=20.0)
    (goal,) = report.targets([row, step], tiny_us=20.0, impl="kernels+step")
    assert goal["value"] == step["pct_of_copy"] != row["pct_of_copy"]


def test_b1_targets_use_the_tiny_op_timed_beside_the_row():
    row = {"case": cases.Case("static", "fwd", (1, 4, 512), "bfloat16", "latency").as_dict(),
           "impl": "kernels", "us": 60.0, "x_tiny_paired": 1.4}
    report.enrich([row], copy_GBps=2600.0, tiny_us=20.0)
    (goal,) = report.targets([row], tiny_us=20.0)
    # 3.0 x against the run's unit, 1.4 x against the tiny op beside it: the latter is judged
    assert row["x_tiny_op"] == pytest.approx(3.0) and goal["value"] == 1.4 and goal["met"]
    del row["x_tiny_paired"]  # a row without a paired figure (an older JSON) falls back to the unit
    (goal,) = report.targets([row], tiny_us=20.0)
    assert goal["value"] == pytest.approx(3.0) and not goal["met"]


def test_paired_latency_alternates_and_takes_medians(monkeypatch):
    from mhc_mlx.bench import timing

    calls = []
    # a state that drifts: every eval, the row's or the tiny op's, costs more in later rounds
    def fake_latency(fn, args, repeats=50, warmup=5):
        calls.append("tiny" if args and args[0].size == 1 and fn is not row else "row")
        state = 1 + (len(calls) - 1) // 2  # one state per round
        return (10.0 if calls[-1] == "tiny" else 25.0) * state

    def row(v):
        return v

    monkeypatch.setattr(timing, "latency_us", fake_latency)
    got = timing.paired_latency_us(row, [mx.zeros((2,))], repeats=50, rounds=5)
    assert calls == ["tiny", "row", "row", "tiny", "tiny", "row", "row", "tiny", "tiny", "row"]
    assert got["ratio"] == pytest.approx(2.5)  # the drift cancels within each pair
    assert len(got["rounds"]) == 5
    assert got["tiny_us"] == pytest.approx(float(np.median([t for t, _ in got["rounds"]])))
    with pytest.raises(ValueError, match="rounds"):
        timing.paired_latency_us(row, [], repeats=3, rounds=5)


def test_seed_install_unpacks_into_its_own_folder(tmp_path):
    wheel = tmp_path / seeds.SEEDS["mlx-mhc"]
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mlx_mhc/__init__.py", "VALUE = 1\n")
    folder = seeds.install(str(tmp_path), "mlx-mhc")
    assert os.path.isabs(folder) and os.path.exists(os.path.join(folder, "mlx_mhc", "__init__.py"))
    assert seeds.install(str(tmp_path), "mhc-mlx") is None  # no wheel: skipped, not crashed


@pytest.mark.parametrize("site", ["static", "dynamic"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_compiled_step_rows_compute_what_the_eager_rows_compute(site, pass_):
    # `--compiled-step` / `--impl ...+step`: the same application under one mx.compile gives the
    # same output and gradients (compiled path, float32, same seed for inputs and parameters)
    from mlx.utils import tree_flatten

    from mhc_mlx.dispatch import use_backend

    case = cases.Case(site, pass_, (6, 4, 24), "float32", "throughput")
    results = []
    for compile_step in (False, True):
        mx.random.seed(5)
        apply, xs = cases.prepare(case, 1, compile_step)
        with use_backend("compiled"):
            out = apply(xs[0])
            mx.eval(out)
        results.append([np.array(a) for _, a in tree_flatten(out)])
    assert len(results[0]) == len(results[1]) >= 1
    for a, b in zip(*results):
        assert a.shape == b.shape
        assert np.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_step_impls_are_accepted_and_unknown_ones_refused(tmp_path, capsys):
    assert bench_cli.main(["--quick", "--out", str(tmp_path / "a"), "--seeds", "", "--impl", "compiled+step",
                       "--only", "static/fwd+bwd"]) == 0
    rows = json.loads((tmp_path / "a" / "bench.json").read_text())["rows"]
    assert rows and {r["impl"] for r in rows} == {"compiled+step"} and all(isinstance(r["us"], float) for r in rows)
    assert bench_cli.main(["--quick", "--out", str(tmp_path / "b"), "--seeds", "", "--impl", "kernels+steps"]) == 2
    assert "unknown --impl kernels+steps" in capsys.readouterr().err


def test_pipelined_throughput_hands_every_eval_over_and_divides_by_all(monkeypatch):
    from mhc_mlx.bench import timing

    built, handed, synced = [], [], []

    def fn(x):
        built.append(x)
        return x * 2.0

    clock = iter(range(100))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(timing.mx, "async_eval", lambda outs: handed.append(len(outs)))
    monkeypatch.setattr(timing, "_sync", lambda: synced.append(len(handed)))
    inputs = [[mx.ones((3,))] for _ in range(5)]
    us = timing.pipelined_throughput_us(fn, inputs, evals=4, repeats=3, warmup=1)
    # warmup: one eval of the K applications; then per repeat 4 evals built, then handed over
    assert len(built) == 5 * (1 + 4 * 3)
    assert handed == [5] * 12
    # every repeat synchronizes before its clock starts and after its last eval is handed over
    assert synced == [0, 0, 4, 4, 8, 8, 12]
    # the fake clock ticks once per reading: one tick per repeat, over 4 evals x 5 applications
    assert us == pytest.approx(1e6 * 1 / 20)
    with pytest.raises(ValueError, match="evals"):
        timing.pipelined_throughput_us(fn, inputs, evals=0)


def test_quick_bench_pipelined_rows_and_floor(tmp_path):
    out = str(tmp_path)
    assert cli_main.main(["bench", "--quick", "--pipelined", "--out", out, "--seeds", "", "--impl", "compiled",
                          "--only", "static/fwd/64x4x128"]) == 0
    with open(os.path.join(out, "bench.json")) as f:
        data = json.load(f)
    assert data["header"]["pipelined"] is True
    runs = data["copy_floor_pipelined_runs"]
    assert len(runs) == 2 and data["copy_floor_pipelined"]["GBps"] == max(c["GBps"] for c in runs)
    (row,) = data["rows"]
    assert row["pipelined_us"] > 0
    assert row["pipelined_pct_of_copy"] == pytest.approx(
        100 * row["case"]["floor_bytes"] / row["pipelined_us"] / 1e3 / data["copy_floor_pipelined"]["GBps"])
    # no kernels row on the CPU, so no judged targets; the one-eval figures stay in us and pct_of_copy
    assert row["us"] != row["pipelined_us"] and data["targets_pipelined"] == []


def test_pipelined_targets_are_judged_on_the_pipelined_figures():
    row = {"case": cases.Case("static", "fwd", (4096, 4, 4096), "bfloat16", "throughput").as_dict(),
           "impl": "kernels", "us": 130.0, "pipelined_us": 100.0}
    report.enrich([row], copy_GBps=2600.0, tiny_us=20.0)
    report.enrich_pipelined([row], copy_GBps=3000.0)
    (one_eval,) = report.targets([row], tiny_us=20.0)
    (piped,) = report.targets(report.pipelined_rows([row]), tiny_us=20.0)
    assert one_eval["value"] == pytest.approx(100 * 268435456 / 130.0 / 1e3 / 2600.0)
    assert piped["value"] == pytest.approx(100 * 268435456 / 100.0 / 1e3 / 3000.0)
    assert not one_eval["met"] and piped["met"]
    # a row never timed pipelined is left out of the pipelined judgement
    del row["pipelined_us"], row["pipelined_pct_of_copy"]
    assert report.pipelined_rows([row]) == []


def test_a_failed_pipelined_timing_is_the_rows_not_the_runs(tmp_path, monkeypatch, capsys):
    real = cases.time_ours

    def fail_pipelined(*a, pipelined=False, **k):
        if pipelined:
            raise MemoryError("four evals did not fit")
        return real(*a, **k)

    monkeypatch.setattr(cases, "time_ours", fail_pipelined)
    out = str(tmp_path)
    assert cli_main.main(["bench", "--quick", "--pipelined", "--out", out, "--seeds", "", "--impl", "compiled",
                          "--only", "static/fwd/64x4x128"]) == 0
    with open(os.path.join(out, "bench.json")) as f:
        (row,) = json.load(f)["rows"]
    assert isinstance(row["us"], float) and row["pipelined_us"] == "error: MemoryError: four evals did not fit"
    assert "pipelined_pct_of_copy" not in row
    assert "error: MemoryError" in capsys.readouterr().out
