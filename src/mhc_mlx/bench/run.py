"""One benchmark run: floors first, then every case on every implementation; JSON + PNG."""

from __future__ import annotations

import datetime
import os
import platform
import time

import mlx.core as mx

from .. import __version__, kernels
from ..kernels import build
from ..kernels.build import gpu_backend
from . import cases as bench_cases
from . import report, seeds, timing


def _cpu_affinity() -> list[int] | None:
    """The CPU cores this process may run on (Linux), recorded because pinning moved the B = 1
    rows: on the H200's host, unpinned processes differed by up to 1.7x in host time
    (docs/benchmarks.md, tenth session)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no sched_getaffinity
        return None


def _error_text(e: Exception) -> str:
    """A failed row's figure: the error's type and first line."""
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def run(out_dir: str, quick: bool = False, seeds_dir: str | None = ".seedpkgs", overwrite: bool = False,
        impls: tuple[str, ...] | None = None, only: str = "", log=print, compiled_step: bool = False,
        pipelined: bool = False) -> dict:
    """compiled_step: add the +step form (bench_cases.STEP) of the kernels and the compiled path.
    pipelined: also time our throughput rows and the copy with several evals handed to
    MLX back to back (timing.pipelined_throughput_us), reported beside the one-eval figures; the
    targets stay judged on the one-eval figures, the pipelined ones are listed apart."""
    json_path, png_path = report.output_paths(out_dir, overwrite)
    backend = gpu_backend()
    on_gpu = backend is not None and mx.default_device() == mx.gpu
    if impls is None:
        impls = ("kernels", "compiled", "reference") if on_gpu else ("compiled", "reference")
    if compiled_step:
        step = bench_cases.STEP
        impls = impls + tuple(i + step for i in impls if i in ("kernels", "compiled") and i + step not in impls)
    case_list = bench_cases.quick_cases() if quick else bench_cases.full_cases()
    if only:
        parts = [p for p in only.split(",") if p]
        matched = [c for c in case_list if any(p in c.id for p in parts)]
        if not matched:
            raise ValueError(f"--only {only!r} matches none of the {'quick' if quick else 'full'} run's "
                             f"cases; their ids look like {case_list[0].id!r}, {case_list[-1].id!r}")
        case_list = matched
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mhc_mlx": __version__, "mlx": mx.__version__, "backend": backend or "cpu",
        "device": str(mx.default_device()), "device_name": build.device_name(),
        "platform": platform.platform(), "quick": quick, "cpu_affinity": _cpu_affinity(), "pipelined": pipelined,
    }
    header["kernel_settings"] = kernels.settings()  # what the kernels would run (used on GPUs only)
    log(f"bench: {header}")
    copy_args = {"array_bytes": (1 << 20) if quick else (128 << 20), "repeats": 3 if quick else 10}
    copy = timing.copy_floor(**copy_args)
    tiny = timing.tiny_op_us(repeats=20 if quick else 300)
    trivial = timing.trivial_kernel_us(repeats=20 if quick else 300) if on_gpu else None
    log(f"copy floor: {copy['GBps']:.0f} GB/s ({copy['bytes'] / 1e6:.0f} MB in {copy['us']:.0f} µs); "
        f"tiny-op eval: {tiny:.1f} µs; one-line custom kernel eval: "
        f"{'n/a' if trivial is None else f'{trivial:.1f} µs'}")
    copies_pipelined = [timing.copy_floor(**copy_args, pipelined=True)] if pipelined else []
    rows = []
    latency_reps, tput_reps = (3, 3) if quick else (100, 11)
    for case in case_list:
        K = 3 if quick else timing.rotation(case.floor_bytes())
        for impl in impls:
            t0 = time.perf_counter()
            try:
                us = bench_cases.time_ours(case, impl, K, latency_reps if case.mode == "latency" else tput_reps)
            except Exception as e:  # noqa: BLE001 -- a row says why, the run goes on
                us = _error_text(e)
            row = {"case": case.as_dict(), "impl": impl, "us": us, "K": K}
            paired = ""
            if isinstance(us, dict):  # a latency row, timed beside the tiny op
                row.update(us=us["us"], tiny_paired_us=us["tiny_us"], x_tiny_paired=us["ratio"],
                           paired_rounds=us["rounds"])
                paired = f"  (× {us['ratio']:.2f} the tiny op beside it, {us['tiny_us']:.1f} µs)"
            if pipelined and case.mode == "throughput" and isinstance(us, float):
                try:  # four evals' outputs held at once: a failure (memory) is the row's, not the run's
                    row["pipelined_us"] = bench_cases.time_ours(case, impl, K, 3 if quick else 5, pipelined=True)
                    paired = f"  (pipelined {row['pipelined_us']:.1f} µs)"
                except Exception as e:  # noqa: BLE001
                    row["pipelined_us"] = _error_text(e)
                    paired = f"  (pipelined: {row['pipelined_us']})"
            rows.append(row)
            us = row["us"]
            log(f"  {case.id:<44} {impl:<10} {us if isinstance(us, str) else f'{us:10.1f} µs'}"
                f"  ({time.perf_counter() - t0:.1f} s){paired}")
    # The copy is measured again after the rows and the faster of the two is the floor: one
    # measurement alone varied 2646-3235 GB/s between runs on one H200, and a slow one would
    # flatter every row's share of it.
    again = timing.copy_floor(**copy_args)
    log(f"copy floor again after the rows: {again['GBps']:.0f} GB/s; the floor is the faster, "
        f"{max(copy['GBps'], again['GBps']):.0f} GB/s")
    copies = [copy, again]
    copy = max(copies, key=lambda c: c["GBps"])
    copy_pipelined = None
    if pipelined:
        copies_pipelined.append(timing.copy_floor(**copy_args, pipelined=True))
        copy_pipelined = max(copies_pipelined, key=lambda c: c["GBps"])
        log(f"pipelined copy floor before / after the rows: "
            f"{' / '.join('%.0f' % c['GBps'] for c in copies_pipelined)} GB/s; the floor is the faster")
    # The tiny op likewise, and the faster is the run's unit (seed rows, the chart): run V (H200,
    # 2026-11-30) measured 48.0 µs where the run before measured 23.8. The B = 1 targets use each
    # row's own tiny op, timed beside it (timing.paired_latency_us).
    tinies = [tiny, timing.tiny_op_us(repeats=20 if quick else 300)]
    tiny = min(tinies)
    log(f"tiny-op eval again after the rows: {tinies[1]:.1f} µs; the unit is the faster, {tiny:.1f} µs")
    if seeds_dir and not quick:
        mx.clear_cache()  # the seeds run in other processes: give them this one's cached GPU memory
        static = [c for c in case_list if c.site == "static"]
        for package in seeds.SEEDS:
            folder = seeds.install(seeds_dir, package)
            if folder is None:
                log(f"  {package}: wheel not found in {seeds_dir} (pip download it there); skipped")
                continue
            jobs = []
            for c in static:
                K = 1 if c.mode == "latency" else timing.rotation(c.floor_bytes())
                jobs.append({**c.as_dict(), "K": K, "repeats": latency_reps if c.mode == "latency" else 5})
            t0 = time.perf_counter()
            got = seeds.run(package, folder, jobs)
            log(f"  {seeds.LABELS[package]}: {len(jobs)} cases in {time.perf_counter() - t0:.0f} s")
            for c, job in zip(static, jobs):
                rows.append({"case": c.as_dict(), "impl": seeds.LABELS[package], "us": got.get(c.id), "K": job["K"]})
    report.enrich(rows, copy["GBps"], tiny)
    rows.sort(key=lambda r: ([c.id for c in case_list].index(r["case"]["id"]),
                             report.IMPL_ORDER.index(r["impl"]) if r["impl"] in report.IMPL_ORDER else 99))
    goals = report.targets(rows, tiny) if "kernels" in impls else []
    step_impl = "kernels" + bench_cases.STEP
    goals_step = report.targets(rows, tiny, impl=step_impl) if step_impl in impls else []
    goals_pipelined = []
    if copy_pipelined is not None:
        report.enrich_pipelined(rows, copy_pipelined["GBps"])
        goals_pipelined = report.targets(report.pipelined_rows(rows), tiny) if "kernels" in impls else []
    payload = {"header": header, "copy_floor": copy, "copy_floor_runs": copies, "tiny_op_us": tiny,
               "tiny_op_runs_us": tinies, "trivial_kernel_us": trivial, "rows": rows, "targets": goals,
               "targets_step": goals_step, "copy_floor_pipelined": copy_pipelined,
               "copy_floor_pipelined_runs": copies_pipelined, "targets_pipelined": goals_pipelined,
               "kernels": {op: v for op, v in kernels.status().items()}}
    report.write_json(json_path, payload)
    try:
        report.chart(png_path, rows, f"mhc-mlx bench — {header['backend']} — MLX {header['mlx']} — "
                                     f"copy floor {copy['GBps']:.0f} GB/s, tiny op {tiny:.1f} µs")
    except ImportError:
        png_path = None
        log("no chart: matplotlib is not installed (pip install 'mhc-mlx[plot]')")
    log("")
    log(report.table(rows))
    if copy_pipelined is not None:
        log("")
        log(report.pipelined_table(rows, copy_pipelined["GBps"]))
    for title, judged in (("kernels", goals), (f"{step_impl}: the application compiled as the caller's step", goals_step),
                          ("kernels, pipelined figures; the targets above are judged on one eval's", goals_pipelined)):
        if judged:
            log(f"\ntargets ({title}, this run):")
            for g in judged:
                log(f"  {'MET ' if g['met'] else 'MISS'} {g['target']}: {g['value']:.2f} {g['unit']} (limit {g['limit']})")
    log(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return payload
