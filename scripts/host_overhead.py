#!/usr/bin/env python3
"""Python graph-building time per call (no evaluation) of each module at B = 1, n = 4, C = 512.

    python scripts/host_overhead.py            # this machine's real paths
    python scripts/host_overhead.py --stand-in # the kernel path on a CPU-only MLX
    python scripts/host_overhead.py --stand-in --latency  # ... as on a GPU: few-token calls compiled

At B = 1 the host builds the graph on every call, so its cost adds to the device time
(docs/kernel-notes.md). With --stand-in, kernel launches are replaced by a zeros op of the
declared output shape, so the kernel path's Python (checks, dispatch, wrappers,
mx.custom_function) can be timed where no GPU exists; the stand-in itself costs about one op.
Prints a table: module, path, µs per call (median of 5 runs of 500 calls).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx


def stand_in_kernels() -> None:
    from mhc_mlx import kernels
    from mhc_mlx.kernels import build

    class StandIn:
        def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None):
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]

    build.compiled_kernel = lambda spec, backend: StandIn()
    build.gpu_backend = lambda: "cuda"
    build.on_gpu = lambda *a: True
    kernels.gpu_backend = build.gpu_backend
    kernels.on_gpu = build.on_gpu


def per_call_us(fn, calls: int = 500, runs: int = 5) -> float:
    for _ in range(50):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stand-in", action="store_true", help="time the kernel path with stand-in launches")
    ap.add_argument("--latency", action="store_true",
                    help="with --stand-in: stand in a GPU's presence too, so few-token calls take the compiled "
                         "latency paths (kernels.build.COMPILE_LATENCY) as they do on a GPU")
    args = ap.parse_args(argv)
    if args.latency and not args.stand_in:
        ap.error("--latency needs --stand-in (on a machine with a GPU the latency paths are the real ones)")
    if args.stand_in:
        stand_in_kernels()
    if args.latency:
        from mhc_mlx.kernels import build

        build.gpu_present = lambda: True

    from mhc_mlx import HyperConnection, MHCLayer, dispatch

    n, C = 4, 512
    x = mx.random.normal((1, n, C)).astype(mx.bfloat16)
    one = mx.zeros((1,))
    static, dynamic, layer = HyperConnection(C, n, dynamic=False), HyperConnection(C, n), MHCLayer(n, C)
    mx.eval(x, one, static.parameters(), dynamic.parameters(), layer.parameters())

    def identity(h):
        return h

    rows = [
        ("one tiny op (x + 1)", "mlx", per_call_us(lambda: one + 1)),
        ("HyperConnection static", dispatch.choose("mhc_pre", x, mx.ones((1, n)))[0],
         per_call_us(lambda: static(x, identity))),
        ("HyperConnection dynamic", dispatch.choose("mhc_pre", x, mx.ones((1, n)))[0],
         per_call_us(lambda: dynamic(x, identity))),
        ("MHCLayer", dispatch.choose("mhc_layer", x)[0], per_call_us(lambda: layer(x))),
    ]
    print(f"graph building per call, B=1 n={n} C={C} bf16, MLX {mx.__version__}"
          + (" (stand-in kernel launches)" if args.stand_in else ""))
    print(f"{'module':<26} {'path':<10} {'µs/call':>8}")
    for name, path, us in rows:
        print(f"{name:<26} {path:<10} {us:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
