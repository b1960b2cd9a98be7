#!/usr/bin/env python3
"""Where each target case's GPU time goes, kernel by kernel, from Nsight Compute (ncu).

    ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
        --csv --log-file prof.csv python scripts/gpu_profile.py run
    python scripts/gpu_profile.py report prof.csv
    ... python scripts/gpu_profile.py run build.DEVICE_PARAMS=1   # with kernel settings switched first

`run` applies each case of the bench's targets once to build its kernels, then once more
between two marker launches, and last the copy the bench's floor times (x * 1.5 on a
4096 x 4 x 4096 bf16 x) the same way; `report` sums the durations ncu measured for the kernels
between the markers (each kernel alone, as ncu serialises them, its caches flushed first) and
lists them. The sum is the GPU's own work; what a bench figure adds to it is launch gaps and host
time. Where the DRAM byte counters were collected too, each kernel's bytes and rate are listed
beside it, and its rate as a % of the copy's under ncu: which kernels stream below the copy.
"""

from __future__ import annotations

import csv
import math
import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

MARKER = "mhc_profile_marker"
CASES = (
    ("static", "fwd", (4096, 4, 4096)),
    ("dynamic", "fwd", (4096, 4, 4096)),
    ("static", "fwd+bwd", (4096, 4, 4096)),
    ("dynamic", "fwd+bwd", (4096, 4, 4096)),
    ("static", "fwd", (1, 4, 512)),
    ("dynamic", "fwd", (1, 4, 512)),
)
# the reference rate, profiled last: the bench's copy floor op on x of the large cases' size
COPY_CASE = ("copy", "x * 1.5", (4096, 4, 4096))


def mark(i: int) -> None:
    """One eval of a one-thread marker kernel writing i: the profiles split the stream at these."""
    import mlx.core as mx

    from mhc_mlx.kernels.build import KernelSpec, int_params, launch

    marker = KernelSpec(name=MARKER, inputs=("iparam",), outputs=("out",),
                        body="  if (KTID == 0) out[0] = iparam[0];\n")
    mx.eval(launch(marker, [int_params(i)], [((1,), mx.int32)], 32, 32, []))


def run(repeats: int = 1) -> int:
    """Each case applied once to build its kernels, then `repeats` times between two markers."""
    import mlx.core as mx

    from mhc_mlx.bench import cases
    from mhc_mlx.dispatch import use_backend

    applications = []
    for site, pass_, shape in CASES:
        case = cases.Case(site, pass_, shape, "bfloat16", "latency" if shape[0] == 1 else "throughput")
        apply, xs = cases.prepare(case, 1)
        applications.append((case.id, apply, xs[0]))
    copy_x = mx.random.normal(COPY_CASE[2]).astype(mx.bfloat16)
    applications.append((f"copy {COPY_CASE[1]}", lambda x: x * 1.5, copy_x))
    for i, (label, apply, x) in enumerate(applications):
        with use_backend("kernels"):
            mx.eval(apply(x))  # builds every kernel
            mark(i)
            for _ in range(repeats):
                mx.eval(apply(x))
            mark(i)
        print(f"case {i}: {label}", flush=True)
    return 0


def _us(value: str, unit: str) -> float:
    v = float(value.replace(",", ""))
    return v * {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}.get(unit, math.nan)


def _short(name: str) -> str:
    name = re.sub(r"<.*", "", name)
    name = re.sub(r"\(.*", "", name)
    return name[-70:]


_BYTES = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12,
          "KB": 1e3, "MB": 1e6, "GB": 1e9}
_METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum")


def _value(row) -> float:
    if row["Metric Name"] == "gpu__time_duration.sum":
        return _us(row["Metric Value"], row["Metric Unit"])
    return float(row["Metric Value"].replace(",", "")) * _BYTES.get(row["Metric Unit"], math.nan)


def report(path: str) -> int:
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # ncu prints its own notes before the CSV
    # one row per (kernel launch, metric): gather each launch's metrics by its ID
    launches: dict[int, dict] = {}
    for r in csv.DictReader(lines):
        if r.get("Metric Name") in _METRICS:
            launch = launches.setdefault(int(r["ID"]), {"name": r["Kernel Name"]})
            launch[r["Metric Name"]] = _value(r)
    marks = 0
    per_case: dict[int, list] = defaultdict(list)
    for _, launch in sorted(launches.items()):
        if MARKER in launch["name"]:
            marks += 1
            continue
        if marks % 2 == 1 and "gpu__time_duration.sum" in launch:  # between the markers of case marks // 2
            moved = launch.get("dram__bytes_read.sum", math.nan) + launch.get("dram__bytes_write.sum", math.nan)
            per_case[marks // 2].append((_short(launch["name"]), launch["gpu__time_duration.sum"], moved))
    cases = [*CASES, COPY_CASE]
    copy = per_case.get(len(CASES), [])
    copy_rate = sum(b for _, _, b in copy) / sum(us for _, us, _ in copy) if copy else math.nan  # bytes/µs
    if copy:
        print(f"copy {COPY_CASE[1]} {'x'.join(map(str, COPY_CASE[2]))} bf16 under ncu: "
              f"{sum(us for _, us, _ in copy):.1f} µs, {copy_rate / 1e3:.0f} GB/s of DRAM traffic")
    for i, (site, pass_, shape) in enumerate(cases[:-1]):
        kernels = per_case.get(i, [])
        total = sum(us for _, us, _ in kernels)
        moved = sum(b for _, _, b in kernels)
        print(f"\n{site} {pass_} {'x'.join(map(str, shape))} bf16: {len(kernels)} kernels, {total:.1f} µs of GPU time"
              + (f", {moved / 1e6:.1f} MB of DRAM traffic; at the copy's rate {moved / copy_rate:.1f} µs"
                 if not math.isnan(moved) and not math.isnan(copy_rate) else ""))
        merged: dict[str, list] = defaultdict(list)
        for name, us, b in kernels:
            merged[name].append((us, b))
        for name, runs in sorted(merged.items(), key=lambda kv: -sum(us for us, _ in kv[1])):
            us, b = sum(u for u, _ in runs), sum(v for _, v in runs)
            rate = "" if math.isnan(b) else f"  {b / 1e6:8.1f} MB  {b / us / 1e3:5.0f} GB/s"
            pct = "" if math.isnan(b) or math.isnan(copy_rate) else f"  {100 * b / us / copy_rate:5.1f} % of the copy's"
            print(f"  {us:8.1f} µs  {len(runs):2d}×{rate}{pct}  {name}")
    return 0 if per_case else 1


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "run":
        # optional kernel settings first, as scripts/bench_with.py takes them (module.ATTRIBUTE=value)
        from mhc_mlx import kernels

        try:
            kernels.assign_settings(sys.argv[2:])
        except ValueError as err:
            raise SystemExit(f"gpu_profile.py: {err}") from None
        sys.exit(run())
    if len(sys.argv) == 3 and sys.argv[1] == "report":
        sys.exit(report(sys.argv[2]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
