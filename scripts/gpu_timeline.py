#!/usr/bin/env python3
"""Where each target case's time goes in the stream, from an Nsight Systems (nsys) trace.

    nsys profile --trace cuda --output tl python scripts/gpu_timeline.py run [--glue-packs] [--read-step]
    nsys stats --report cuda_gpu_trace --format csv --output tl tl.nsys-rep
    python scripts/gpu_timeline.py report tl_cuda_gpu_trace.csv
    python scripts/gpu_timeline.py run --kineto tl.json [...]   # without nsys: PyTorch's profiler
    python scripts/gpu_timeline.py report tl.json                # (CUPTI) records MLX's kernels too
    python scripts/gpu_timeline.py run --throughput [--k=K] --kineto tp.json  # the bench's throughput form
    python scripts/gpu_timeline.py report --throughput tp.json
    python scripts/gpu_timeline.py run --throughput --pipelined=4 --only=dynamic --kineto tp.json

Unlike `gpu_profile.py` (Nsight Compute: each kernel alone, serialised), this keeps the kernels
as MLX launches them: `run` applies each case of gpu_profile.CASES REPEATS times between two
marker launches (once before, to build the kernels); `report` takes the last application of
each case and lists its kernels in stream order with their durations and the idle gaps before
them, then the span from the first kernel's start to the last one's end. Span minus the sum of
durations is the time the GPU waited between kernels (launch and host time).

`--throughput` times each large case as `mhc-mlx bench` does (bench/timing.throughput_us: K
applications on K rotated inputs built first, then one eval), and the copy floor's `x * 1.5` the
same way, printing the host's µs per application; `report --throughput` then lists each eval's
kernels by name (count, mean duration), its span, the time no kernel ran, its largest gaps, and
(from a Kineto trace) the host's CUDA runtime and driver calls meanwhile by total time. So a bench
row's time splits into the kernels' own time (inputs not in L2), the GPU's idle and host work.
`--pipelined=E` hands E evals of the K applications to MLX back to back instead (mx.async_eval,
as bench/timing.pipelined_throughput_us), all between the same two markers; `--only=WORD` keeps
the throughput cases whose site is WORD (and the copy).
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
    flags = [a for a in args if "=" not in a]
    values = dict(a.split("=", 1) for a in args if "=" in a)  # the last of a repeated flag wins
    unknown = [a for a in flags if a not in ("--glue-packs", "--read-step", "--throughput")]
    unknown += [f"{k}={v}" for k, v in values.items() if k not in ("--k", "--pipelined", "--only")]
    if unknown:
        print(f"unknown flag(s) {' '.join(unknown)}; known: --glue-packs --read-step --throughput --k=K "
              "--pipelined=E --only=SITE --kineto PATH", file=sys.stderr)
        return 2
    sites = sorted({c[0] for c in THROUGHPUT_CASES} - {"copy"})
    if values.get("--only", sites[0]) not in sites:
        print(f"--only={values['--only']}: the site is one of {', '.join(sites)}", file=sys.stderr)
        return 2
    for flag in ("--k", "--pipelined"):
        if flag in values and not (values[flag].isdigit() and int(values[flag]) > 0):
            print(f"{flag}={values[flag]}: needs a positive integer", file=sys.stderr)
            return 2
    if kineto is not None:
        import torch

        torch.cuda.init()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            rc = _run_cases(flags, values)
        prof.export_chrome_trace(kineto)
        return rc
    return _run_cases(flags, values)


def _run_cases(flags: list[str], values: dict[str, str]) -> int:
    from mhc_mlx import kernels
    from mhc_mlx.kernels import coefficients

    if "--glue-packs" in flags:
        coefficients.GLUE_PACKS = True
    if "--read-step" in flags:
        kernels.FUSED_READ_STEP = True
    if "--throughput" in flags:
        k = int(values["--k"]) if "--k" in values else None
        return _run_throughput(k, int(values.get("--pipelined", 1)), values.get("--only"))
    return gpu_profile.run(REPEATS)


THROUGHPUT_CASES = tuple(c for c in CASES if c[2][0] > 1) + (("copy", "x * 1.5", (64 << 20,)),)


def _run_throughput(k: int | None = None, evals: int = 1, only: str | None = None) -> int:
    """Each THROUGHPUT_CASES case timed once as the bench times it, between two markers (k: that
    many applications per eval instead of the bench's rotation; evals > 1: that many evals of them
    handed over back to back by mx.async_eval; only: the cases of that site and the copy)."""
    import time

    import mlx.core as mx

    from mhc_mlx.bench import cases, timing
    from mhc_mlx.dispatch import use_backend

    for i, (site, pass_, shape) in enumerate(THROUGHPUT_CASES):
        if only is not None and site not in (only, "copy"):
            gpu_profile.mark(i)  # an empty pair: the report numbers the cases by marker pairs
            gpu_profile.mark(i)
            continue
        if site == "copy":  # timing.copy_floor's arrays: 128 MB of bfloat16 each
            K = k or timing.rotation(4 * shape[0])
            xs = [mx.random.normal(shape).astype(mx.bfloat16) for _ in range(K)]
            mx.eval(xs)
            apply = lambda a: a * 1.5  # noqa: E731
        else:
            case = cases.Case(site, pass_, shape, "bfloat16", "throughput")
            K = k or timing.rotation(case.floor_bytes())
            apply, xs = cases.prepare(case, K)
        with use_backend("kernels"):
            for _ in range(2):  # builds every kernel, warms MLX's buffer cache
                mx.eval([apply(x) for x in xs])
            batches = [[apply(x) for x in xs] for _ in range(evals)]
            mx.synchronize()
            gpu_profile.mark(i)
            t0 = time.perf_counter()
            if evals == 1:  # as bench/timing.throughput_us
                mx.eval(batches[0])
            else:  # as bench/timing.pipelined_throughput_us
                for outs in batches:
                    mx.async_eval(outs)
                mx.synchronize()
            us = 1e6 * (time.perf_counter() - t0) / (K * evals)
            gpu_profile.mark(i)
            del batches
        print(f"case {i}: {site} {pass_} {'x'.join(map(str, shape))}: K = {K}, {evals} eval(s), "
              f"host {us:.1f} µs per application", flush=True)
    return 0


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


def _between_markers(kernels) -> dict[int, list]:
    marks, per_case = 0, {}
    for t0, dur, name in kernels:
        if MARKER in name:
            marks += 1
            continue
        if marks % 2 == 1:
            per_case.setdefault(marks // 2, []).append((t0, dur, name))
    return per_case


def _host_calls(path: str) -> dict[int, tuple[float, dict[str, list]]]:
    """From a Kineto trace: per case, (host ns between its two marker launches, the CUDA runtime
    and driver calls made in between by name: their durations in ns). Empty for nsys CSVs."""
    if not path.endswith(".json"):
        return {}
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    calls = sorted((float(e["ts"]) * 1e3, float(e.get("dur", 0.0)) * 1e3, e["name"], e.get("args", {}).get("correlation"))
                   for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and "ts" in e)
    marker_ids = [e.get("args", {}).get("correlation") for e in sorted(events, key=lambda e: float(e.get("ts", 0)))
                  if e.get("cat") == "kernel" and MARKER in e.get("name", "")]
    launch_at = {c: t for t, _, _, c in calls if c is not None}
    out = {}
    for i in range(len(marker_ids) // 2):
        a, b = launch_at.get(marker_ids[2 * i]), launch_at.get(marker_ids[2 * i + 1])
        if a is None or b is None:
            continue
        by_name: dict[str, list] = {}
        for t, dur, name, _ in calls:
            if a < t < b:
                by_name.setdefault(name, []).append(dur)
        out[i] = (b - a, by_name)
    return out


def report_throughput(path: str) -> int:
    per_case = _between_markers(_kernels(path))
    host = _host_calls(path)
    for i, (site, pass_, shape) in enumerate(THROUGHPUT_CASES):
        ks = per_case.get(i, [])
        if not ks:
            continue
        # kernels overlap (MLX runs independent ones side by side): busy is their union
        busy, gaps, end = 0.0, [], None
        for t0, dur, name in ks:
            if end is not None and t0 > end:
                gaps.append((t0 - end, name))
            busy += max(0.0, t0 + dur - max(t0, end if end is not None else t0))
            end = t0 + dur if end is None else max(end, t0 + dur)
        span = end - ks[0][0]
        by_name: dict[str, list] = {}
        for _, dur, name in ks:
            by_name.setdefault(_short(name), []).append(dur)
        print(f"\n{site} {pass_} {'x'.join(map(str, shape))}: {len(ks)} kernels in one eval")
        print(f"  span {span / 1e3:.1f} µs, some kernel running {busy / 1e3:.1f} µs, none {(span - busy) / 1e3:.1f} µs")
        for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {len(durs):3d}×  mean {sum(durs) / len(durs) / 1e3:8.1f} µs  "
                  f"min {min(durs) / 1e3:8.1f}  max {max(durs) / 1e3:8.1f}  {name}")
        gaps.sort(reverse=True)
        print("  largest gaps (µs, before): " + ", ".join(f"{g / 1e3:.1f} {_short(n)[-40:]}" for g, n in gaps[:5]))
        if i in host:  # what the host spent its time on meanwhile (the eval between the markers)
            window, by_name = host[i]
            print(f"  host: {window / 1e3:.1f} µs between the marker launches; CUDA calls by total time:")
            for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:8]:
                print(f"    {len(durs):4d}×  total {sum(durs) / 1e3:8.1f} µs  max {max(durs) / 1e3:7.1f}  {name}")
    return 0 if per_case else 1


def report(path: str) -> int:
    per_case = _between_markers(_kernels(path))
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
    if len(sys.argv) == 4 and sys.argv[1:3] == ["report", "--throughput"]:
        sys.exit(report_throughput(sys.argv[3]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
