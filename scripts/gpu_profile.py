#!/usr/bin/env python3
"""Where each target case's GPU time goes, kernel by kernel, from Nsight Compute (ncu).

    ncu --clock-control none --metrics gpu__time_duration.sum --csv --log-file prof.csv \
        python scripts/gpu_profile.py run
    python scripts/gpu_profile.py report prof.csv

`run` applies each case of the bench's targets once to build its kernels, then once more
between two marker launches; `report` sums the durations ncu measured for the kernels between
the markers (each kernel alone, as ncu serialises them) and lists them. The sum is the GPU's
own work; what a bench figure adds to it is launch gaps and host time.
"""

from __future__ import annotations

import csv
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

    for i, (site, pass_, shape) in enumerate(CASES):
        case = cases.Case(site, pass_, shape, "bfloat16", "latency" if shape[0] == 1 else "throughput")
        apply, xs = cases.prepare(case, 1)
        with use_backend("kernels"):
            mx.eval(apply(xs[0]))  # builds every kernel
            mark(i)
            for _ in range(repeats):
                mx.eval(apply(xs[0]))
            mark(i)
        print(f"case {i}: {case.id}", flush=True)
    return 0


def _us(value: str, unit: str) -> float:
    v = float(value.replace(",", ""))
    return v * {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}.get(unit, float("nan"))


def _short(name: str) -> str:
    name = re.sub(r"<.*", "", name)
    name = re.sub(r"\(.*", "", name)
    return name[-70:]


def report(path: str) -> int:
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # ncu prints its own notes before the CSV
    rows = [r for r in csv.DictReader(lines) if r.get("Metric Name") == "gpu__time_duration.sum"]
    rows.sort(key=lambda r: int(r["ID"]))
    marks = 0
    per_case: dict[int, list] = defaultdict(list)
    for r in rows:
        if MARKER in r["Kernel Name"]:
            marks += 1
            continue
        if marks % 2 == 1:  # between the two markers of case marks // 2
            per_case[marks // 2].append((_short(r["Kernel Name"]), _us(r["Metric Value"], r["Metric Unit"])))
    for i, (site, pass_, shape) in enumerate(CASES):
        kernels = per_case.get(i, [])
        total = sum(us for _, us in kernels)
        print(f"\n{site} {pass_} {'x'.join(map(str, shape))} bf16: {len(kernels)} kernels, {total:.1f} µs of GPU time")
        merged: dict[str, list] = defaultdict(list)
        for name, us in kernels:
            merged[name].append(us)
        for name, times in sorted(merged.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {sum(times):8.1f} µs  {len(times):2d}×  {name}")
    return 0 if per_case else 1


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "run":
        sys.exit(run())
    if len(sys.argv) == 3 and sys.argv[1] == "report":
        sys.exit(report(sys.argv[2]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
