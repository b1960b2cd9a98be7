#!/usr/bin/env python3
"""Run an `mhc-mlx` command with the kernel candidates that passed their GPU check switched on.

    python scripts/kernel_candidates.py --from runs/gpu_session -- bench --out runs/bench
    python scripts/kernel_candidates.py --use mma,tb8 -- bench --only static/fwd/4096

`--from DIR` reads DIR/<candidate>/gpu_check.json as `bash scripts/gpu_session.sh check` writes
them and switches on each candidate whose check ran and passed every case; `--use` names them.
The candidates are the off-by-default module switches described in docs/kernel-notes.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

CANDIDATES = ("mma", "gemm", "tb8", "layer_vjp")


def enable(names) -> dict:
    """Switch the named candidates on in this process; returns the resulting settings."""
    from mhc_mlx.kernels import coefficients, layer

    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidate(s) {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}")
    if "mma" in names and "gemm" in names:
        names = [n for n in names if n != "gemm"]  # one dynamic form; the tensor-core kernel reads x once
    if "mma" in names:
        coefficients.DYNAMIC_FORM = "mma"
    elif "gemm" in names:
        coefficients.DYNAMIC_FORM = "gemm"
    if "tb8" in names:
        coefficients.TOKENS_PER_BLOCK_SMALL_N = 8
    if "layer_vjp" in names:
        layer.USE_FUSED_VJP = True
    return settings()


def settings() -> dict:
    from mhc_mlx import kernels

    return kernels.settings()


def passed(folder: str) -> list[str]:
    """Candidates whose DIR/<name>/gpu_check.json is complete, has rows, and has no failed row."""
    good = []
    for name in CANDIDATES:
        path = os.path.join(folder, name, "gpu_check.json")
        try:
            with open(path) as f:
                run = json.load(f)
            rows = run["rows"] if run.get("complete") else None
        except (OSError, ValueError, KeyError):
            rows = None
        if rows is None:
            print(f"candidate {name}: no complete check at {path}: left off")
            continue
        bad = [r for r in rows if not r["ok"]]
        print(f"candidate {name}: {len(rows) - len(bad)}/{len(rows)} checks passed"
              f"{'' if rows and not bad else ': left off'}")
        if rows and not bad:
            good.append(name)
    return good


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="folder", default="", help="folder of candidate gpu_check runs")
    ap.add_argument("--use", default="", help="comma list of candidates to switch on")
    args = ap.parse_args(argv)
    names = [n for n in args.use.split(",") if n]
    if args.folder:
        names += passed(args.folder)
    print(f"kernel settings: {enable(names)}", flush=True)
    if not rest:
        return 0
    from mhc_mlx.cli.main import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main())
