#!/usr/bin/env python3
"""Where each target case's time goes in the stream, from an Nsight Systems (nsys) trace.

    nsys profile --trace cuda --output tl python scripts/gpu_timeline.py run [--glue-packs] [--read-step]
    nsys stats --report cuda_gpu_trace --format csv --output tl tl.nsys-rep
    python scripts/gpu_timeline.py report tl_cuda_gpu_trace.csv
    python scripts/gpu_timeline.py run --kineto tl.json [...]   # without nsys: PyTorch's profiler
    python scripts/gpu_timeline.py report tl.json                # (CUPTI) records MLX's kernels too

Unlike `gpu_profile.py` (Nsight Compute: each kernel alone, serialised), this keeps the kernels
as MLX launches them: `run` applies each case of gpu_profile.CASES REPEATS times between two
marker launches (once before, to build the kernels); `report` takes the last application of
each case and lists its kernels in stream order with their durations and the idle gaps before
them, then the span from the first kernel's start to the last one's end. Span minus the sum of
durations is the time the GPU waited between kernels (launch and host time).
"""

from __future__ import annotations

import csv
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_profile  # noqa: E402
from gpu_profile import CASES, MARKER, _short  # noqa: E402

REPEATS = 3


def run(args: list[str]) -> int:
    kineto = None
    if "--kineto" in args:
        at = args.index("--kineto")
        if at + 1 >= len(args):
            print("--kineto needs the trace's path", file=sys.stderr)
            return 2
        kineto = args[at + 1]
        args = args[:at] + args[at + 2:]
    unknown = [a for a in args if a not in ("--glue-packs", "--read-step")]
    if unknown:
        print(f"unknown flag(s) {' '.join(unknown)}; known: --glue-packs --read-step --kineto PATH", file=sys.stderr)
        return 2
    if kineto is not None:
        import torch

        torch.cuda.init()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            rc = _run_cases(args)
        prof.export_chrome_trace(kineto)
        return rc
    return _run_cases(args)


def _run_cases(args: list[str]) -> int:
    from mhc_mlx import kernels
    from mhc_mlx.kernels import coefficients

    if "--glue-packs" in args:
        coefficients.GLUE_PACKS = True
    if "--read-step" in args:
        kernels.FUSED_READ_STEP = True
    return gpu_profile.run(REPEATS)


def _column(header: list[str], *words: str) -> str:
    for h in header:
        if all(w.lower() in h.lower() for w in words):
            return h
    raise KeyError(f"no column with {words} in {header}")


def _kernels(path: str) -> list[tuple[float, float, str]]:
    """(start ns, duration ns, name) of every GPU activity in an nsys CSV or a Kineto trace."""
    if path.endswith(".json"):
        with open(path) as f:
            events = json.load(f)["traceEvents"]
        return sorted(
            (float(e["ts"]) * 1e3, float(e["dur"]) * 1e3, e["name"]) for e in events
            if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e
        )
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if "Start" in ln and "Name" in ln)
    rows = list(csv.DictReader(lines[start:]))
    header = list(rows[0].keys()) if rows else []
    c_start, c_dur, c_name = _column(header, "start"), _column(header, "duration"), _column(header, "name")
    return sorted((float(r[c_start]), float(r[c_dur]), r[c_name]) for r in rows if r[c_name] and r[c_dur])


def report(path: str) -> int:
    kernels = _kernels(path)
    marks, per_case = 0, {}
    for t0, dur, name in kernels:
        if MARKER in name:
            marks += 1
            continue
        if marks % 2 == 1:
            per_case.setdefault(marks // 2, []).append((t0, dur, name))
    found = False
    for i, (site, pass_, shape) in enumerate(CASES):
        ks = per_case.get(i, [])
        if not ks:
            continue
        found = True
        # the last of REPEATS applications: kernels after the largest gap at each repeat boundary
        # are hard to find by gaps alone, so split evenly by count (every application launches
        # the same kernels)
        per = len(ks) // REPEATS
        last = ks[-per:] if per else ks
        t_first, busy, prev_end = last[0][0], 0.0, None
        print(f"\n{site} {pass_} {'x'.join(map(str, shape))} bf16: {per} kernels per application")
        print(f"  {'start':>8} {'gap':>7} {'dur':>8}  kernel (µs)")
        for t0, dur, name in last:
            gap = 0.0 if prev_end is None else (t0 - prev_end) / 1e3
            print(f"  {(t0 - t_first) / 1e3:8.1f} {gap:7.1f} {dur / 1e3:8.1f}  {_short(name)}")
            busy += dur
            prev_end = t0 + dur
        span = (prev_end - t_first) / 1e3
        print(f"  span {span:.1f} µs, kernels {busy / 1e3:.1f} µs, idle {span - busy / 1e3:.1f} µs")
    return 0 if found else 1


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "run":
        sys.exit(run(sys.argv[2:]))
    if len(sys.argv) == 3 and sys.argv[1] == "report":
        sys.exit(report(sys.argv[2]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
