#!/usr/bin/env python3
"""Compile every kernel's CUDA source offline with nvcc (no GPU needed) and print ptxas usage.

    python scripts/gpu_compile_check.py --mlx-include /path/with/mlx/backend/cuda/device

The sources are rendered exactly as MLX's cuda_kernel generates them (kernels.build.render_cuda)
for a spread of template instances; registers, spills and shared memory are printed per kernel.
Needs nvcc and MLX's CUDA device headers (a checkout of ml-explore/mlx).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


from mhc_mlx.kernels import catalogue
from mhc_mlx.kernels.build import render_cuda


def experiment_instances() -> list:
    """scripts/tile_reuse.py's and backward_tile.py's kernels at the shapes gpu_experiments.py runs them."""
    import mlx.core as mx

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tile_reuse as tr

    bf, f32, i32 = mx.bfloat16, mx.float32, mx.int32
    out = [(tr.SUMSQ, (bf, i32), (f32,), [("T", bf)]), (tr.SCALE, (bf, f32, i32), (bf,), [("T", bf)])]
    for spec in (tr.LAST, tr.WAIT):
        template = [("T", bf), ("TT", 16), ("VPT", 4)] + ([("SPIN", tr.SPIN_LIMIT)] if spec is tr.WAIT else [])
        out.append((spec, (bf, i32, i32), (bf, f32), template))
    for S in (2, 4, 8):
        for spec in (tr.cluster_spec(S), tr.persistent_spec(S)):
            out.append((spec, (bf, i32), (bf,), [("T", bf), ("TT", 4), ("VPT", 4 * 8 // S), ("S", S)]))
    # scripts/backward_tile.py at C = 4096: tiles of 4 tokens in clusters of 8
    import backward_tile as bt

    base = [("T", bf), ("N", bt.N)]
    out += [(bt.SHARE, (bf, bf, bf, f32, f32, i32), (bf, f32), base), (bt.FINISH, (bf, bf, f32, i32), (bf,), base),
            (bt.fused_spec(8), (bf, bf, bf, f32, f32, i32), (bf,), base + [("TT", 4), ("S", 8)]),
            *[(bt.fused_async_spec(8), (bf, bf, bf, f32, f32, i32), (bf,),
               base + [("TT", 2), ("S", 8), ("TG", bt.ASYNC_THREADS), ("REREAD", reread), ("STAGES", 2)])
              for reread in (False, True)],
            (bt.fused_async_spec(4), (bf, bf, bf, f32, f32, i32), (bf,),
             base + [("TT", 1), ("S", 4), ("TG", bt.ASYNC_THREADS), ("REREAD", True), ("STAGES", 2)]),
            # the stage in dynamic shared memory: 256 threads, 3 tiles deep
            (bt.fused_async_spec(4, 3 * 256 * 9 * 16), (bf, bf, bf, f32, f32, i32), (bf,),
             base + [("TT", 2), ("S", 4), ("TG", 256), ("REREAD", True), ("STAGES", 3)])]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlx-include", required=True, help="folder holding mlx/backend/cuda/device/utils.cuh")
    ap.add_argument("--cccl", default="/usr/local/cuda/include/cccl", help="CUDA's cccl include folder")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--only", default="", help="substring of kernel names to compile")
    ap.add_argument("--experiments", action="store_true",
                    help="also the experiment-only kernels of scripts/ (tile_reuse.py, backward_tile.py)")
    args = ap.parse_args(argv)
    failures = 0
    instances = catalogue.instances() + catalogue.cuda_only_instances()
    if args.experiments:
        instances += experiment_instances()
    with tempfile.TemporaryDirectory() as tmp:
        for spec, in_dtypes, out_dtypes, template in instances:
            label = f"{spec.name}[{', '.join(f'{k}={v}' for k, v in template)}]"
            if args.only and args.only not in label:
                continue
            src = os.path.join(tmp, "k.cu")
            with open(src, "w") as f:
                f.write(render_cuda(spec, in_dtypes, out_dtypes, template))
            cmd = ["nvcc", f"-arch={args.arch}", "-cubin", "-std=c++17", "-I", args.mlx_include,
                   "-I", args.cccl, "-Xptxas", "-v", "-o", os.path.join(tmp, "k.cubin"), src]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                failures += 1
                print(f"FAIL {label}\n{res.stderr[-3000:]}")
                continue
            regs = re.search(r"Used (\d+) registers", res.stderr)
            spill = re.search(r"(\d+) bytes spill stores", res.stderr)
            smem = re.search(r"(\d+) bytes smem", res.stderr)
            print(f"ok   {label:<70} regs {regs.group(1) if regs else '?':>4}  "
                  f"spill {spill.group(1) if spill else '0':>5} B  smem {smem.group(1) if smem else '0':>6} B")
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
