"""Times a seed package (mhc-mlx 0.6.3 or mlx-mhc 0.4.1) in its own process.

Run as a script by path with PYTHONPATH pointing at the seed's install folder only: it
imports nothing from this repository (the seeds' import names collide with ours). Reads a
JSON job from argv[1], prints one JSON list of results on the last line of stdout.
The timing mirrors mhc_mlx/bench/timing.py (kept in step by hand: it cannot import it).
"""

import json
import statistics
import sys
import time

import mlx.core as mx

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _time(run, repeats, warmup, per):
    for _ in range(warmup):
        run()
    mx.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times) / per


def build(package, n, C):
    if package == "mhc-mlx":
        from mhc_mlx import MHCLayer  # the seed's, from PYTHONPATH

        # Its best path off Metal: the compiled reference, without a failing Metal attempt per call.
        layer = MHCLayer(n=n, C=C, use_metal=False, compile_reference=True)
        names = ["H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight"]

        def forward(x):
            return layer(x)

        return layer, names, forward
    from mlx_mhc import ManifoldHyperConnection

    site = ManifoldHyperConnection(dims=n * C, expansion=n, sinkhorn_iterations=20)
    names = ["h_res_raw", "h_pre_raw", "h_pre_bias", "h_post_raw", "h_post_bias"]

    def forward(x):  # its site with F = identity: post_combine(x, pre_scale(x)) on [B, 1, n*C]
        B = x.shape[0]
        xs = x.reshape(B, 1, n * C)
        return site.post_combine(xs, site.pre_scale(xs)).reshape(x.shape)

    return site, names, forward


def run_case(package, case):
    B, n, C = case["shape"]
    dtype = DTYPES[case["dtype"]]
    module, names, forward = build(package, n, C)
    if package == "mlx-mhc" and case["pass"] == "fwd":
        module.eval()  # its inference mode: coefficients cached after the first call
    K = case["K"]
    xs = [mx.random.normal((B, n, C)).astype(dtype) for _ in range(K if case["mode"] == "throughput" else 1)]
    cot = mx.random.normal((B, n, C)).astype(dtype)
    mx.eval(xs, cot)
    params = [getattr(module, nm) for nm in names]

    if case["pass"] == "fwd":
        def apply(x):
            return forward(x)
    else:
        def apply(x):
            def f(x_, *ps):
                for nm, p in zip(names, ps):
                    setattr(module, nm, p)
                return forward(x_)

            return mx.vjp(f, [x, *params], [cot])

    if case["mode"] == "latency":
        return _time(lambda: mx.eval(apply(xs[0])), case["repeats"], 5, 1)
    outs_holder = []

    def run():
        outs = [apply(x) for x in xs]
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(outs)
        outs_holder.append(time.perf_counter() - t0)

    for _ in range(2):
        run()
    outs_holder.clear()
    for _ in range(case["repeats"]):
        run()
    return 1e6 * statistics.median(outs_holder) / K


def main():
    job = json.loads(sys.argv[1])
    results = []
    for case in job["cases"]:
        try:
            us = run_case(job["package"], case)
            results.append({"id": case["id"], "us": us})
        except Exception as e:  # noqa: BLE001 -- one failing case must not hide the others
            results.append({"id": case["id"], "error": f"{type(e).__name__}: {str(e)[:200]}"})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
