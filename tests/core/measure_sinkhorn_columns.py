"""Measure how far sinkhorn_knopp's column sums are from 1 after 20 iterations (not a test).

    python tests/core/measure_sinkhorn_columns.py [--scale 0.25]

For logits ~ N(0, 1) per cell and each n, prints quantiles and the maximum of the per-matrix
largest |column sum - 1| over many matrices, from the float64 reference (the convergence
error) and from mhc_mlx in float32 on a slice of the same matrices (both backends), with the
largest gap between the float32 and float64 column sums (the rounding error). The tolerances
in test_core_sinkhorn.py come from this. --scale shrinks the counts for a quick look.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reference64 as ref  # noqa: E402

import mhc_mlx as mhc  # noqa: E402

COUNTS = {1: 200_000, 2: 5_000_000, 3: 5_000_000, 4: 5_000_000, 8: 1_000_000, 16: 200_000, 32: 40_000}
CHUNK_CELLS = 20_000_000  # float64 cells per chunk, to bound memory


def column_error(P: np.ndarray) -> np.ndarray:
    return np.abs(P.sum(-2) - 1.0).max(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print("n  matrices  99th pct  99.99th pct  max (float64) | float32 max: reference compiled | max |col32-col64|")
    for n, count in COUNTS.items():
        count = max(1000, int(count * args.scale))
        chunk = max(1, CHUNK_CELLS // (n * n))
        errs64, errs32, gap = [], {"reference": [], "compiled": []}, 0.0
        for start in range(0, count, chunk):
            L = rng.standard_normal((min(chunk, count - start), n, n)).astype(np.float32)
            P64 = ref.sinkhorn_knopp(L, 20)
            errs64.append(column_error(P64))
            if start == 0:  # float32 on the first chunk (up to 200k matrices)
                head = L[:200_000]
                for path in errs32:
                    with mhc.use_backend(path):
                        P32 = np.array(mhc.sinkhorn_knopp(mx.array(head)), dtype=np.float64)
                    errs32[path].append(column_error(P32))
                    gap = max(gap, float(np.abs(P32.sum(-2) - P64[: len(head)].sum(-2)).max()))
        e = np.concatenate(errs64)
        q99, q9999 = np.quantile(e, [0.99, 0.9999])
        f32 = " ".join(f"{np.concatenate(v).max():.1e}" for v in errs32.values())
        print(f"{n:<2} {e.size:>9}  {q99:.1e}   {q9999:.1e}      {e.max():.1e}        | {f32} | {gap:.1e}", flush=True)


if __name__ == "__main__":
    main()
