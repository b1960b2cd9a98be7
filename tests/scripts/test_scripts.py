"""The repo's device scripts on the CPU: scripts/bench_with.py (settings switched before the
bench, recorded in its JSON), scripts/gpu_timeline.py's report (stream order, gaps, span) and
the names scripts/gpu_session.sh's stages pass to the experiment and check scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")


def _script(name: str, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *args], capture_output=True, text=True,
                          env=env, timeout=600, **kw)


@pytest.mark.parametrize("setting,message", [
    ("kernels.NO_SUCH=1", "has no setting NO_SUCH"),
    ("kernels.DEFER_POST_X=maybe", "is not 1/0/true/false/on/off/auto"),
    ("DEFER_POST_X=1", "expected module.ATTRIBUTE=value"),
    ("nosuchmodule.X=1", "no kernel module mhc_mlx.kernels.nosuchmodule"),
])
def test_bench_with_refuses_a_bad_setting(setting, message):
    out = _script("bench_with.py", setting, "--", "bench", "--quick")
    assert out.returncode != 0
    assert message in out.stderr + out.stdout


@pytest.mark.parametrize("flag,message", [
    ("--pipelined=0", "--pipelined=0: needs a positive integer"),
    ("--k=x", "--k=x: needs a positive integer"),
    ("--bogus", "unknown flag(s) --bogus"),
    ("--only=dynamc", "--only=dynamc: the site is one of dynamic, static"),
])
def test_gpu_timeline_refuses_a_bad_flag(flag, message):
    # before any GPU work (these fail on a CPU-only MLX the same way as on the device)
    out = _script("gpu_timeline.py", "run", "--throughput", flag)
    assert out.returncode == 2
    assert message in out.stderr


def test_bench_with_records_the_settings_it_switched(tmp_path):
    out = _script("bench_with.py", "kernels.DEFER_POST_X=0", "coefficients.SPLIT_GLUE_SINKHORN=false",
                  "coefficients_mma_vjp.DX_TOKEN_MAJOR=0", "one_pass_vjp.FORM=split", "--", "bench", "--quick", "--only",
                  "static/fwd/1x4x64/float32", "--impl", "compiled", "--seeds", "", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    settings = json.load(open(tmp_path / "bench.json"))["header"]["kernel_settings"]
    assert settings["defer_post_x"] is False and settings["split_glue_sinkhorn"] is False
    assert settings["dx_token_major"] is False
    assert settings["one_pass_vjp_form"] == "split"  # a word-valued setting taken as it is (default "mma")


def test_timeline_report_lists_the_last_application_with_gaps(tmp_path):
    # a Kineto trace: per case two markers around three applications of two kernels; the report
    # takes the last application, in stream order, with the gap before each kernel
    sys.path.insert(0, SCRIPTS)
    import gpu_profile

    events, t = [], 0.0

    def kernel(name, dur, gap=1.0):
        nonlocal t
        t += gap
        events.append({"ph": "X", "cat": "kernel", "name": name, "ts": t, "dur": dur})
        t += dur

    for i in range(len(gpu_profile.CASES)):
        kernel(gpu_profile.MARKER, 1.0)
        for rep in range(3):
            kernel(f"k_first_{i}", 5.0 + rep)
            kernel(f"k_second_{i}<float>(int)", 3.0, gap=2.5)
        kernel(gpu_profile.MARKER, 1.0)
    events.append({"ph": "X", "cat": "cpu_op", "name": "not a kernel", "ts": 0.0, "dur": 1.0})
    path = tmp_path / "tl.json"
    path.write_text(json.dumps({"traceEvents": events}))
    out = _script("gpu_timeline.py", "report", str(path))
    assert out.returncode == 0, out.stderr
    blocks = out.stdout.strip().split("\n\n")
    assert len(blocks) == len(gpu_profile.CASES)
    first = blocks[0].splitlines()
    assert "2 kernels per application" in first[0]
    # the third application: k_first lasts 7 µs, then a 2.5 µs gap, then k_second 3 µs
    assert first[2].split()[:3] == ["0.0", "0.0", "7.0"] and first[2].endswith("k_first_0")
    assert first[3].split()[:3] == ["9.5", "2.5", "3.0"] and first[3].endswith("k_second_0")
    assert first[4].strip() == "span 12.5 µs, kernels 10.0 µs, idle 2.5 µs"


def test_timeline_report_reads_an_nsys_csv_and_fails_without_markers(tmp_path):
    sys.path.insert(0, SCRIPTS)
    import gpu_profile

    rows = ['"Start (ns)","Duration (ns)","CorrId","Name"', f'1000,1000,1,"{gpu_profile.MARKER}"',
            '3000,4000,2,"only_kernel"', f'8000,1000,3,"{gpu_profile.MARKER}"']
    path = tmp_path / "tl_cuda_gpu_trace.csv"
    path.write_text("a note nsys prints first\n\n" + "\n".join(rows) + "\n")
    out = _script("gpu_timeline.py", "report", str(path))
    assert out.returncode == 0, out.stderr
    assert "only_kernel" in out.stdout and "span 4.0 µs, kernels 4.0 µs, idle 0.0 µs" in out.stdout
    path.write_text("\n".join(rows[:1] + ['3000,4000,2,"only_kernel"']) + "\n")
    assert _script("gpu_timeline.py", "report", str(path)).returncode == 1  # no case found


def test_timeline_throughput_report_takes_overlaps_and_gaps(tmp_path):
    # one eval per case between markers; kernels may overlap (MLX runs independent ones side by
    # side), so the time some kernel runs is their union, and the gaps are where none does
    sys.path.insert(0, SCRIPTS)
    import gpu_profile
    import gpu_timeline

    events = []
    for i in range(len(gpu_timeline.THROUGHPUT_CASES)):
        base = 1000.0 * i
        events += [
            {"ph": "X", "cat": "kernel", "name": gpu_profile.MARKER, "ts": base, "dur": 1.0},
            {"ph": "X", "cat": "kernel", "name": "k_a", "ts": base + 10.0, "dur": 20.0},
            {"ph": "X", "cat": "kernel", "name": "k_b", "ts": base + 15.0, "dur": 5.0},  # inside k_a
            {"ph": "X", "cat": "kernel", "name": "k_a", "ts": base + 40.0, "dur": 30.0},  # 10 µs gap
            {"ph": "X", "cat": "kernel", "name": gpu_profile.MARKER, "ts": base + 100.0, "dur": 1.0},
        ]
        if i == 0:  # the host's calls: the two marker launches (correlated), and between them two mallocs
            events[0]["args"] = {"correlation": 7}
            events[4]["args"] = {"correlation": 9}
            events += [
                {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0.5, "dur": 0.1,
                 "args": {"correlation": 7}},
                {"ph": "X", "cat": "cuda_runtime", "name": "cudaMallocAsync", "ts": 2.0, "dur": 3.0},
                {"ph": "X", "cat": "cuda_runtime", "name": "cudaMallocAsync", "ts": 6.0, "dur": 5.0},
                {"ph": "X", "cat": "cuda_driver", "name": "cuGraphLaunch", "ts": 12.0, "dur": 1.0},
                {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 90.5, "dur": 0.1,
                 "args": {"correlation": 9}},
                {"ph": "X", "cat": "cuda_runtime", "name": "cudaMallocAsync", "ts": 95.0, "dur": 50.0},  # after
            ]
    path = tmp_path / "tp.json"
    path.write_text(json.dumps({"traceEvents": events}))
    out = _script("gpu_timeline.py", "report", "--throughput", str(path))
    assert out.returncode == 0, out.stderr
    blocks = out.stdout.strip().split("\n\n")
    assert len(blocks) == len(gpu_timeline.THROUGHPUT_CASES)
    lines = blocks[0].splitlines()
    assert "3 kernels in one eval" in lines[0]
    assert lines[1].strip() == "span 60.0 µs, some kernel running 50.0 µs, none 10.0 µs"
    assert lines[2].split()[:3] == ["2×", "mean", "25.0"] and lines[2].endswith("k_a")
    assert lines[4].strip().startswith("largest gaps (µs, before): 10.0 k_a")
    assert lines[5].strip() == "host: 90.0 µs between the marker launches; CUDA calls by total time:"
    assert lines[6].split()[:3] == ["2×", "total", "8.0"] and lines[6].endswith("cudaMallocAsync")
    assert lines[7].split()[:3] == ["1×", "total", "1.0"] and lines[7].endswith("cuGraphLaunch")
    assert len(lines) == 8
    assert all(len(b.splitlines()) == 5 for b in blocks[1:])  # no host calls recorded there


def _session_text() -> str:
    with open(os.path.join(SCRIPTS, "gpu_session.sh")) as f:
        return f.read()


def test_gpu_session_stages_name_existing_experiments_and_switches():
    # a stage that names an experiment mode or a gpu_check switch that does not exist would fail
    # only on the device, after the wheel install: caught here instead
    import re

    text = _session_text()
    sys.path.insert(0, SCRIPTS)
    sys.path.insert(0, os.path.join(ROOT, "src"))
    try:
        import gpu_check
        import gpu_experiments
    finally:
        sys.path.remove(SCRIPTS)
    modes = set(re.findall(r"gpu_experiments\.py ([a-z][\w-]*)", text))
    assert modes, "no experiment modes found in gpu_session.sh"
    assert modes <= set(gpu_experiments.MODES), modes - set(gpu_experiments.MODES)
    switches = {s for args in re.findall(r'CHECK_ARGS="([^"]*)"', text) for s in args.split() if s.startswith("--")}
    assert switches, "no CHECK_ARGS switches found in gpu_session.sh"
    # the SWITCHES table, or gpu_check's own arguments (its --help lists both)
    help_text = _script("gpu_check.py", "--help").stdout
    unknown = {s for s in switches - set(gpu_check.SWITCHES) if f"{s} " not in help_text and f"{s}\n" not in help_text}
    assert not unknown, unknown


def test_host_overhead_stands_in_the_latency_paths():
    # --latency stands in a GPU's presence (few-token calls compiled, as on a GPU); only with
    # --stand-in, since with a real GPU the latency paths are the real ones
    refused = _script("host_overhead.py", "--latency")
    assert refused.returncode == 2 and "--latency needs --stand-in" in refused.stderr
    ran = _script("host_overhead.py", "--stand-in", "--latency")
    assert ran.returncode == 0, ran.stderr
    rows = {line.split()[0]: line.split() for line in ran.stdout.splitlines() if line.startswith("MHCLayer")}
    assert rows["MHCLayer"][1] == "kernels" and float(rows["MHCLayer"][2]) > 0


def test_profile_report_lists_each_kernels_bytes_and_rate_against_the_copy(tmp_path):
    # an ncu CSV (one row per launch and metric, its notes first): per case two markers around
    # its kernels, then the copy's; the report sums each case and rates each kernel against the
    # copy's DRAM rate under ncu
    sys.path.insert(0, SCRIPTS)
    import gpu_profile

    rows = ['"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"']
    ident = 0

    def launch(name, us, read_mb=None, write_mb=None):
        nonlocal ident
        rows.append(f'"{ident}","{name}","gpu__time_duration.sum","usecond","{us}"')
        if read_mb is not None:
            rows.append(f'"{ident}","{name}","dram__bytes_read.sum","Mbyte","{read_mb}"')
            rows.append(f'"{ident}","{name}","dram__bytes_write.sum","Mbyte","{write_mb}"')
        ident += 1

    for i in range(len(gpu_profile.CASES)):
        launch(gpu_profile.MARKER, 1.0, 0.0, 0.0)
        if i == 3:
            launch("slow_kernel<float>(int)", 100.0, 150.0, 50.0)  # 2000 GB/s: half the copy's rate
            launch("fast_kernel", 25.0, 75.0, 25.0)  # the copy's rate
        launch(gpu_profile.MARKER, 1.0, 0.0, 0.0)
    launch(gpu_profile.MARKER, 1.0, 0.0, 0.0)
    launch("copy_kernel", 50.0, 100.0, 100.0)  # 200 MB in 50 µs: 4000 GB/s
    launch(gpu_profile.MARKER, 1.0, 0.0, 0.0)
    path = tmp_path / "prof.csv"
    path.write_text("==PROF== a note ncu prints first\n" + "\n".join(rows) + "\n")
    out = _script("gpu_profile.py", "report", str(path))
    assert out.returncode == 0, out.stderr
    assert "under ncu: 50.0 µs, 4000 GB/s" in out.stdout
    block = [b for b in out.stdout.split("\n\n") if b.startswith("dynamic fwd+bwd")][0]
    assert "2 kernels, 125.0 µs of GPU time, 300.0 MB of DRAM traffic; at the copy's rate 75.0 µs" in block
    slow = [ln for ln in block.splitlines() if ln.endswith("slow_kernel")][0]
    assert "200.0 MB" in slow and "2000 GB/s" in slow and "50.0 % of the copy's" in slow
    fast = [ln for ln in block.splitlines() if ln.endswith("fast_kernel")][0]
    assert "100.0 % of the copy's" in fast


def test_profile_report_takes_a_durations_only_csv(tmp_path):
    # the older form (durations only): kernels listed without bytes, no rate
    sys.path.insert(0, SCRIPTS)
    import gpu_profile

    rows = ['"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"']
    for ident, name in enumerate([gpu_profile.MARKER, "only_kernel", gpu_profile.MARKER]):
        rows.append(f'"{ident}","{name}","gpu__time_duration.sum","nsecond","{"1,500" if name == "only_kernel" else "1000"}"')
    path = tmp_path / "prof.csv"
    path.write_text("\n".join(rows) + "\n")
    out = _script("gpu_profile.py", "report", str(path))
    assert out.returncode == 0, out.stderr
    assert "1 kernels, 1.5 µs of GPU time\n" in out.stdout and "MB" not in out.stdout
