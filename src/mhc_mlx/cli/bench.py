"""`mhc-mlx bench` (also `mhc-mlx-bench`): our kernels, compiled path and reference against the
seed packages and the copy floor of this device, in one run; prints a table, writes JSON + PNG."""

from __future__ import annotations

import argparse


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="seconds-long smoke run (CPU: compiled path and reference, tiny shapes)")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json and bench.png (default runs/bench)")
    p.add_argument("--overwrite", action="store_true", help="replace bench.json/bench.png if they exist")
    p.add_argument("--seeds", default=".seedpkgs",
                   help="folder with the seed wheels mhc_mlx-0.6.3 and mlx_mhc-0.4.1 ('' to skip them)")
    p.add_argument("--impl", default="",
                   help="comma list of kernels, compiled, reference, kernels+step, compiled+step (default: "
                        "the first three that run here); +step: each application under one mx.compile, "
                        "as a compiled training step")
    p.add_argument("--compiled-step", action="store_true",
                   help="add the +step form of the kernels and the compiled path to the default implementations")
    p.add_argument("--pipelined", action="store_true",
                   help="also time our throughput rows and the copy with several evals handed to MLX back "
                        "to back (mx.async_eval), so one eval's host work overlaps the GPU's run of the last; reported "
                        "beside the one-eval figures, on which the targets stay judged")
    p.add_argument("--only", default="", help="only cases whose id contains one of these comma-separated texts, e.g. 'static/fwd/4096'")
    p.add_argument("--candidates", action="store_true",
                   help="switch on the kernel candidates that are off by default (kernels.use_candidates, "
                        "docs/kernel-notes.md); "
                        "the JSON header records the kernel settings")


def run(args: argparse.Namespace) -> int:
    from ..bench import run as run_bench

    known = ("kernels", "compiled", "reference", "kernels+step", "compiled+step")
    impls = None
    if args.impl:
        impls = tuple(i.strip() for i in args.impl.split(",") if i.strip())
        bad = [i for i in impls if i not in known]
        if bad:
            raise ValueError(f"unknown --impl {', '.join(bad)}; choose from {', '.join(known)}")
    if args.candidates:
        from .. import kernels

        kernels.use_candidates(True)
    run_bench(args.out, quick=args.quick, seeds_dir=args.seeds or None, overwrite=args.overwrite,
              impls=impls, only=args.only, compiled_step=args.compiled_step, pipelined=args.pipelined)
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark kernels / compiled / reference / seed packages vs the copy floor")
    _add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    import sys

    parser = argparse.ArgumentParser(prog="mhc-mlx-bench", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:
        from .main import describe_error

        print(f"mhc-mlx-bench: error: {describe_error(e)}", file=sys.stderr)
        return 2
