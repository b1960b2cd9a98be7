"""Tables, JSON and the PNG chart of a benchmark run, and the issue's speed targets."""

from __future__ import annotations

import json
import math
import os

IMPL_ORDER = ("kernels", "kernels+step", "compiled", "compiled+step", "reference", "mhc-mlx 0.6.3", "mlx-mhc 0.4.1")


def x_tiny(row: dict, tiny_us: float) -> float:
    """A row's × tiny op: against the tiny op timed beside it where it was (our latency rows,
    timing.paired_latency_us), else against the run's unit."""
    return row.get("x_tiny_paired", row["us"] / tiny_us)


def enrich(rows: list[dict], copy_GBps: float, tiny_us: float) -> None:
    """Add GB/s, % of the copy floor, × tiny op and the kernels' speed-up to every row."""
    ours = {r["case"]["id"]: r["us"] for r in rows if r["impl"] == "kernels" and isinstance(r.get("us"), float)}
    for r in rows:
        us = r.get("us")
        if not isinstance(us, float):
            continue
        r["GBps"] = r["case"]["floor_bytes"] / us / 1e3
        r["pct_of_copy"] = 100.0 * r["GBps"] / copy_GBps
        r["x_tiny_op"] = us / tiny_us
        r["x_tiny"] = x_tiny(r, tiny_us)
        k = ours.get(r["case"]["id"])
        if k:
            r["kernels_speedup"] = us / k


def enrich_pipelined(rows: list[dict], copy_GBps: float) -> None:
    """GB/s and % of the pipelined copy floor for every row timed pipelined (pipelined_us)."""
    for r in rows:
        us = r.get("pipelined_us")
        if isinstance(us, float):
            r["pipelined_GBps"] = r["case"]["floor_bytes"] / us / 1e3
            r["pipelined_pct_of_copy"] = 100.0 * r["pipelined_GBps"] / copy_GBps


def pipelined_rows(rows: list[dict]) -> list[dict]:
    """The rows timed pipelined, with their pipelined figures in place of the one-eval ones (for
    targets())."""
    return [{**r, "us": r["pipelined_us"], "GBps": r["pipelined_GBps"], "pct_of_copy": r["pipelined_pct_of_copy"]}
            for r in rows if isinstance(r.get("pipelined_us"), float) and "pipelined_pct_of_copy" in r]


def pipelined_table(rows: list[dict], copy_GBps: float) -> str:
    head = f"{'pipelined (copy timed alike: ' + f'{copy_GBps:.0f} GB/s)':<44} {'impl':<14} {'one eval':>10} " \
           f"{'pipelined':>10} {'%floor':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "pipelined_pct_of_copy" in r:
            lines.append(f"{r['case']['id']:<44} {r['impl']:<14} {r['us']:>10.1f} {r['pipelined_us']:>10.1f} "
                         f"{r['pipelined_pct_of_copy']:>6.0f}%")
        elif isinstance(r.get("pipelined_us"), str):  # its error
            lines.append(f"{r['case']['id']:<44} {r['impl']:<14} {r['us']:>10.1f} {r['pipelined_us'][:60]}")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = f"{'case':<44} {'impl':<14} {'µs':>10} {'GB/s':>8} {'%floor':>7} {'×tiny':>7} {'kern×':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        us = r.get("us")
        if isinstance(us, float):
            lines.append(
                f"{r['case']['id']:<44} {r['impl']:<14} {us:>10.1f} {r['GBps']:>8.0f} "
                f"{r['pct_of_copy']:>6.0f}% {r['x_tiny']:>7.2f} {r.get('kernels_speedup', float('nan')):>7.2f}"
            )
        else:
            lines.append(f"{r['case']['id']:<44} {r['impl']:<14} {str(us)[:60]}")
    if any("x_tiny_paired" in r for r in rows):
        lines.append("×tiny: our latency rows against the tiny op timed beside them (alternating rounds); "
                     "the other rows against the run's unit")
    return "\n".join(lines)


def _find_row(rows, site, pass_, shape, dtype, mode, impl="kernels"):
    for r in rows:
        c = r["case"]
        if (c["site"], c["pass"], tuple(c["shape"]), c["dtype"], c["mode"], r["impl"]) == (
            site, pass_, shape, dtype, mode, impl
        ) and isinstance(r.get("us"), float):
            return r
    return None


def targets(rows: list[dict], tiny_us: float, impl: str = "kernels") -> list[dict]:
    """The issue's H100 bfloat16 targets, judged on this run's rows of `impl` (only those
    measured): the eager kernels' rows, or "kernels+step" (the caller's step compiled)."""
    big, bf = (4096, 4, 4096), "bfloat16"
    out = []

    def find(*key):
        return _find_row(rows, *key, impl=impl)

    def add(name, row, value, limit, unit, ok):
        if row is not None:
            out.append({"target": name, "value": value, "limit": limit, "unit": unit, "met": ok})

    r = find("static", "fwd", big, bf, "throughput")
    add("static fwd 4096x4x4096: ≥ 80 % of copy bandwidth", r, r and r["pct_of_copy"], 80, "%",
        r and r["pct_of_copy"] >= 80)
    r = find("static", "fwd", (1, 4, 512), bf, "latency")
    add("static fwd B=1 n=4 C=512: ≤ 1.5 × tiny-op eval", r, r and x_tiny(r, tiny_us), 1.5, "×",
        r and x_tiny(r, tiny_us) <= 1.5)
    r = find("dynamic", "fwd", (1, 4, 512), bf, "latency")
    add("dynamic fwd B=1 n=4 C=512: ≤ 2.5 × tiny-op eval", r, r and x_tiny(r, tiny_us), 2.5, "×",
        r and x_tiny(r, tiny_us) <= 2.5)
    r = find("dynamic", "fwd", big, bf, "throughput")
    add("dynamic fwd 4096 tokens C=4096: ≥ 70 % of its (4n+2)·C·2 B floor", r, r and r["pct_of_copy"], 70, "%",
        r and r["pct_of_copy"] >= 70)
    for site in ("dynamic", "static"):
        r = find(site, "fwd+bwd", big, bf, "throughput")
        floor = "(7n+2)·C·2 B/token" if site == "dynamic" else "5·n·C·2 B/token"
        add(f"{site} fwd+bwd 4096x4x4096: ≥ 60 % of its {floor} floor", r, r and r["pct_of_copy"], 60, "%",
            r and r["pct_of_copy"] >= 60)
    return out


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def chart(path: str, rows: list[dict], title: str) -> None:
    """Grouped bars: µs per case (log scale), one bar per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = []
    for r in rows:
        if r["case"]["id"] not in ids:
            ids.append(r["case"]["id"])
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in rows)]
    width = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(ids) * max(1, len(impls)) / 2), 5.5))
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for i, cid in enumerate(ids):
            for r in rows:
                if r["case"]["id"] == cid and r["impl"] == impl and isinstance(r.get("us"), float):
                    xs.append(i + k * width)
                    ys.append(r["us"])
        ax.bar(xs, ys, width=width, label=impl)
    ax.set_yscale("log")
    ax.set_ylabel("µs per application (log)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ids))])
    ax.set_xticklabels([c.replace("/throughput", "").replace("/latency", " (lat)") for c in ids],
                       rotation=60, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finite(v) -> bool:
    return isinstance(v, float) and math.isfinite(v)


def output_paths(out_dir: str, overwrite: bool) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = (os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.png"))
    if not overwrite:
        for p in paths:
            if os.path.exists(p):
                raise ValueError(f"{p} exists; pass --overwrite to replace it, or another --out")
    return paths
