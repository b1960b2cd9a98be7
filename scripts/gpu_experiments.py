#!/usr/bin/env python3
"""Kernel-level timings behind docs/kernel-notes.md: each kernel alone, launch shapes, the
copy floor two ways, and where B=1 latency goes (Python graph building vs the eval).

    python scripts/gpu_experiments.py          (on a GPU machine; prints one line per measurement)
    python scripts/gpu_experiments.py headers  (only the trimmed-vs-full kernel header timings)
    python scripts/gpu_experiments.py read-step  (only the fused read step against the two ops)
    python scripts/gpu_experiments.py chain      (only the chained x cotangent against the defaults)
    python scripts/gpu_experiments.py layer-coefficients  (only the layer backward's coefficient kernel)
    python scripts/gpu_experiments.py launch   (only where B = 1 time goes: eval and per-launch costs)
    python scripts/gpu_experiments.py wide-n   (only the dynamic sites with n > 8 on the kernel path)
    python scripts/gpu_experiments.py small-tokens  (only the one-threadgroup-per-token coefficient kernels)
    python scripts/gpu_experiments.py mma-vjp  (only the tensor-core coefficient backward vs the FP32 kernel)
    python scripts/gpu_experiments.py glue-packs  (only the glue kernel writing gs's fragments vs the packs)
    python scripts/gpu_experiments.py glue-split  (only the glue with its Sinkhorn backward split off vs one kernel)
    python scripts/gpu_experiments.py defer-post  (only post's backward deferring x's and H_res's cotangents)
    python scripts/gpu_experiments.py dx-order  (only DX's warps token-group first vs k-group first)
    python scripts/gpu_experiments.py load-forms  (only the tensor-core forward's launch size and DX's row loads)
    python scripts/gpu_experiments.py small-forms  (only launch-shape candidates: finish tokens, DX tiles)
    python scripts/gpu_experiments.py glue-threads  (only the glue kernel's group size, and the fragment packs)
    python scripts/gpu_experiments.py params   (only the kernels' parameter arrays in GPU memory vs host-made)
    python scripts/gpu_experiments.py b1-split (only B = 1 graph building and eval apart, both parameter forms)
    python scripts/gpu_experiments.py b1-probe (only the B = 1 layer kernel's eval against the same launch doing nothing)
    python scripts/gpu_experiments.py flat-logits (only the static layer's logits unreshaped vs reshaped)
    python scripts/gpu_experiments.py b1-sync (only B = 1 eval against a launch's GPU time; compiled B = 1 forms)
    python scripts/gpu_experiments.py b1-latency (only the B = 1 static forward: LAYER_LATENCY, the compiled latency path)
    python scripts/gpu_experiments.py b1-trace (only each B = 1 form's kernel durations, traced as the bench runs it)
    python scripts/gpu_experiments.py layer-source (only the static forward's LAYER now against before the eighth session)
    python scripts/gpu_experiments.py static-host (only the static forward's host costs per launch and custom function)
    python scripts/gpu_experiments.py step-trace (only the dynamic fwd+bwd eager against one compiled step, traced)
    python scripts/gpu_experiments.py backward-tile (only the one-read backward's memory side: two launches vs one cluster launch)
    python scripts/gpu_experiments.py encode-cost (only the host's encoding cost per launch, by kind of launch)
    python scripts/gpu_experiments.py encode-cost-paper (the same at 512 x 4 x 1280, a paper size, K = 50)
    python scripts/gpu_experiments.py eval-anatomy (only a throughput eval's GPU start, span and tail; eager against compiled steps)
    python scripts/gpu_experiments.py eval-anatomy-paper (the same at 512 x 4 x 1280)
    python scripts/gpu_experiments.py b1 [ncu]  (only the B = 1 layer kernel by Sinkhorn iterations)
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import mlx.core as mx  # noqa: E402

import mhc_mlx as mhc  # noqa: E402
from mhc_mlx.bench import timing  # noqa: E402
from mhc_mlx.kernels import build, coefficients, layer, site, sinkhorn  # noqa: E402

BF = mx.bfloat16


def gbps(nbytes, us):
    return f"{nbytes / us / 1e3:7.0f} GB/s"


def tput(fn, sets, reps=10):
    return timing.throughput_us(fn, sets, repeats=reps)


def sinkhorn_forms(Ms=(1, 4096), reps=10):
    """The Sinkhorn backward, warp form vs one thread per matrix (the default for n <= 4 since
    2026-11-29) vs n^2 lanes of forward mode (the candidate sinkhorn.JACOBIAN_VJP; n = 4, 20
    iterations): one matrix (the static site) and 4096 (the dynamic site)."""
    n = 4
    saved = sinkhorn.THREAD_VJP_MAX_WORK, sinkhorn.JACOBIAN_VJP
    forms = (("warp", 0, False), ("thread", sinkhorn.THREAD_VJP_DEFAULT_WORK, False),
             ("jacobian", sinkhorn.THREAD_VJP_DEFAULT_WORK, True))
    try:
        for M in Ms:
            Ls = [2 * mx.random.normal((M, n, n)) for _ in range(10)]
            cs = [mx.random.normal((M, n, n)) for _ in range(10)]
            mx.eval(Ls, cs)
            row = []
            for label, work, jac in forms:
                sinkhorn.THREAD_VJP_MAX_WORK, sinkhorn.JACOBIAN_VJP = work, jac
                us = tput(lambda a, b: sinkhorn.project_vjp(a, b, 20), [[a, b] for a, b in zip(Ls, cs)], reps)
                row.append(f"{label} {us:6.1f} us")
            print(f"sinkhorn backward M={M} n={n}: " + ", ".join(row))
    finally:
        sinkhorn.THREAD_VJP_MAX_WORK, sinkhorn.JACOBIAN_VJP = saved


def sinkhorn_chain(reps=10):
    """What a small Sinkhorn costs against its launch: one thread runs ksinkhorn_thread's loop
    with three reciprocals -- IEEE 1.0f / s (what the kernels use; NVRTC compiles without fast
    math), rcp.approx.ftz, and none (the loop's other work) -- for 20 and 200 iterations, 10
    launches per eval; then the static coefficient kernel at 0, 20 and 200 iterations. On the
    H200 (2026-11-29) an iteration cost ~0.06 µs and a launch ~10 µs (docs/kernel-notes.md)."""
    from mhc_mlx.kernels.build import KernelSpec, int_params, launch

    body = r"""
  if (KTID != 0) return;
  float p[16];
  for (int a = 0; a < 16; ++a) p[a] = pin[a];
  const int iters = iparam[0];
  for (int it = 0; it < iters; ++it) {
    #pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float s = fmaxf(p[j] + p[4 + j] + p[8 + j] + p[12 + j], 1e-30f);
      const float r = RCP(s);
      #pragma unroll
      for (int i = 0; i < 4; ++i) p[i * 4 + j] *= r;
    }
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float s = fmaxf(p[4 * i] + p[4 * i + 1] + p[4 * i + 2] + p[4 * i + 3], 1e-30f);
      const float r = RCP(s);
      #pragma unroll
      for (int j = 0; j < 4; ++j) p[i * 4 + j] *= r;
    }
  }
  for (int a = 0; a < 16; ++a) pout[a] = p[a];
"""
    forms = {"ieee": "1.0f / (v)", "approx": "mhc_rcp_approx(v)", "none": "(v)"}
    helper = ("__device__ __forceinline__ float mhc_rcp_approx(float v) {\n"
              "  float r; asm(\"rcp.approx.ftz.f32 %0, %1;\" : \"=f\"(r) : \"f\"(v)); return r;\n}\n")
    ps = [mx.random.uniform(0.1, 1.0, (16,)) for _ in range(10)]
    mx.eval(ps)
    row = []
    for label, expr in forms.items():
        spec = KernelSpec(name=f"mhc_sinkhorn_chain_{label}", inputs=("pin", "iparam"), outputs=("pout",),
                          body=f"#define RCP(v) {expr}\n" + body, helpers=helper)
        for iters in (20, 200):
            us = tput(lambda p, i=iters, sp=spec: launch(sp, [p, int_params(i)], [((16,), mx.float32)], 32, 32, [])[0],
                      [[p] for p in ps], reps)
            row.append(f"{label}/{iters} {us:6.1f} us")
    print("one-thread 4x4 Sinkhorn chain, reciprocal/iterations: " + ", ".join(row))
    raws = [(mx.random.normal((1, 4)), mx.random.normal((1, 4)), 3 * mx.eye(4)[None] + i) for i in range(10)]
    mx.eval(raws)
    row = []
    for iters in (0, 20, 200):
        us = tput(lambda a, b, r, i=iters: coefficients.activate(a, b, r, i), raws, reps)
        row.append(f"{iters} iterations {us:6.1f} us")
    print("static coefficients kernel (M=1): " + ", ".join(row))


def sinkhorn_n32(reps=10):
    """The Sinkhorn forward for n > 8 (transpose-reduce row sums): the static coefficients at
    n = 32 (one matrix, B = 1 latency as a decoding call sees it) and 4096 matrices of 32 x 32."""
    n = 32
    a, b, r = mx.zeros((1, n)), mx.zeros((1, n)), 3 * mx.random.normal((1, n, n))
    Ls = [3 * mx.random.normal((4096, n, n)) for _ in range(10)]
    mx.eval(a, b, r, Ls)
    lat = timing.latency_us(lambda a_: coefficients.activate(a_, b, r, 20), [a], repeats=100)
    us = tput(lambda L: sinkhorn.project(L, 20), [[L] for L in Ls], reps)
    print(f"sinkhorn forward n=32 (20 iterations): static coefficients B=1 {lat:6.1f} us, 4096 matrices {us:7.1f} us")


def alternated(title, suffix, rows, forms, rounds, skip=()):
    """Each row (label -> a timing callable) under each form (name -> a callable that switches
    it on), the forms alternated `rounds` times in this process, as single runs of one form
    disagreed by up to 15 %; one line per row: the medians, then every run. `skip`: (row, form)
    pairs that do not apply."""
    for label, run in rows.items():
        times = {f: [] for f in forms}
        for _ in range(rounds):
            for f, switch in forms.items():
                if (label, f) not in skip:
                    switch()
                    times[f].append(run())
        cells = [f"{f} {statistics.median(t):6.1f} ({' '.join(f'{v:.0f}' for v in t)})" for f, t in times.items() if t]
        print(f"{title}, {label}{suffix}, median of {rounds} alternated (us): " + ", ".join(cells))


def layer_candidates(xs, rounds=5):
    """The static layer's candidates against the defaults at 4096x4x4096 bf16, alternated
    `rounds` times in this process (single runs of one form disagreed by up to 15 %): the
    layer kernel alone, the whole forward (coefficients included) and forward+backward as the
    bench runs them: two launches or one (layer.INLINE_ALWAYS), and the L2 prefetch of the
    token 0, 1 or 2 ahead (layer.PREFETCH_TOKENS)."""
    from mhc_mlx.bench import cases as bench_cases

    n, C = 4, 4096
    H = coefficients.activate(mx.zeros((1, n)), mx.zeros((1, n)), mx.eye(n)[None] * 3, 20)
    w = mx.ones((C,))
    mx.eval(H, w)
    fwd_case = bench_cases.Case("static", "fwd", (4096, n, C), "bfloat16", "throughput")
    bwd_case = bench_cases.Case("static", "fwd+bwd", (4096, n, C), "bfloat16", "throughput")
    fwd, fwd_xs = bench_cases.prepare(fwd_case, len(xs))
    fwdbwd, bwd_xs = bench_cases.prepare(bwd_case, len(xs))
    def form(inline, pf):
        def switch():
            layer.INLINE_ALWAYS, layer.PREFETCH_TOKENS = inline, pf
        return switch

    forms = {"plain": form(False, 0), "inline": form(True, 0), "prefetch 1": form(False, 1), "prefetch 2": form(False, 2)}
    rows = {
        "layer kernel alone": lambda: tput(lambda x: layer.forward(x, H[0], H[1], H[2], w, 20, 1e-5, False), [[x] for x in xs]),
        "static fwd (bench case)": lambda: tput(fwd, [[x] for x in fwd_xs]),
        "static fwd+bwd (bench case)": lambda: tput(fwdbwd, [[x] for x in bwd_xs]),
    }
    saved = layer.INLINE_ALWAYS, layer.PREFETCH_TOKENS
    try:
        # the layer kernel alone is the two-launch form's second launch: "inline" does not apply
        alternated("layer candidates", " 4096x4x4096", rows, forms, rounds, skip={("layer kernel alone", "inline")})
    finally:
        layer.INLINE_ALWAYS, layer.PREFETCH_TOKENS = saved


def case_rows(*specs):
    """{case id: a timing callable} for bench cases given as (site, pass, shape, mode), bf16,
    run as the bench runs them (latency: one input, 100 repeats; throughput: 10 rotated)."""
    from mhc_mlx.bench import cases as bench_cases

    rows = {}
    for site_, pass_, shape, mode in specs:
        case = bench_cases.Case(site_, pass_, shape, "bfloat16", mode)
        apply, xs = bench_cases.prepare(case, 1 if mode == "latency" else 10)
        if mode == "latency":
            rows[case.id] = lambda a=apply, x=xs[0]: timing.latency_us(a, [x], repeats=100)
        else:
            rows[case.id] = lambda a=apply, xs=xs: tput(a, [[x] for x in xs])
    return rows


def alternated_settings(title, rows, forms, rounds):
    """alternated() over forms given as {name: [(module, attribute, value), ...]}: each form sets
    its attributes before its runs; every attribute touched is restored afterwards."""
    touched = {(m, a) for settings in forms.values() for m, a, _ in settings}
    saved = {(m, a): getattr(m, a) for m, a in touched}

    def switch(settings):
        return lambda: [setattr(m, a, v) for m, a, v in settings]

    try:
        alternated(title, "", rows, {name: switch(settings) for name, settings in forms.items()}, rounds)
    finally:
        for (m, a), v in saved.items():
            setattr(m, a, v)


def header_sizes(rounds=5):
    """Trimmed kernel headers (the default) against the whole prelude in every header
    (build.FULL_HEADERS), alternated `rounds` times: the B = 1 static and dynamic forward
    (latency) and the 4096x4x4096 static forward (throughput), as the bench runs them."""
    from mhc_mlx.kernels import build

    rows = case_rows(("static", "fwd", (1, 4, 512), "latency"),
                     ("dynamic", "fwd", (1, 4, 512), "latency"),
                     ("static", "fwd", (4096, 4, 4096), "throughput"))
    alternated_settings("kernel headers", rows, {"trimmed": [(build, "FULL_HEADERS", False)],
                                                 "full": [(build, "FULL_HEADERS", True)]}, rounds)


def read_step(rounds=5):
    """The dynamic site's read step as one custom function whose forward is one launch in the
    kernel form (kernels.FUSED_READ_STEP, coefficients.DYNAMIC_PRE) against the two ops,
    alternated `rounds` times: B = 1 forward (latency), and forward and forward+backward where
    the coefficients take the kernel form (512x4x1280) and the tensor-core form (4096x4x4096,
    forward and forward+backward)."""
    from mhc_mlx import kernels

    rows = case_rows(("dynamic", "fwd", (1, 4, 512), "latency"),
                     ("dynamic", "fwd+bwd", (1, 4, 512), "latency"),
                     ("dynamic", "fwd", (512, 4, 1280), "throughput"),
                     ("dynamic", "fwd+bwd", (512, 4, 1280), "throughput"),
                     ("dynamic", "fwd", (4096, 4, 4096), "throughput"),
                     ("dynamic", "fwd+bwd", (4096, 4, 4096), "throughput"))
    # at 4096x4x4096 the backward takes the tensor-core products (coefficients.MMA_VJP "auto"),
    # whose DX kernel adds pre's share too (docs/kernel-notes.md row 27)
    alternated_settings("read step", rows, {"two ops": [(kernels, "FUSED_READ_STEP", False)],
                                            "read step": [(kernels, "FUSED_READ_STEP", True)]}, rounds)


def chain(rounds=5):
    """The chained x cotangent (kernels.CHAIN_X_COTANGENT: x's cotangent written once, by the
    first op's backward kernel, instead of MLX adds) and the fused read step at every size
    (kernels.FUSED_READ_STEP True), alone and together, against the defaults (the read step
    "auto", the glue kernel, the tensor-core backward "auto", whose DX kernel takes the chained
    cotangent too since 2026-11-30), alternated `rounds` times: the dynamic site's
    forward+backward at 4096x4x4096 and 512x4x1280 and at B = 1."""
    from mhc_mlx import kernels

    rows = case_rows(("dynamic", "fwd+bwd", (4096, 4, 4096), "throughput"),
                     ("dynamic", "fwd+bwd", (512, 4, 1280), "throughput"),
                     ("dynamic", "fwd+bwd", (1, 4, 512), "latency"))
    forms = {name: [(kernels, "CHAIN_X_COTANGENT", c), (kernels, "FUSED_READ_STEP", r)]
             for name, c, r in (("defaults", False, "auto"), ("chain", True, "auto"),
                                ("read step everywhere", False, True), ("chain + read step everywhere", True, True))}
    alternated_settings("chain", rows, forms, rounds)


def layer_coefficient_vjp(rounds=5):
    """The static layer backward's coefficient gradients in one launch (layer.FUSED_COEFFICIENT_VJP,
    layer.COEFFICIENTS_VJP) against the same steps as MLX ops, alternated `rounds` times: the
    static forward+backward at 4096x4x4096, 512x4x1280 and B = 1."""
    rows = case_rows(("static", "fwd+bwd", (4096, 4, 4096), "throughput"),
                     ("static", "fwd+bwd", (512, 4, 1280), "throughput"),
                     ("static", "fwd+bwd", (1, 4, 512), "latency"))
    alternated_settings("layer coefficient backward", rows,
                        {"ops": [(layer, "FUSED_COEFFICIENT_VJP", False)],
                         "one launch": [(layer, "FUSED_COEFFICIENT_VJP", True)]}, rounds)


def layer_jacobian(rounds=5):
    """The static layer's coefficient backward with its Sinkhorn backward by n^2 lanes of forward
    mode (layer.COEFFICIENTS_JACOBIAN) against the one-thread replay, alternated `rounds` times:
    the static forward+backward at 4096x4x4096, 512x4x1280 and B = 1."""
    rows = case_rows(("static", "fwd+bwd", (4096, 4, 4096), "throughput"),
                     ("static", "fwd+bwd", (512, 4, 1280), "throughput"),
                     ("static", "fwd+bwd", (1, 4, 512), "latency"))
    alternated_settings("layer coefficient backward's Sinkhorn", rows,
                        {"one thread": [(layer, "COEFFICIENTS_JACOBIAN", False)],
                         "jacobian": [(layer, "COEFFICIENTS_JACOBIAN", True)]}, rounds)


def composite_norm(rounds=5):
    """The static layer above layer.MAX_N_FUSED (the kernel ops chained) with its RMSNorm by
    mx.fast.rms_norm (layer.COMPOSITE_FAST_RMS_NORM) against the ops, alternated `rounds`
    times: the n = 32 static forward at B = 1 and 512 tokens, and its forward+backward."""
    rows = case_rows(("static", "fwd", (1, 32, 2048), "latency"),
                     ("static", "fwd", (512, 32, 1280), "throughput"),
                     ("static", "fwd+bwd", (512, 32, 1280), "throughput"))
    alternated_settings("layer above MAX_N_FUSED, its RMSNorm", rows,
                        {"ops": [(layer, "COMPOSITE_FAST_RMS_NORM", False)],
                         "mx.fast": [(layer, "COMPOSITE_FAST_RMS_NORM", True)]}, rounds)


def inline_wide(rounds=5):
    """The static layer's single launch above layer.MAX_N_FUSED at T <= LATENCY_TOKENS (the
    candidate layer.INLINE_MAX_N = 32) against the composite, alternated `rounds` times: n = 32
    at B = 1 and 16 tokens, and B = 1 forward+backward (whose backward recomputes the composite)."""
    rows = case_rows(("static", "fwd", (1, 32, 2048), "latency"),
                     ("static", "fwd", (16, 32, 1280), "latency"),
                     ("static", "fwd+bwd", (1, 32, 2048), "latency"))
    alternated_settings("layer single launch above MAX_N_FUSED", rows,
                        {"composite": [(layer, "INLINE_MAX_N", layer.MAX_N_FUSED)],
                         "single launch": [(layer, "INLINE_MAX_N", 32)]}, rounds)


def one_line_7():
    """A one-line custom kernel with the B = 1 layer kernel's 7 inputs (it copies 2048 elements of
    its first): the fixed cost of a custom-kernel launch with those inputs."""
    from mhc_mlx.kernels.build import KernelSpec

    return KernelSpec(name="mhc_one_line7", inputs=("xin", "a", "b", "c", "w", "ip", "fp"), outputs=("xout",),
                      body="  if (KBID == 0) for (int i = KTID; i < 2048; i += KNT) xout[i] = xin[i];\n")


def b1_inputs(n=4, C=512):
    """(x [1, n, C] bf16, the layer's raw parameters [pre, post, res, weight], a one-element array
    for the tiny op), evaluated."""
    x1 = mx.random.normal((1, n, C)).astype(BF)
    raw = [mx.zeros((n,)), mx.zeros((n,)), 3 * mx.eye(n), mx.ones((C,))]
    a1 = mx.array([1.0])
    mx.eval(x1, raw, a1)
    return x1, raw, a1


def eval_us(make, reps=200, warmup=5):
    """µs of one mx.eval of make()'s result, its graph built before the clock; median of reps."""
    mx.eval([make() for _ in range(warmup)])
    times = []
    for _ in range(reps):
        y = make()
        t0 = time.perf_counter()
        mx.eval(y)
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def chain_us(step, first, chain_len=100, reps=20):
    """µs per application of `step` applied chain_len times in a chain (each output the next
    input) in one eval, median of reps: the cost of one more launch inside an eval, without the
    eval's fixed cost."""
    def run():
        y = first
        for _ in range(chain_len):
            y = step(y)
        return y

    return eval_us(run, reps, warmup=1) / chain_len


def launch_costs(chain_len=100, repeats=200):
    """Where B = 1 (n = 4, C = 512, bf16) time goes: the eval of a tiny op, of a one-line custom
    kernel with 1 and with the layer's 7 inputs, of the layer's single-launch kernel alone, and of
    the static layer and the dynamic site eager and under mx.compile (eval only: each call's graph
    is built before the clock). Then each applied `chain_len` times in a chain (each output the
    next input) in one eval, per application: the cost of one more launch inside an eval (host
    encoding + GPU), without the eval's fixed cost."""
    from mhc_mlx import kernels
    from mhc_mlx.kernels.build import KernelSpec, launch

    n, C = 4, 512
    x1 = mx.random.normal((1, n, C)).astype(BF)
    m = mhc.MHCLayer(n, C)
    hc = mhc.HyperConnection(C, n)
    mx.eval(x1, m.parameters(), hc.parameters())
    one = KernelSpec(name="mhc_one_line", inputs=("vin",), outputs=("vout",),
                     body="  if (KTID == 0 && KBID == 0) vout[0] = vin[0] + 1.0f;\n")
    raw = [mx.zeros((n,)), mx.zeros((n,)), 3 * mx.eye(n), mx.ones((C,)), mx.array([1, C, 20], dtype=mx.int32),
           mx.array([1e-5])]
    mx.eval(raw)

    def dyn(x):
        h, cf = hc.pre(x)
        return hc.post(x, h, cf)

    one_fn = lambda v: launch(one, [v], [((1,), mx.float32)], 32, 32, [])[0]  # noqa: E731
    seven = one_line_7()
    seven_fn = lambda v: launch(seven, [v, *raw], [(v.shape, v.dtype)], 256, 256, [])[0]  # noqa: E731
    layer_fn = lambda v: layer.forward(v, *raw[:4], 20, 1e-5, True)  # noqa: E731
    m_c, dyn_c = mx.compile(m), mx.compile(dyn)
    a1 = mx.array([1.0])
    rows = [
        ("tiny op (a + 1)", lambda: a1 + 1.0, lambda y: y + 1.0),
        ("one-line kernel, 1 input", lambda: one_fn(a1), None),
        ("one-line kernel, the layer's 7 inputs", lambda: seven_fn(x1), seven_fn),
        ("layer kernel alone (single launch)", lambda: layer_fn(x1), layer_fn),
        ("static layer, eager", lambda: m(x1), m),
        ("static layer, mx.compile", lambda: m_c(x1), m_c),
        ("dynamic site, eager", lambda: dyn(x1), dyn),
        ("dynamic site, mx.compile", lambda: dyn_c(x1), dyn_c),
    ]
    saved = kernels.FUSED_READ_STEP
    try:
        for read_step_on in (False, True):
            kernels.FUSED_READ_STEP = read_step_on
            for label, make, step in rows:
                if "dynamic" not in label and read_step_on:
                    continue
                suffix = (" (read step)" if read_step_on else " (two ops)") if "dynamic" in label else ""
                ev = eval_us(make, repeats)
                ch = f", {chain_us(step, x1, chain_len):6.1f} us per application in a chain of {chain_len}" if step else ""
                print(f"launch costs B=1: {label}{suffix}: eval {ev:6.1f} us{ch}")
    finally:
        kernels.FUSED_READ_STEP = saved


def b1_layer(chain_len=100, ncu_only=False):
    """The B = 1 static layer kernel (single launch, n = 4, C = 512, bf16) by Sinkhorn iterations
    (0, 1, 5, 20) and threads (32, 64, 128), and the static coefficient kernel alone (M = 1) by
    iterations, each applied `chain_len` times in a chain in one eval (µs per application): how
    much of the launch is the Sinkhorn. ncu_only: each variant launched three times in small
    evals, for Nsight Compute to time (gpu_session.sh b1)."""
    n, C = 4, 512
    x1 = mx.random.normal((1, n, C)).astype(BF)
    pre, post, res, w = mx.zeros((n,)), mx.zeros((n,)), 3 * mx.eye(n), mx.ones((C,))
    raws = (mx.zeros((1, n)), mx.zeros((1, n)), 3 * mx.eye(n)[None])
    mx.eval(x1, pre, post, res, w, raws)

    variants = [(f"layer kernel iters={it} threads={th}",
                 lambda v, it=it, th=th: layer.forward(v, pre, post, res, w, it, 1e-5, True, th), x1)
                for it in (0, 1, 5, 20) for th in (64,)]
    variants += [(f"layer kernel iters=20 threads={th}",
                  lambda v, th=th: layer.forward(v, pre, post, res, w, 20, 1e-5, True, th), x1) for th in (32, 128)]
    variants += [(f"static coefficient kernel iters={it}",
                  lambda r, it=it: coefficients.activate(raws[0], raws[1], r, it)[2], raws[2]) for it in (0, 20)]
    for label, step, first in variants:
        if ncu_only:
            for _ in range(3):
                mx.eval(step(first))
            continue
        print(f"B=1 {label}: {chain_us(step, first, chain_len):6.1f} us per application in a chain of {chain_len}")


def mma_vjp(rounds=5):
    """The coefficient backward's two products on tensor cores (coefficients.MMA_VJP, with the
    DX kernel rewritten on 2026-11-29) against the FP32 kernel, alternated `rounds` times: the
    dynamic forward+backward at 4096x4x4096 and 512x4x1280 as the bench runs them, then the
    backward's products alone at 4096x4x4096."""
    from mhc_mlx.kernels import coefficients_mma_vjp as cmv

    rows = case_rows(("dynamic", "fwd+bwd", (4096, 4, 4096), "throughput"),
                     ("dynamic", "fwd+bwd", (512, 4, 1280), "throughput"))
    T, n, C = 4096, 4, 4096
    xs = [mx.random.normal((T, n * C)).astype(BF) for _ in range(10)]
    phi = 0.02 * mx.random.normal((n * C, 2 * n + n * n))
    gs, c2 = mx.random.normal((T, 24)) * 0.01, mx.random.normal((T,)) * 0.01
    mx.eval(xs, phi, gs, c2)
    rows["coefficient backward alone (dx, dphi) 4096x4x4096"] = lambda: tput(
        lambda x: coefficients.dynamic_vjp_x_phi(x, phi, gs, c2), [[x] for x in xs])
    alternated_settings("tensor-core coefficient backward", rows,
                        {"FP32 kernel": [(coefficients, "MMA_VJP", False)],
                         "tensor cores": [(coefficients, "MMA_VJP", True)]}, rounds)
    us = tput(lambda x: cmv.dx(x, phi, gs, c2), [[x] for x in xs])
    print(f"tensor-core DX kernel alone 4096x4x4096: {us:7.1f} us {gbps(2 * xs[0].nbytes, us)}")


def small_tokens(rounds=5):
    """The dynamic coefficients' one-threadgroup-per-token kernels (coefficients.SMALL_TOKENS,
    16 by default since 2026-11-30) against the tiled kernel, alternated `rounds` times: the dynamic site at B = 1
    (forward, forward+backward; the read step's forward is DYNAMIC_SMALL_PRE then) and 16 tokens,
    then the coefficient kernel alone chained 100 times at B = 1 (µs per application)."""
    rows = case_rows(("dynamic", "fwd", (1, 4, 512), "latency"),
                     ("dynamic", "fwd+bwd", (1, 4, 512), "latency"),
                     ("dynamic", "fwd", (16, 4, 512), "latency"),
                     ("dynamic", "fwd", (1, 4, 4096), "latency"))
    n, C = 4, 512
    x = mx.random.normal((1, n * C)).astype(BF)
    phi = 0.02 * mx.random.normal((n * C, 24))
    alpha, bias = mx.array([0.1, 0.1, 0.1]), mx.zeros((24,))
    mx.eval(x, phi, alpha, bias)

    def step(y):  # each launch waits on the last: its x depends on the last one's logits
        m = coefficients.dynamic_forward(y, phi, alpha, bias, n, 20, 1e-6, form="kernel")[3]
        return (x + m[:, :1]).astype(BF)

    rows["coefficient kernel chained, B=1 4x512 (us per application, an add included)"] = lambda: chain_us(step, x)
    alternated_settings("one threadgroup per token", rows,
                        {"tiled": [(coefficients, "SMALL_TOKENS", 0)],
                         "per token": [(coefficients, "SMALL_TOKENS", 16)]}, rounds)


def wide_n(rounds=5):
    """Dynamic sites with n > 8 on the kernel path (coefficients.WIDE_N, the default since
    2026-11-30) against the compiled path they took before, alternated `rounds` times: forward and forward+backward
    at 512x16x1280 and 256x32x1024, and the forward at B = 1 with n = 32."""
    rows = case_rows(("dynamic", "fwd", (512, 16, 1280), "throughput"),
                     ("dynamic", "fwd+bwd", (512, 16, 1280), "throughput"),
                     ("dynamic", "fwd", (256, 32, 1024), "throughput"),
                     ("dynamic", "fwd+bwd", (256, 32, 1024), "throughput"),
                     ("dynamic", "fwd", (1, 32, 512), "latency"))
    alternated_settings("wide n", rows, {"compiled path": [(coefficients, "WIDE_N", False)],
                                         "kernels": [(coefficients, "WIDE_N", True)]}, rounds)


def main():
    print("mlx", mx.__version__, mx.default_device())
    # A. copy floor: one 1 GB eval vs 10 rotated 134 MB arrays in one eval.
    c = timing.copy_floor()
    print(f"copy 1GB single eval: {c['us']:.1f} us {c['GBps']:.0f} GB/s")
    xs = [mx.random.normal((4096, 4, 4096)).astype(BF) for _ in range(10)]
    mx.eval(xs)
    nb = xs[0].nbytes * 2
    us = tput(lambda a: a * 1.5, [[x] for x in xs])
    print(f"copy 134MB x10 rotated: {us:.1f} us {gbps(nb, us)}")
    tiny = timing.tiny_op_us()
    print(f"tiny op eval: {tiny:.1f} us")

    # B. layer kernel launch shapes at 4096x4x4096 bf16 (coefficients precomputed).
    n, C, T = 4, 4096, 4096
    H = coefficients.activate(mx.zeros((1, n)), mx.zeros((1, n)), mx.eye(n)[None] * 3, 20)
    w = mx.ones((C,))
    mx.eval(H, w)
    for tg, groups in ((256, 1056), (256, 528), (256, 264), (128, 1056)):
        f = lambda x, tg=tg, g=groups: layer.forward(x, H[0], H[1], H[2], w, 20, 1e-5, False, tg, g)  # noqa: E731
        us = tput(f, [[x] for x in xs])
        print(f"layer tg={tg:4d} groups={groups:5d}: {us:7.1f} us {gbps(nb, us)}  plan={layer.plan(T, n, C, 2, tg, groups)}")

    layer_candidates(xs)

    # B2. the layer's backward: composed from the op kernels vs the candidate one-pass kernel.
    pre_raw, post_raw, res_raw = mx.zeros((n,)), mx.zeros((n,)), 3 * mx.eye(n)
    gs3 = [mx.random.normal((T, n, C)).astype(BF) for _ in range(3)]
    mx.eval(pre_raw, post_raw, res_raw, gs3)
    prim = lambda x: [x, pre_raw, post_raw, res_raw, w]  # noqa: E731
    for budget, threads in ((32, 256), (16, 256), (16, 128)):
        us = tput(lambda x, g, b=budget, t=threads: layer._fused_layer_vjp(prim(x), g, 20, 1e-5, threads=t, budget=b),
                  [[x, gs3[i % 3]] for i, x in enumerate(xs)])
        V, cpt, groups = layer.vjp_plan(T, n, C, 2, threads, budget)
        print(f"layer backward, one pass, budget {budget} threads {threads} (V={V}, CPT={cpt}): {us:7.1f} us "
              f"{gbps(3 * xs[0].nbytes, us)}")
    row = []
    for groups in (528, 1056):
        us = tput(lambda x, g, gr=groups: layer._fused_layer_vjp(prim(x), g, 20, 1e-5, groups=gr),
                  [[x, gs3[i % 3]] for i, x in enumerate(xs)])
        row.append(f"{groups} groups {us:6.1f} us")
    print("layer backward, default budget: " + ", ".join(row))
    # the same at the paper's 512 x 4 x 1280 (layer.VJP_BUDGET is chosen from 4096 x 4 x 4096)
    xs5 = [mx.random.normal((512, n, 1280)).astype(BF) for _ in range(10)]
    g5 = mx.random.normal((512, n, 1280)).astype(BF)
    w5 = mx.ones((1280,))
    mx.eval(xs5, g5, w5)
    row = []
    for budget in (32, 16):
        us = tput(lambda x, b=budget: layer._fused_layer_vjp([x, pre_raw, post_raw, res_raw, w5], g5, 20, 1e-5, budget=b),
                  [[x] for x in xs5])
        row.append(f"budget {budget} {us:6.1f} us")
    print("layer backward 512x4x1280: " + ", ".join(row))
    # the static site's coefficient kernel alone (one 4 x 4 Sinkhorn of 20 iterations, M = 1)
    raws = [(mx.random.normal((1, n)), mx.random.normal((1, n)), 3 * mx.eye(n)[None] + i) for i in range(10)]
    mx.eval(raws)
    us = tput(lambda a, b, r: coefficients.activate(a, b, r, 20), raws)
    print(f"static coefficients kernel alone (M=1, n=4, 20 iterations): {us:6.1f} us per launch, 10 per eval")

    # C. dynamic site pieces at 4096x4x4096 bf16.
    from mhc_mlx.kernels import coefficients_mma as cm

    phi = 0.02 * mx.random.normal((n * C, 2 * n + n * n))
    alpha, bias = mx.array([0.1, 0.1, 0.1]), mx.zeros((2 * n + n * n,))
    mx.eval(phi, alpha, bias)
    for tb in (16, 8):
        us = tput(lambda x, tb=tb: coefficients.dynamic_forward(x.reshape(T, n * C), phi, alpha, bias, n, 20, 1e-6, tb,
                                                                 form="kernel"), [[x] for x in xs])
        print(f"coefficients dynamic, fused FP32 kernel TB={tb}: {us:7.1f} us {gbps(xs[0].nbytes, us)}")
    us = tput(lambda x: coefficients.dynamic_forward(x.reshape(T, n * C), phi, alpha, bias, n, 20, 1e-6, form="mma"),
              [[x] for x in xs])
    print(f"coefficients dynamic, tensor-core path (pack + mma + finish): {us:7.1f} us {gbps(xs[0].nbytes, us)}")
    us = tput(lambda x: cm.partial_products(x.reshape(T, n * C), phi), [[x] for x in xs])
    print(f"  of which pack + mma partials: {us:7.1f} us {gbps(xs[0].nbytes, us)}")
    us = tput(lambda p: cm.pack_phi(p), [[phi + i] for i in range(10)])
    print(f"  of which pack_phi alone: {us:7.1f} us")
    # launch size (TARGET_WARPS: warps over the SMs, split over K) and x loads per row and lane
    # in one step (X_UNROLL: 16-byte loads, contiguous per row)
    saved_tw, saved_ku = cm.TARGET_WARPS, cm.X_UNROLL
    for tw in (1056, 1584, 2048, 3168, 4224):
        row = []
        for ku in (1, 2, 4):
            cm.TARGET_WARPS, cm.X_UNROLL = tw, ku
            us = tput(lambda x: cm.partial_products(x.reshape(T, n * C), phi), [[x] for x in xs])
            row.append(f"KU={ku} {us:6.1f} us {gbps(xs[0].nbytes, us)}")
        print(f"  pack + mma partials, TARGET_WARPS={tw}: " + ", ".join(row))
    cm.TARGET_WARPS, cm.X_UNROLL = saved_tw, saved_ku
    us = tput(lambda x: cm.dynamic_forward(x.reshape(T, n * C), phi, alpha, bias, n, 20, 1e-6), [[x] for x in xs])
    print(f"  pack + mma + finish (defaults): {us:7.1f} us")
    # the crossover between the fused kernel and the tensor-core path (MMA_MIN_ELEMENTS)
    for Tn, Cn in ((64, 1280), (256, 1280), (512, 1280), (1024, 1280), (512, 4096)):
        phin = 0.02 * mx.random.normal((n * Cn, 2 * n + n * n))
        xn = [mx.random.normal((Tn, n * Cn)).astype(BF) for _ in range(10)]
        mx.eval(phin, xn)
        row = []
        for form in ("kernel", "mma"):
            us = tput(lambda x, f=form: coefficients.dynamic_forward(x, phin, alpha, bias, n, 20, 1e-6, form=f),
                      [[x] for x in xn])
            row.append(f"{form} {us:6.1f} us")
        print(f"coefficients dynamic T={Tn} n={n} C={Cn}: " + ", ".join(row))
    hcs = mhc.HyperConnection(C, n)
    hcs.phi, hcs.alpha, hcs.bias = phi, alpha, bias
    site_bytes = (4 * n + 2) * C * 2 * T

    def site_fwd(x):  # the bench's case: sublayer = identity, so pre's output feeds post
        h, cf = hcs.pre(x)
        return hcs.post(x, h, cf)

    us = tput(site_fwd, [[x] for x in xs])
    print(f"dynamic site forward (default forms): {us:7.1f} us "
          f"({100 * site_bytes / us / 1e3 / c['GBps']:.0f} % of its (4n+2)·C·2 B/token floor at copy speed)")
    # forward+backward (the bench's case: sublayer = identity), the read step as two ops vs
    # the fused read step candidate (kernels.FUSED_READ_STEP)
    from mhc_mlx import kernels as kernel_pkg

    cot_site = mx.random.normal((T, n, C)).astype(BF)
    mx.eval(cot_site)
    site_names = ["phi", "alpha", "bias"]
    site_params = [getattr(hcs, k) for k in site_names]

    def site_fwd_bwd(x):
        def f(x_, *ps):
            hcs.update(dict(zip(site_names, ps)))
            h, cf = hcs.pre(x_)
            return hcs.post(x_, h, cf)
        return mx.vjp(f, [x, *site_params], [cot_site])

    bwd_bytes = (7 * n + 2) * C * 2 * T
    row = []
    saved_flags = kernel_pkg.FUSED_READ_STEP, coefficients.MMA_VJP
    for fused, mma_vjp in ((False, False), (True, False), (True, True)):
        kernel_pkg.FUSED_READ_STEP, coefficients.MMA_VJP = fused, mma_vjp
        us = tput(site_fwd_bwd, [[x] for x in xs])
        row.append(f"{'fused' if fused else 'two ops'}{' + mma vjp' if mma_vjp else ''} {us:7.1f} us "
                   f"({100 * bwd_bytes / us / 1e3 / c['GBps']:.0f} %)")
    kernel_pkg.FUSED_READ_STEP, coefficients.MMA_VJP = saved_flags
    hcs.update(dict(zip(site_names, site_params)))
    print("dynamic site fwd+bwd, read step: " + ", ".join(row) + " of the (7n+2)·C·2 B/token floor")
    hp = mx.random.uniform(shape=(T, n))
    hq = mx.random.uniform(shape=(T, n))
    hr = mx.random.uniform(shape=(T, n, n))
    f = mx.random.normal((T, C)).astype(BF)
    mx.eval(hp, hq, hr, f)
    us = tput(lambda x: site.pre_forward(x, hp), [[x] for x in xs])
    print(f"pre per-token: {us:7.1f} us {gbps(xs[0].nbytes + f.nbytes, us)}")
    us = tput(lambda x: site.post_forward(x, f, hq, hr), [[x] for x in xs])
    print(f"post per-token: {us:7.1f} us {gbps(2 * xs[0].nbytes + f.nbytes, us)}")
    us = tput(lambda x: site.post_forward(x, f, hq[0], hr[0]), [[x] for x in xs])
    print(f"post shared: {us:7.1f} us {gbps(2 * xs[0].nbytes + f.nbytes, us)}")
    g = [mx.random.normal((T, n, C)).astype(BF) for _ in range(3)]
    mx.eval(g)
    us = tput(lambda x, gg: site.post_vjp(x, f, hq, hr, gg), [[x, g[i % 3]] for i, x in enumerate(xs)])
    print(f"post vjp per-token: {us:7.1f} us {gbps(3 * xs[0].nbytes + 2 * f.nbytes, us)}")
    us = tput(lambda x: site.pre_vjp(x, hp, f), [[x] for x in xs])
    print(f"pre vjp per-token: {us:7.1f} us {gbps(2 * xs[0].nbytes + f.nbytes, us)}")
    gs = mx.random.normal((T, 24)) * 0.01
    c2 = mx.random.normal((T,)) * 0.01
    mx.eval(gs, c2)
    us = tput(lambda x: coefficients.dynamic_vjp_x_phi(x.reshape(T, n * C), phi, gs, c2), [[x] for x in xs])
    print(f"coefficients dynamic vjp (dx, dphi): {us:7.1f} us {gbps(2 * xs[0].nbytes, us)}")
    # its launch shape: at 136 registers a 256-thread block leaves one block (8 warps) per SM;
    # 128 or 64 threads fit 12 or 14 warps (the kernel is written for any block size)
    saved = coefficients.VJP_THREADS, coefficients.VJP_TOKENS_PER_SPLIT
    row = []
    for threads, per_split in ((256, 256), (128, 512), (128, 1024), (64, 512)):
        coefficients.VJP_THREADS, coefficients.VJP_TOKENS_PER_SPLIT = threads, per_split
        us = tput(lambda x: coefficients.dynamic_vjp_x_phi(x.reshape(T, n * C), phi, gs, c2), [[x] for x in xs])
        row.append(f"{threads}/{per_split}: {us:6.1f} us")
    # at 512 tokens of 4 x 1280
    phi5 = 0.02 * mx.random.normal((n * 1280, 2 * n + n * n))
    x5 = [mx.random.normal((512, n * 1280)).astype(BF) for _ in range(10)]
    gs5, c25 = mx.random.normal((512, 24)) * 0.01, mx.random.normal((512,)) * 0.01
    mx.eval(phi5, x5, gs5, c25)
    row5 = []
    for threads, per_split in ((256, 256), (128, 512), (128, 128)):
        coefficients.VJP_THREADS, coefficients.VJP_TOKENS_PER_SPLIT = threads, per_split
        us = tput(lambda x: coefficients.dynamic_vjp_x_phi(x, phi5, gs5, c25), [[x] for x in x5])
        row5.append(f"{threads}/{per_split}: {us:6.1f} us")
    coefficients.VJP_THREADS, coefficients.VJP_TOKENS_PER_SPLIT = saved
    print("  at 512x4x1280, threads / tokens per split: " + ", ".join(row5))
    print("  threads per block / tokens per split: " + ", ".join(row))
    # the candidate tensor-core backward (coefficients_mma_vjp.py): both products, then each
    from mhc_mlx.kernels import coefficients_mma_vjp as cmv

    us = tput(lambda x: cmv.vjp_x_phi(x.reshape(T, n * C), phi, gs, c2), [[x] for x in xs])
    print(f"  tensor-core candidate (dx, dphi): {us:7.1f} us {gbps(3 * xs[0].nbytes, us)} (x read twice, dx written)")
    us = tput(lambda x: cmv.dx(x.reshape(T, n * C), phi, gs, c2), [[x] for x in xs])
    print(f"    of which dx: {us:7.1f} us {gbps(2 * xs[0].nbytes, us)}")
    us = tput(lambda x: cmv.dphi(x.reshape(T, n * C), gs), [[x] for x in xs])
    print(f"    of which dphi: {us:7.1f} us {gbps(xs[0].nbytes, us)}")
    del xs

    # D. B=1 latency: graph building vs eval.
    for name, make in (("static layer", lambda: mhc.MHCLayer(4, 512)),):
        m = make()
        x1 = mx.random.normal((1, 4, 512)).astype(BF)
        mx.eval(x1, m.parameters())
        wall = timing.latency_us(m, [x1], repeats=200)
        t0 = time.perf_counter()
        for _ in range(200):
            y = m(x1)
        build = (time.perf_counter() - t0) / 200 * 1e6
        ys = [m(x1) for _ in range(200)]
        times = []
        for y in ys:
            t0 = time.perf_counter()
            mx.eval(y)
            times.append(time.perf_counter() - t0)
        times.sort()
        print(f"{name} B=1: wall {wall:.1f} us, graph build {build:.1f} us, eval only {1e6 * times[100]:.1f} us, tiny {tiny:.1f}")
    hc = mhc.HyperConnection(512, 4)
    x1 = mx.random.normal((1, 4, 512)).astype(BF)
    mx.eval(x1, hc.parameters())

    def dyn(x):
        h, cf = hc.pre(x)
        return hc.post(x, h, cf)

    wall = timing.latency_us(dyn, [x1], repeats=200)
    t0 = time.perf_counter()
    for _ in range(200):
        dyn(x1)
    build = (time.perf_counter() - t0) / 200 * 1e6
    print(f"dynamic site B=1: wall {wall:.1f} us, graph build {build:.1f} us")

    sinkhorn_forms()
    sinkhorn_chain()
    sinkhorn_n32()
    header_sizes()
    read_step()
    chain()
    layer_coefficient_vjp()

    # E. n=32 post and layer.
    x32 = [mx.random.normal((512, 32, 1280)).astype(BF) for _ in range(10)]
    f32_ = mx.random.normal((512, 1280)).astype(BF)
    hq32, hr32 = mx.random.uniform(shape=(32,)), mx.random.uniform(shape=(32, 32)) / 32
    mx.eval(x32, f32_, hq32, hr32)
    us = tput(lambda x: site.post_forward(x, f32_, hq32, hr32), [[x] for x in x32])
    print(f"post n=32 512x1280 shared: {us:7.1f} us {gbps(2 * x32[0].nbytes, us)}")
    us = tput(lambda x: site.pre_forward(x, hq32), [[x] for x in x32])
    print(f"pre n=32 512x1280 shared: {us:7.1f} us {gbps(x32[0].nbytes, us)}")


def glue_threads(rounds=5):
    """The dynamic backward's glue kernel (coefficients.DYNAMIC_VJP_GLUE, one thread per token)
    at 128, 64 and 32 threads per group, alternated `rounds` times: the dynamic site fwd+bwd at
    4096x4x4096, 512x4x1280 and B = 1; then the tensor-core backward's fragment packs alone at
    4096x4x4096 (ncu put them at 20-35 µs each), each eval's µs per application in a chain."""
    from mhc_mlx.kernels import coefficients_mma_vjp as cmv

    rows = case_rows(("dynamic", "fwd+bwd", (4096, 4, 4096), "throughput"),
                     ("dynamic", "fwd+bwd", (512, 4, 1280), "throughput"),
                     ("dynamic", "fwd+bwd", (1, 4, 512), "latency"))
    alternated_settings("glue threads", rows, {str(t): [(coefficients, "GLUE_THREADS", t)] for t in (128, 64, 32)},
                        rounds)
    gs = mx.random.normal((4096, 24))
    phi = 0.02 * mx.random.normal((16384, 24))
    mx.eval(gs, phi)
    for label, step, first in (("pack_a(gs 4096x24)", lambda a: cmv.pack_a(a, cmv.DX_PARTS)[0, 0, 0, 0, 0]
                                .astype(mx.float32) + a, gs),
                               ("pack_b(phi 16384x24, DX)", lambda a: cmv.pack_b(a, cmv.DX_PARTS, True, perm64=True)
                                [0, 0, 0, 0, 0].astype(mx.float32) + a, phi)):
        print(f"{label}: {eval_us(lambda: step(first)):7.1f} us per eval, "
              f"{chain_us(step, first, chain_len=20):7.1f} us per application chained (an add included)")


def glue_packs(rounds=5):
    """The glue kernel writing gs in the tensor-core backward's fragment orders
    (coefficients.GLUE_PACKS, candidate) against the two pack launches, alternated `rounds`
    times: the dynamic site fwd+bwd at 4096x4x4096 (where the backward takes tensor cores) and
    the same with the read step (its DX adds pre's share)."""
    from mhc_mlx import kernels

    rows = case_rows(("dynamic", "fwd+bwd", (4096, 4, 4096), "throughput"))
    alternated_settings("glue packs", rows, {"pack launches": [(coefficients, "GLUE_PACKS", False)],
                                             "glue packs": [(coefficients, "GLUE_PACKS", True)]}, rounds)
    alternated_settings("glue packs, read step everywhere", rows,
                        {"pack launches": [(coefficients, "GLUE_PACKS", False), (kernels, "FUSED_READ_STEP", True)],
                         "glue packs": [(coefficients, "GLUE_PACKS", True), (kernels, "FUSED_READ_STEP", True)]},
                        rounds)


def glue_split(rounds=5):
    """The glue with its Sinkhorn backward split off onto n lanes per token
    (coefficients.SPLIT_GLUE_SINKHORN) against the one-kernel glue, alternated
    `rounds` times: the dynamic site fwd+bwd at 4096x4x4096, 512x4x1280 and B = 1, then at
    4096 tokens with the glue packs and the read step as well."""
    from mhc_mlx import kernels

    rows = case_rows(("dynamic", "fwd+bwd", (4096, 4, 4096), "throughput"),
                     ("dynamic", "fwd+bwd", (512, 4, 1280), "throughput"),
                     ("dynamic", "fwd+bwd", (1, 4, 512), "latency"))
    alternated_settings("glue split", rows, {"one kernel": [(coefficients, "SPLIT_GLUE_SINKHORN", False)],
                                             "split": [(coefficients, "SPLIT_GLUE_SINKHORN", True)]}, rounds)
    both = [(coefficients, "GLUE_PACKS", True), (kernels, "FUSED_READ_STEP", True)]
    alternated_settings("glue split, glue packs + read step everywhere", dict(list(rows.items())[:1]),
                        {"one kernel": [(coefficients, "SPLIT_GLUE_SINKHORN", False)] + both,
                         "split": [(coefficients, "SPLIT_GLUE_SINKHORN", True)] + both}, rounds)


def sinkhorn_jacobian(rounds=5):
    """The split-off Sinkhorn backward as its Jacobian's transpose (coefficients.SINKHORN_JACOBIAN:
    the Jacobian from the forward's logits, then one product with the cotangent) against the
    replaying backward, alternated `rounds` times: the dynamic site fwd+bwd at 4096x4x4096,
    512x4x1280 and B = 1."""
    rows = case_rows(("dynamic", "fwd+bwd", (4096, 4, 4096), "throughput"),
                     ("dynamic", "fwd+bwd", (512, 4, 1280), "throughput"),
                     ("dynamic", "fwd+bwd", (1, 4, 512), "latency"))
    alternated_settings("sinkhorn backward", rows, {"replay": [(coefficients, "SINKHORN_JACOBIAN", False)],
                                                    "jacobian": [(coefficients, "SINKHORN_JACOBIAN", True)]}, rounds)


def defer_post(rounds=5):
    """Post's backward leaving x's and H_res's cotangents to pre's (kernels.DEFER_POST_X) against
    post's backward reading x itself, alternated `rounds` times: the dynamic site fwd+bwd at
    4096x4x4096 (chained by default there), then at 512x4x1280 and B = 1 with the chain forced
    on (by default not chained there)."""
    from mhc_mlx import kernels

    big = case_rows(("dynamic", "fwd+bwd", (4096, 4, 4096), "throughput"))
    alternated_settings("defer post", big,
                        {"no defer": [(kernels, "DEFER_POST_X", False)],
                         "defer": [(kernels, "DEFER_POST_X", True)]},
                        rounds)
    small = case_rows(("dynamic", "fwd+bwd", (512, 4, 1280), "throughput"),
                      ("dynamic", "fwd+bwd", (1, 4, 512), "latency"))
    chain = [(kernels, "CHAIN_X_COTANGENT", True)]
    alternated_settings("defer post, chain everywhere", small,
                        {"no chain": [(kernels, "DEFER_POST_X", False)],
                         "chain": [(kernels, "DEFER_POST_X", False)] + chain,
                         "chain + defer": [(kernels, "DEFER_POST_X", True)] + chain}, rounds)


def products_inputs(T=4096, K=16384, W=24):
    """The tensor-core products' arrays at 4096x4x4096 (n = 4), evaluated: x [T, K] bf16, phi
    [K, W], gs [T, W], c2 [T] and gacc [T, K] bf16."""
    x = mx.random.normal((T, K)).astype(mx.bfloat16)
    phi = 0.01 * mx.random.normal((K, W))
    gs, c2 = mx.random.normal((T, W)), mx.random.normal((T,))
    gacc = mx.random.normal((T, K)).astype(mx.bfloat16)
    mx.eval(x, phi, gs, c2, gacc)
    return x, phi, gs, c2, gacc


def partials_alone_row(x, phi):
    """{"partials alone": µs per application of the tensor-core forward's pack + partials},
    chained through phi (each application's sum of squares feeds the next phi by a tiny op)."""
    from mhc_mlx.kernels import coefficients_mma as cm

    return {"partials alone": lambda: chain_us(
        lambda p: p + 1e-30 * mx.sum(cm.partial_products(x, p)[1]), phi, chain_len=20)}


def dx_order(rounds=5):
    """The tensor-core DX kernel's warps in token-group-first order
    (coefficients_mma_vjp.DX_TOKEN_MAJOR, candidate) against k-group-first, alternated `rounds`
    times: the dynamic site fwd+bwd at 4096x4x4096 (the defaults otherwise), then DX alone on
    that size's arrays (per application, chained)."""
    from mhc_mlx.kernels import coefficients_mma_vjp as cmv

    rows = case_rows(("dynamic", "fwd+bwd", (4096, 4, 4096), "throughput"))
    forms = {"k groups first": [(cmv, "DX_TOKEN_MAJOR", False)], "token groups first": [(cmv, "DX_TOKEN_MAJOR", True)]}
    alternated_settings("dx order", rows, forms, rounds)
    x, phi, gs, c2, gacc = products_inputs()
    alone = {"dx alone (gacc)": lambda: chain_us(lambda a: cmv.dx(a, phi, gs, c2, None, gacc), x, chain_len=10)}
    alternated_settings("dx order, DX alone", alone, forms, rounds)


def load_forms(rounds=5):
    """The fourth session's load experiments, alternated `rounds` times: the tensor-core
    forward's launch size (coefficients_mma.TARGET_WARPS, one wave at 1536 on 132 SMs) alone
    (chained through phi, so nothing but pack, the partials and two tiny ops runs per
    application) and in the dynamic site at 4096x4x4096; then DX with its rows loaded together
    (coefficients_mma_vjp.DX_RAW_ROWS) or row by row, alone and in the site's fwd+bwd. (The
    forward's two-steps-in-flight and round-robin-k forms that ran beside them are in 72ce94e.)"""
    from mhc_mlx.kernels import coefficients_mma as cm
    from mhc_mlx.kernels import coefficients_mma_vjp as cmv

    x, phi, gs, c2, gacc = products_inputs()
    mma = partials_alone_row(x, phi)
    mma.update(case_rows(("dynamic", "fwd", (4096, 4, 4096), "throughput"),
                         ("dynamic", "fwd+bwd", (4096, 4, 4096), "throughput")))
    alternated_settings("tensor-core forward", mma, {"tw2048": [(cm, "TARGET_WARPS", 2048)],
                                                     "tw1536": [(cm, "TARGET_WARPS", 1536)]}, rounds)
    rows = {"dx alone (gacc)": lambda: chain_us(lambda a: cmv.dx(a, phi, gs, c2, None, gacc), x, chain_len=10)}
    rows.update(case_rows(("dynamic", "fwd+bwd", (4096, 4, 4096), "throughput")))
    tiles = cmv.DX_TOKEN_TILES
    alternated_settings("dx rows", rows, {"row by row": [(cmv, "DX_RAW_ROWS", False), (cmv, "DX_TOKEN_TILES", tiles)],
                                          "rows together": [(cmv, "DX_RAW_ROWS", True), (cmv, "DX_TOKEN_TILES", tiles)],
                                          "together, 1 tile": [(cmv, "DX_RAW_ROWS", True), (cmv, "DX_TOKEN_TILES", 1)]},
                        rounds)

def small_forms(rounds=5):
    """Launch-shape candidates, alternated `rounds` times: the tensor-core forward's finishing
    kernel at 32 / 16 / 8 tokens per block (coefficients_mma.FINISH_TOKENS) in the dynamic site at
    4096x4x4096; DX at one or two token tiles per warp (coefficients_mma_vjp.DX_TOKEN_TILES), alone
    and in the site's fwd+bwd. (The forward at one token tile per warp, timed beside them and
    lost, is in 14e5180.)"""
    from mhc_mlx.kernels import coefficients_mma as cm
    from mhc_mlx.kernels import coefficients_mma_vjp as cmv

    x, phi, gs, c2, gacc = products_inputs()
    site_rows = case_rows(("dynamic", "fwd", (4096, 4, 4096), "throughput"),
                          ("dynamic", "fwd+bwd", (4096, 4, 4096), "throughput"))
    alternated_settings("finish tokens", site_rows,
                        {f"{tb} tokens": [(cm, "FINISH_TOKENS", tb)] for tb in (32, 16, 8)}, rounds)
    dx_rows = {"dx alone (gacc)": lambda: chain_us(lambda a: cmv.dx(a, phi, gs, c2, None, gacc), x, chain_len=10)}
    dx_rows.update(case_rows(("dynamic", "fwd+bwd", (4096, 4, 4096), "throughput")))
    alternated_settings("dx token tiles", dx_rows, {f"{m} tiles": [(cmv, "DX_TOKEN_TILES", m)] for m in (2, 1)}, rounds)


def params_residency(rounds=5):
    """The kernels' run-time parameter arrays in GPU memory (build.DEVICE_PARAMS) against host-made
    managed memory (the default), alternated `rounds` times: the tiny-op eval (for scale), the
    B = 1 layer kernel alone (eval of one launch, graph built first), the B = 1 cases as the bench
    runs them, and the 4096x4x4096 static forward and dynamic forward+backward."""
    from mhc_mlx.kernels import build

    x1, raw, a1 = b1_inputs()
    rows = {
        "tiny op (a + 1) eval": lambda: eval_us(lambda: a1 + 1.0, 200),
        "B=1 layer kernel alone, eval": lambda: eval_us(lambda: layer.forward(x1, *raw, 20, 1e-5, True), 200),
    }
    rows.update(case_rows(("static", "fwd", (1, 4, 512), "latency"),
                          ("dynamic", "fwd", (1, 4, 512), "latency"),
                          ("static", "fwd+bwd", (1, 4, 512), "latency"),
                          ("static", "fwd", (4096, 4, 4096), "throughput"),
                          ("dynamic", "fwd+bwd", (4096, 4, 4096), "throughput")))
    alternated_settings("parameter arrays", rows, {"host-made": [(build, "DEVICE_PARAMS", False)],
                                                   "GPU memory": [(build, "DEVICE_PARAMS", True)]}, rounds)


def build_us(make, reps=200, warmup=5):
    """µs of make() alone (Python graph building, nothing evaluated); median of reps."""
    for _ in range(warmup):
        make()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        make()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def b1_split(rounds=5):
    """Where the B = 1 forward's time goes, graph building and eval apart (n = 4, C = 512, bf16),
    with the parameter arrays host-made and in GPU memory (build.DEVICE_PARAMS), alternated
    `rounds` times: the layer kernel alone, the layer function (custom function + kernel), the
    MHCLayer module, the dynamic site's pre + post, the tiny op for scale."""
    from mhc_mlx.kernels import build

    n, C = 4, 512
    x1 = mx.random.normal((1, n, C)).astype(BF)
    m = mhc.MHCLayer(n, C)
    hc = mhc.HyperConnection(C, n)
    a1 = mx.array([1.0])
    mx.eval(x1, m.parameters(), hc.parameters(), a1)
    ps = [m.H_pre_raw, m.H_post_raw, m.H_res_raw, m.rms_weight]

    def dyn():
        h, cf = hc.pre(x1)
        return hc.post(x1, h, cf)

    makes = {
        "tiny op": lambda: a1 + 1.0,
        "layer kernel alone": lambda: layer.forward(x1, *ps, m.sinkhorn_iters, m.eps, True),
        "layer function": lambda: layer.mhc_layer(x1, *ps, m.sinkhorn_iters, m.eps),
        "MHCLayer module": lambda: m(x1),
        "dynamic site pre + post": dyn,
    }
    rows = {}
    for label, make in makes.items():
        rows[f"{label}: build"] = lambda mk=make: build_us(mk)
        rows[f"{label}: eval"] = lambda mk=make: eval_us(mk, 200)
        rows[f"{label}: both"] = lambda mk=make: timing.latency_us(mk, [], repeats=200)
    alternated_settings("B=1 split", rows, {"host-made": [(build, "DEVICE_PARAMS", False)],
                                            "GPU memory": [(build, "DEVICE_PARAMS", True)]}, rounds)


def b1_probe(rounds=5):
    """Whether the B = 1 layer kernel's eval costs more than a one-line kernel's because of its
    GPU time or of host work (n = 4, C = 512, bf16; eval only, the graph built first; the
    variants interleaved in each of `rounds` rounds, as the process's speed drifts): the tiny
    op, a one-line kernel with the layer's 7 inputs, the layer kernel with `return;` first (same
    source, header, template and launch; nothing runs), the layer kernel; then the last two
    chained 100 times in one eval (per application)."""
    import dataclasses

    from mhc_mlx.kernels.build import float_params, int_params, launch

    n, C = 4, 512
    x1, raw, a1 = b1_inputs(n, C)
    V, tg, cpt, groups = layer.plan(1, n, C, x1.dtype.size)
    template = [("T", x1.dtype), ("N", n), ("V", V), ("CPT", cpt), ("INLINE", True), ("PF", layer.PREFETCH_TOKENS)]
    empty = dataclasses.replace(layer.LAYER, name="mhc_layer_empty", body="  return;\n" + layer.LAYER.body)
    seven = one_line_7()

    def run(spec):
        return lambda v: launch(spec, [v, *raw, int_params(1, C, 20), float_params(1e-5)],
                                [(v.shape, v.dtype)], groups * tg, tg, template if spec is not seven else [])[0]

    steps = {"tiny op": lambda v: a1 + 1.0, "one-line kernel, 7 inputs": run(seven),
             "layer kernel, return first": run(empty), "layer kernel": run(layer.LAYER)}
    current = {}
    forms = {label: (lambda st=step: current.update(step=st)) for label, step in steps.items()}
    rows = {"eval": lambda: eval_us(lambda: current["step"](x1), 200)}
    alternated("B=1 probe", "", rows, forms, rounds)
    chain_forms = {label: forms[label] for label in ("layer kernel, return first", "layer kernel")}
    alternated("B=1 probe", "", {"per application in a chain of 100": lambda: chain_us(current["step"], x1)},
               chain_forms, rounds)


def spin_spec(touch: bool):
    """A one-thread CUDA kernel that busy-waits CYC clock cycles (template), then (touch) writes
    vout[0] = vin[0] + 1: a launch of known GPU time, with and without a memory access."""
    from mhc_mlx.kernels.build import KernelSpec

    tail = "  vout[0] = static_cast<float>(vin[0]) + 1.0f;\n" if touch else ""
    return KernelSpec(name="mhc_spin" + ("_touch" if touch else ""), inputs=("vin",), outputs=("vout",),
                      body="  if (KTID != 0 || KBID != 0) return;\n"
                           "  const long long t0 = clock64();\n"
                           "  while (clock64() - t0 < (long long)CYC) {}\n" + tail)


def b1_sync(rounds=5):
    """Does a B = 1 eval cost more once the GPU is still busy when the host waits? MLX 0.32.4
    waits on a cudaEventBlockingSync event (the host thread sleeps, and wakes on an interrupt).
    A one-thread kernel spinning CYC cycles (~1.98 per ns) with and without one memory access,
    eval only (graph built first), the variants interleaved in each of `rounds` rounds; each
    spin chained 50 times in one eval for its GPU time; then builtin ops on a 1-element and a
    2048-element array; then the layer function and the dynamic site eager and under one
    mx.compile of (x, parameters), build + eval as the bench times them."""
    from mhc_mlx.kernels.build import launch

    n, C = 4, 512
    x1, raw, a1 = b1_inputs(n, C)
    out2048 = [((2048,), mx.float32)]
    steps = {}
    for touch in (False, True):
        spec = spin_spec(touch)
        for us in (0, 1, 2, 3, 4, 6, 8, 12, 16):
            steps[f"spin {us:2d} us{' + touch' if touch else ''}"] = (
                lambda v, spec=spec, cyc=int(us * 1980): launch(spec, [v], out2048, 32, 32, [("CYC", cyc)])[0])
    steps["tiny op (1 element)"] = lambda v: a1 + 1.0
    steps["x + 1 (2048 bf16)"] = lambda v: x1 + 1.0
    current = {}
    forms = {label: (lambda st=step: current.update(step=st)) for label, step in steps.items()}
    alternated("B=1 sync", "", {"eval": lambda: eval_us(lambda: current["step"](x1), 200)}, forms, rounds)
    flat = x1.reshape(-1).astype(mx.float32)
    mx.eval(flat)
    for label in ("spin  0 us", "spin  4 us", "spin 16 us"):
        st = steps[label]
        print(f"B=1 sync: {label} chained 50: {chain_us(lambda v: st(v), flat, 50, 10):6.2f} us per application")

    m = mhc.MHCLayer(n, C)
    hc = mhc.HyperConnection(C, n)
    mx.eval(m.parameters(), hc.parameters())
    ps = [m.H_pre_raw, m.H_post_raw, m.H_res_raw, m.rms_weight]

    def layer_fn(x, *p):
        return layer.mhc_layer(x, *p, 20, 1e-5)

    def dyn(x, phi, alpha, bias):
        hc.phi, hc.alpha, hc.bias = phi, alpha, bias
        h, cf = hc.pre(x)
        return hc.post(x, h, cf)

    layer_c, dyn_c, m_c = mx.compile(layer_fn), mx.compile(dyn), mx.compile(m)
    dps = [hc.phi, hc.alpha, hc.bias]
    makes = {
        "tiny op": lambda: a1 + 1.0,
        "layer function eager": lambda: layer_fn(x1, *ps),
        "layer function compiled (x, params)": lambda: layer_c(x1, *ps),
        "MHCLayer eager": lambda: m(x1),
        "MHCLayer under mx.compile(module)": lambda: m_c(x1),
        "dynamic site eager": lambda: dyn(x1, *dps),
        "dynamic site compiled (x, params)": lambda: dyn_c(x1, *dps),
    }
    forms = {label: (lambda mk=make: current.update(make=mk)) for label, make in makes.items()}
    alternated("B=1 compiled", "", {"build + eval": lambda: timing.latency_us(current["make"], [], repeats=200)},
               forms, rounds)


def b1_latency(rounds=5):
    """The B = 1 forwards (n = 4, C = 512, bf16) with the latency kernels (layer.LATENCY_KERNEL's
    LAYER_LATENCY, coefficients.SPLIT_SMALL's split read step) against the kernels before them
    (LAYER's inline form, one threadgroup per token), each eager and under the compiled latency
    paths (build.COMPILE_LATENCY), alternated `rounds` times, as the bench times them; with the
    tiny op for scale and the layer function's eval alone (graph built first). Then the
    1 x 32 x 2048 static forward the same way."""
    x1, raw, a1 = b1_inputs(4, 512)
    def form(kernels_new, compile_):
        return [(layer, "LATENCY_KERNEL", kernels_new), (coefficients, "SPLIT_SMALL", kernels_new),
                (build, "COMPILE_LATENCY", compile_)]

    forms = {"before (eager)": form(False, False), "compiled": form(False, True),
             "new kernels (eager)": form(True, False), "new kernels, compiled (defaults)": form(True, True)}
    rows = {"tiny op (build + eval)": lambda: timing.latency_us(lambda: a1 + 1.0, [], repeats=200),
            "layer function eval alone": lambda: eval_us(lambda: layer.mhc_layer(x1, *raw, 20, 1e-5), 200)}
    rows.update(case_rows(("static", "fwd", (1, 4, 512), "latency"), ("dynamic", "fwd", (1, 4, 512), "latency"),
                          ("static", "fwd", (1, 32, 2048), "latency")))
    alternated_settings("B=1 latency kernel", rows, forms, rounds)


def traced_forms(forms, evals=60):
    """Each form (label -> a function building one call's graph) built and evaluated `evals` times
    under PyTorch's profiler (its CUPTI sees MLX's launches), between markers: ({label: the host's
    median µs per call}, {form index: [(start, duration, kernel name), ...]})."""
    import tempfile

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_profile import mark
    from gpu_timeline import _between_markers, _kernels

    host = {}
    for make in forms.values():
        for _ in range(5):
            mx.eval(make())
    torch.cuda.init()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i, (label, make) in enumerate(forms.items()):
            mx.synchronize()
            mark(i)
            times = []
            for _ in range(evals):
                t0 = time.perf_counter()
                mx.eval(make())
                times.append(time.perf_counter() - t0)
            host[label] = 1e6 * statistics.median(times)
            mark(i)
    path = os.path.join(tempfile.mkdtemp(), "traced_forms.json")
    prof.export_chrome_trace(path)
    return host, _between_markers(_kernels(path))


def b1_trace(evals=60):
    """Each B = 1 form's kernels as the bench runs them (one build + eval per call), traced by
    PyTorch's profiler (CUPTI sees MLX's launches): per form, the median GPU duration of each
    kernel and the median gap from one kernel's end to the next's start within a call, next to
    the host's median µs per call. Spins of known cycles calibrate the clock. Forms: spins of
    1980 and 3960 cycles, the tiny op, the static layer (defaults; LAYER's inline form eager),
    the dynamic site's pre + post (defaults; the kernels before the latency kernels, eager; and
    the defaults under one more mx.compile of (x, parameters))."""
    import json

    from mhc_mlx.kernels.build import launch

    n, C = 4, 512
    x1, raw, a1 = b1_inputs(n, C)
    m = mhc.MHCLayer(n, C)
    hc = mhc.HyperConnection(C, n)
    mx.eval(m.parameters(), hc.parameters())
    dps = [hc.phi, hc.alpha, hc.bias]

    def dyn(x, phi, alpha, bias):
        hc.phi, hc.alpha, hc.bias = phi, alpha, bias
        h, cf = hc.pre(x)
        return hc.post(x, h, cf)

    dyn_c = mx.compile(dyn)
    touch = spin_spec(True)

    def before(fn):  # the kernels before the latency kernels, eager
        def run(*a):
            saved = layer.LATENCY_KERNEL, coefficients.SPLIT_SMALL, build.COMPILE_LATENCY
            layer.LATENCY_KERNEL, coefficients.SPLIT_SMALL, build.COMPILE_LATENCY = False, False, False
            try:
                return fn(*a)
            finally:
                layer.LATENCY_KERNEL, coefficients.SPLIT_SMALL, build.COMPILE_LATENCY = saved
        return run

    forms = {
        "spin 1980 cycles": lambda: launch(touch, [x1], [((2048,), mx.float32)], 32, 32, [("CYC", 1980)])[0],
        "spin 3960 cycles": lambda: launch(touch, [x1], [((2048,), mx.float32)], 32, 32, [("CYC", 3960)])[0],
        "tiny op": lambda: a1 + 1.0,
        "static MHCLayer (defaults)": lambda: m(x1),
        "static MHCLayer (before: LAYER inline, eager)": lambda: before(m)(x1),
        "dynamic pre + post (defaults)": lambda: dyn(x1, *dps),
        "dynamic pre + post (before: one threadgroup, eager)": lambda: before(dyn)(x1, *dps),
        "dynamic pre + post (defaults, under one more mx.compile)": lambda: dyn_c(x1, *dps),
    }
    host, per_form = traced_forms(forms, evals)
    for i, label in enumerate(forms):
        ks = per_form.get(i, [])
        by_name, gaps = {}, []
        for (t0, dur, name), nxt in zip(ks, ks[1:] + [None]):
            by_name.setdefault(name.split("(")[0][-60:], []).append(dur / 1e3)
            if nxt is not None and nxt[0] - (t0 + dur) < 5e3:  # within one call (calls are ~20 µs apart)
                gaps.append((nxt[0] - t0 - dur) / 1e3)
        cells = ", ".join(f"{nm} x{len(d)} {statistics.median(d):.2f}" for nm, d in by_name.items())
        gap = f"; gap within a call {statistics.median(gaps):.2f} us" if gaps else ""
        print(f"B=1 trace: {label}: host {host[label]:.1f} us per call; kernels (median us): {cells}{gap}")
    print(json.dumps({"host_us": host}))


def layer_before_woff():
    """LAYER as it was before the eighth session of 2026-11-30 (b62757b): mhc_layer_write read
    w at wts[cv * V + e] without the woff argument, mhc_layer_sumsq took a shared-memory cf."""
    import dataclasses

    helpers = layer.HELPERS
    for new, old in (("template <typename T, int N, int V, typename PC>\nKDEV float mhc_layer_sumsq(KTHREAD const float* xv, PC cf) {",
                      "template <typename T, int N, int V>\nKDEV float mhc_layer_sumsq(KTHREAD const float* xv, KSHPTR(float) cf) {"),
                     ("float inv, PW wts, int64_t woff, PO xout,", "float inv, PW wts, PO xout,"),
                     ("wts[woff + e]", "wts[cv * V + e]")):
        assert new in helpers, new
        helpers = helpers.replace(new, old)
    assert "wts, (int64_t)cv * V, xout" in layer.LAYER.body
    body = layer.LAYER.body.replace("wts, (int64_t)cv * V, xout", "wts, xout")
    return dataclasses.replace(layer.LAYER, name="mhc_layer_before", helpers=helpers, body=body)


def layer_source(rounds=5):
    """The static forward with LAYER as now against LAYER before the eighth session's helper
    change (layer_before_woff), alternated `rounds` times: bench runs AE and AF took 115.1 and
    114.2 µs at 4096 x 4 x 4096 against 100.0-109.9 in runs AB-AD."""
    rows = case_rows(("static", "fwd", (4096, 4, 4096), "throughput"), ("static", "fwd", (2560, 4, 2560), "throughput"))
    alternated_settings("LAYER source", rows, {"before (b62757b)": [(layer, "LAYER", layer_before_woff())],
                                               "now": [(layer, "LAYER", layer.LAYER)]}, rounds)


def flat_logits(rounds=5):
    """The static layer's two-launch form with the raw logits passed as they are (layer.FLAT_LOGITS,
    three graph nodes fewer per call) against reshaped first, alternated `rounds` times."""
    rows = case_rows(("static", "fwd", (4096, 4, 4096), "throughput"),
                     ("static", "fwd", (2560, 4, 2560), "throughput"),
                     ("static", "fwd+bwd", (4096, 4, 4096), "throughput"))
    alternated_settings("static layer logits", rows, {"reshaped": [(layer, "FLAT_LOGITS", False)],
                                                      "as they are": [(layer, "FLAT_LOGITS", True)]}, rounds)


def short_sinkhorn_helpers() -> str:
    """mhc_layer_coefficients_short: the static layer's coefficients (layer.HELPERS) with the
    Sinkhorn's sums as trees and its reciprocals without the Newton step (rcp.approx: within an
    ulp), a shorter dependent chain per normalisation; derived from the kernels' own text
    (prelude's ksinkhorn_thread and ksinkhorn_warp, CUDA only). The ninth session of 2026-11-30
    ran a hand-written copy of the same code (in 2fde9f1)."""
    from mhc_mlx.kernels import prelude
    from mhc_mlx.kernels.build import edited

    parts = dict(prelude.COMMON_PARTS)
    tree = ("float s[N];\n      KUNROLL for (int {a} = 0; {a} < N; ++{a}) s[{a}] = p[i * N + j];\n"
            "      KUNROLL for (int w = 1; w < N; w *= 2) KUNROLL for (int {a} = 0; {a} + w < N; {a} += 2 * w) "
            "s[{a}] += s[{a} + w];\n"
            "      float r;\n"
            "      asm(\"rcp.approx.ftz.f32 %0, %1;\" : \"=f\"(r) : \"f\"(KMAX(s[0], MHC_TINY)));")
    thread = edited(parts["ksinkhorn_thread"], [
        ("KDEV void ksinkhorn_thread(", "KDEV void ksinkhorn_thread_short("),
        ("float s = p[j];\n      KUNROLL for (int i = 1; i < N; ++i) s += p[i * N + j];\n"
         "      const float r = KRCP(KMAX(s, MHC_TINY));", tree.format(a="i")),
        ("float s = p[i * N];\n      KUNROLL for (int j = 1; j < N; ++j) s += p[i * N + j];\n"
         "      const float r = KRCP(KMAX(s, MHC_TINY));", tree.format(a="j")),
    ])
    warp = edited(parts["ksinkhorn_warp"], [("KDEV void ksinkhorn_warp(", "KDEV void ksinkhorn_warp_short("),
                                            ("ksinkhorn_thread<PN>(p, iters);", "ksinkhorn_thread_short<PN>(p, iters);")])
    start = layer.HELPERS.index("template <int N, typename PP, typename PQ, typename PR>")
    coefficients_fn = layer.HELPERS[start:layer.HELPERS.index("\n}\n", start) + 3]
    coefficients_fn = edited(coefficients_fn, [
        ("KDEV void mhc_layer_coefficients(", "KDEV void mhc_layer_coefficients_short("),
        ("ksinkhorn_warp<N>(col, live, iters);", "ksinkhorn_warp_short<N>(col, live, iters);")])
    return thread + warp + coefficients_fn


def b1_anatomy(rounds=5, evals=60):
    """Where the B = 1 static launch's 3.7 µs go (n = 4, C = 512, bf16): LAYER_LATENCY and variants
    of its text, each traced (GPU duration, PyTorch's profiler) and its eval timed (graph built
    first; the variants interleaved in each of `rounds` rounds), beside spins of known cycles:
    the kernel as it is; with 0 Sinkhorn iterations; with `return;` first (the launch alone);
    warp 0 alone (parameters, activations, Sinkhorn; no stream warps); the stream warps with the
    coefficients copied raw (no activations, no Sinkhorn); the Sinkhorn's sums as trees and its
    reciprocals without the Newton step."""
    import dataclasses
    import json

    from mhc_mlx.kernels.build import edited, float_bits, launch

    n, C = 4, 512
    x1, raw, a1 = b1_inputs(n, C)
    mx.eval(raw)
    V, tg, cpt, _ = layer.plan(1, n, C, x1.dtype.size)
    base = layer.LAYER_LATENCY
    call = "mhc_layer_coefficients<N>(cpre, cpost, cres, cf, lane, ITERS);"

    def variant(name, body=None, helpers=None):
        return dataclasses.replace(base, name=f"mhc_layer_latency_{name}", body=body or base.body,
                                   helpers=helpers or base.helpers)

    specs = {
        "as it is": (base, tg + 32, 20),
        "0 Sinkhorn iterations": (variant("it0"), tg + 32, 0),
        "return first (launch alone)": (variant("empty", "  return;\n" + base.body), tg + 32, 20),
        "warp 0 alone": (variant("w0"), 32, 20),
        "stream warps, raw coefficients": (variant("raw", edited(base.body, [(call, (
            "for (int a = lane; a < 2 * N + N * N; a += 32)\n"
            "      cf[a] = a < N ? cpre[a] : (a < 2 * N ? cpost[a - N] : cres[a - 2 * N]);"))])), tg + 32, 20),
        "Sinkhorn short chain": (variant("short", edited(base.body, [(call, call.replace(
            "coefficients<N>", "coefficients_short<N>"))]), base.helpers + short_sinkhorn_helpers()), tg + 32, 20),
    }
    touch = spin_spec(True)
    forms = {}
    for label, (spec, threads, iters) in specs.items():
        forms[label] = (lambda spec=spec, threads=threads, iters=iters: launch(
            spec, [x1, *raw], [(x1.shape, x1.dtype)], threads, threads,
            [("T", x1.dtype), ("N", n), ("V", V), ("CPT", cpt), ("C", C), ("ITERS", iters),
             ("EPS_BITS", float_bits(1e-5))])[0])
    for cyc in (0, 990, 1980, 2970, 3960):
        forms[f"spin {cyc} cycles"] = (lambda cyc=cyc: launch(touch, [x1], [((2048,), mx.float32)], 32, 32,
                                                              [("CYC", cyc)])[0])
    forms["tiny op"] = lambda: a1 + 1.0
    ref = forms["as it is"]()
    for label in ("0 Sinkhorn iterations", "Sinkhorn short chain"):
        got = forms[label]()
        print(f"B=1 anatomy: {label}: max |diff| against the kernel as it is "
              f"{mx.abs(got.astype(mx.float32) - ref.astype(mx.float32)).max().item():.3g}")
    current = {}
    switch = {label: (lambda mk=make: current.update(make=mk)) for label, make in forms.items()}
    alternated("B=1 anatomy", "", {"eval (graph built first)": lambda: eval_us(lambda: current["make"](), 200)},
               switch, rounds)
    host, per_form = traced_forms(forms, evals)
    durations = {}
    for i, label in enumerate(forms):
        ks = per_form.get(i, [])
        d = [dur / 1e3 for _, dur, _ in ks]
        durations[label] = statistics.median(d) if d else float("nan")
        print(f"B=1 anatomy trace: {label:<32} GPU {durations[label]:5.2f} us (x{len(d)}), "
              f"build + eval {host[label]:6.1f} us")
    print(json.dumps({"gpu_us": durations, "host_us": host}))


def b1_host(rounds=5):
    """The B = 1 calls (n = 4, C = 512, bf16) as the bench times them (graph building + eval), after
    the ninth session's host trims (docs/kernel-notes.md row 56), interleaved in each of `rounds`
    rounds: the tiny op; the layer function under the compiled latency path (the module's floor);
    MHCLayer; the dynamic site's pre + post, eager and under one mx.compile of (x, parameters);
    then each one's graph building alone (no eval)."""
    n, C = 4, 512
    x1, raw, a1 = b1_inputs(n, C)
    m = mhc.MHCLayer(n, C)
    hc, hc_traced = mhc.HyperConnection(C, n), mhc.HyperConnection(C, n)
    mx.eval(m.parameters(), hc.parameters(), hc_traced.parameters())
    ps = [m.H_pre_raw, m.H_post_raw, m.H_res_raw, m.rms_weight]

    def dyn(x, phi, alpha, bias):  # its module holds the trace's arrays afterwards: its own module
        hc_traced.phi, hc_traced.alpha, hc_traced.bias = phi, alpha, bias
        h, cf = hc_traced.pre(x)
        return hc_traced.post(x, h, cf)

    dyn_c = mx.compile(dyn)
    dps = [hc_traced.phi, hc_traced.alpha, hc_traced.bias]
    makes = {
        "tiny op": lambda: a1 + 1.0,
        "layer function (compiled latency path)": lambda: layer.mhc_layer(x1, *ps, 20, 1e-5),
        "MHCLayer": lambda: m(x1),
        "dynamic site eager": lambda: (lambda h_cf: hc.post(x1, *h_cf))(hc.pre(x1)),
        "dynamic site under mx.compile (x, params)": lambda: dyn_c(x1, *dps),
    }
    current = {}
    forms = {label: (lambda mk=make: current.update(make=mk)) for label, make in makes.items()}
    alternated("B=1 host", "", {"build + eval": lambda: timing.latency_us(current["make"], [], repeats=200)},
               forms, rounds)
    alternated("B=1 host", "", {"build alone": lambda: build_us(current["make"], 200)}, forms, rounds)


def layer_forms(rounds=5, sizes=((4096, 4096), (2560, 2560))):
    """The static layer forward kernel's launch forms at 4096x4x4096 and 2560x4x2560 bf16 (the
    kernel alone, 10 rotated inputs; then the bench's static forward), alternated `rounds` times:
    the default (256 threads, x in registers, 528 groups, one token's L2 prefetch); 512 threads
    with one chunk each; 128 threads reading x twice (its second pass from L2). (Run in the ninth
    session of 2026-11-30 with a fourth form, its loads and stores marked as streamed, ld/st.cs:
    slower, removed; in 202ba81.)"""
    from mhc_mlx.bench import cases as bench_cases

    n = 4
    forms_spec = {"default": (None, None), "512 threads": (512, 264), "128 threads, two passes": (128, 1056)}
    for C, T in sizes:
        H = coefficients.activate(mx.zeros((1, n)), mx.zeros((1, n)), mx.eye(n)[None] * 3, 20)
        w = mx.ones((C,))
        xs = [mx.random.normal((T, n, C)).astype(BF) for _ in range(10)]
        mx.eval(H, w, xs)
        fwd_case = bench_cases.Case("static", "fwd", (T, n, C), "bfloat16", "throughput")
        fwd, fwd_xs = bench_cases.prepare(fwd_case, 10)
        current = {}

        def form(threads, groups):
            return lambda: current.update(threads=threads, groups=groups)

        forms = {label: form(*spec) for label, spec in forms_spec.items()}
        rows = {
            "layer kernel alone": lambda: tput(lambda x: layer.forward(x, H[0], H[1], H[2], w, 20, 1e-5, False,
                                                                      current["threads"], current["groups"]),
                                               [[x] for x in xs]),
            "static fwd (bench case; threads and groups default)": lambda: tput(fwd, [[x] for x in fwd_xs]),
        }
        alternated("layer forms", f" {T}x{n}x{C}", rows, forms, rounds,
                   skip={("static fwd (bench case; threads and groups default)", f)
                         for f in ("512 threads", "128 threads, two passes")})
        floor = fwd_case.floor_bytes()
        print(f"layer forms: {T}x{n}x{C} moves {floor / 1e6:.0f} MB (read x, write out)")


def one_launch(rounds=5):
    """The few-token dynamic read step in one launch (coefficients.ONE_LAUNCH_SMALL, DYNAMIC_ONE)
    against the split form's two (the default), alternated `rounds` times: the bench's B = 1 and
    16 x 4 x 512 dynamic forwards, the B = 1 fwd+bwd, and the B = 1 site's graph building +
    eval as b1-host times it; with the tiny op for scale. Then each form's kernels traced."""
    import tempfile

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_profile import mark
    from gpu_timeline import _between_markers, _kernels

    n, C = 4, 512
    x1, _, a1 = b1_inputs(n, C)
    hc = mhc.HyperConnection(C, n)
    mx.eval(hc.parameters())
    rows = {"tiny op (build + eval)": lambda: timing.latency_us(lambda: a1 + 1.0, [], repeats=200),
            "dynamic site pre + post (build + eval)": lambda: timing.latency_us(
                lambda: (lambda h_cf: hc.post(x1, *h_cf))(hc.pre(x1)), [], repeats=200)}
    rows.update(case_rows(("dynamic", "fwd", (1, 4, 512), "latency"), ("dynamic", "fwd", (16, 4, 512), "latency"),
                          ("dynamic", "fwd+bwd", (1, 4, 512), "latency")))
    forms = {"split (two launches)": [(coefficients, "ONE_LAUNCH_SMALL", False)],
             "one launch": [(coefficients, "ONE_LAUNCH_SMALL", True)]}
    alternated_settings("one launch", rows, forms, rounds)
    saved = coefficients.ONE_LAUNCH_SMALL
    durations = {}
    try:
        for on in (False, True):
            coefficients.ONE_LAUNCH_SMALL = on
            for _ in range(5):
                mx.eval(hc.post(x1, *hc.pre(x1)))
            torch.cuda.init()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                mx.synchronize()
                mark(0)
                for _ in range(60):
                    mx.eval(hc.post(x1, *hc.pre(x1)))
                mark(0)
            path = os.path.join(tempfile.mkdtemp(), "one_launch.json")
            prof.export_chrome_trace(path)
            by_name = {}
            for _, dur, name in _between_markers(_kernels(path)).get(0, []):
                by_name.setdefault(name.split("(")[0][-50:], []).append(dur / 1e3)
            durations[on] = ", ".join(f"{k} x{len(v)} {statistics.median(v):.2f}" for k, v in by_name.items())
    finally:
        coefficients.ONE_LAUNCH_SMALL = saved
    for on, text in durations.items():
        print(f"one launch trace ({'one launch' if on else 'split'}): kernels (median us): {text}")


# One part of the experiments alone (the module docstring lists them): mode -> function
def check_forms(what, forms, call, want, width):
    """Each of forms (label -> form) run by call(form) and checked against want (the largest
    difference relative to want's largest element, and whether every element is finite); a form
    that cannot launch here is reported and removed from forms."""
    want = want.astype(mx.float32)
    for label in list(forms):
        try:
            got = call(forms[label]).astype(mx.float32)
            err = (mx.max(mx.abs(got - want)) / mx.max(mx.abs(want))).item()
            finite = mx.all(mx.isfinite(got)).item()
        except Exception as e:  # noqa: BLE001 -- reported, and the form left out of the timings
            print(f"{what} check: {label:<{width}} FAILED: {type(e).__name__}: {str(e)[:300]}")
            del forms[label]
            continue
        print(f"{what} check: {label:<{width}} max rel err {err:.1e} (bf16 output), all finite {finite}")


def tile_reuse_forms(rounds=5, T=4096, K=16384, TT=16, S=32):
    """scripts/tile_reuse.py: y = x * rsqrt(mean(x^2) + eps) on x [T, K] bf16 (128 MB at the
    defaults, the dynamic site's x at 4096 x 4 x 4096) in two launches (x read twice, as the
    dynamic backward's pre and DX read it today), in one launch whose tile's last threadgroup
    re-reads the tile from L2, and in one launch whose threadgroups wait for their tile's sums
    with their slice in registers, and in one launch whose tile is a thread-block cluster
exchanging its sums through distributed shared memory; with the copy (x * 1.5) and MLX's ops for scale. Each form
    checked against MLX's ops first; then 10 rotated inputs per timing, alternated `rounds`
    times; GB/s on read x + write y."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tile_reuse as tr

    xs = [mx.random.normal((T, K)).astype(BF) * (1 + mx.arange(T).reshape(T, 1) % 7) for _ in range(10)]
    mx.eval(xs)
    forms = {"two launches": tr.two_launches, "last re-reads": lambda x: tr.one_launch(x, "last", TT, S),
             "wait": lambda x: tr.one_launch(x, "wait", TT, S)}
    # the cluster form (sixteenth session): a tile's threadgroups one thread-block cluster
    # (first run: 8 a cluster, 4 rows a tile 166.9 µs; 8 rows 386.2; 4 a cluster 388.1, against
    # two launches' 127.4), then persistent clusters with the next tile's loads in flight
    forms["cluster 8, 4 rows"] = lambda x: tr.cluster_launch(x, 4, 8)
    for ct, groups in ((4, 264), (4, 132), (2, 528), (2, 396)):
        forms[f"persistent 8, {ct} rows, {groups} groups"] = (
            lambda x, ct=ct, groups=groups: tr.persistent_launch(x, ct, 8, groups))
    check_forms("tile reuse", forms, lambda f: f(xs[0]), tr.reference(xs[0]), 14)
    ref_c = mx.compile(tr.reference)
    rows = {"copy x * 1.5": lambda x: x * 1.5, "MLX ops, compiled": ref_c, **forms}
    current = {}
    switches = {label: (lambda f=fn: current.update(fn=f)) for label, fn in rows.items()}
    moved = 2 * T * K * 2
    times = {label: [] for label in rows}
    for _ in range(rounds):
        for label, switch in switches.items():
            switch()
            times[label].append(tput(lambda x: current["fn"](x), [[x] for x in xs]))
    copy = statistics.median(times["copy x * 1.5"])
    for label, t in times.items():
        us = statistics.median(t)
        print(f"tile reuse {T}x{K} bf16, {label:<18} {us:7.1f} us  {moved / us / 1e3:6.0f} GB/s  "
              f"{100 * copy / us:5.1f} % of the copy's rate  ({' '.join(f'{v:.0f}' for v in t)})")


def one_pass_split(rounds=5, T=4096, n=4, C=4096):
    """Where the one pass's split form (kernels/one_pass_vjp.py FORM "split") spends its time at
    T x n x C bf16, beside today's steps, each launch timed alone on its own inputs (10 rotated
    sets, alternated `rounds` times): PARTIALS at 64 / 128 channels a slice, GLUE, the FP32 DX in
    ~1056 looping threadgroups, the tensor-core DX adding pre's and post's shares (FORM "mma");
    today's pre backward (site.PRE_VJP_RES), glue and tensor-core DX alone; then the whole split
    and "mma" forms, and today's three steps together. (The first run, 2026-11-30 eleventh
    session, also timed PARTIALS 256 and the FP32 DX a threadgroup a tile and in 264 / 528.)"""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "kernels"))
    from kernel_compare import one_pass_inputs

    from mhc_mlx.kernels import coefficients_mma_vjp
    from mhc_mlx.kernels import one_pass_vjp as opv

    F = mx.float32
    sets = []
    for _ in range(10):
        a = one_pass_inputs(T, n, C, BF)
        a["glue"] = [a["H_pre"], a["jac"], a["m"], a["invr"], a["alpha"], a["H_post"], a["dH_post"],
                     mx.zeros((T, n), F), mx.zeros((T, n * n), F), mx.zeros((T, n * n), F)]
        a["h_res"], a["phit"] = a["H_res"].reshape(T, n * n), a["phi"].T
        a["partial"], a["sp"] = opv.partials(a["x"], a["dh"], a["g"])
        a["gs"], a["c2"], _ = opv.glue_from_partials(a["partial"], a["glue"], T, C, a["sp"], True)
        share, dH_pre, dH_res = site.pre_vjp_res(a["x"], a["H_pre"], a["H_res"], a["dh"], a["g"])
        a["share"], a["today_cots"] = share, [dH_pre, a["dH_post"], dH_res]
        sets.append(a)
    mx.eval(sets)

    def with_settings(fn, **kw):
        def run(a):
            saved = {k: getattr(opv, k) for k in kw}
            for k, v in kw.items():
                setattr(opv, k, v)
            try:
                return fn(a)
            finally:
                for k, v in saved.items():
                    setattr(opv, k, v)
        return run

    def whole(a):
        return opv.one_pass_vjp(a["x"], a["dh"], a["g"], a["H_pre"], a["H_res"], a["jac"], a["m"], a["invr"],
                                a["alpha"], a["bias"], a["H_post"], a["dH_post"], a["phi"], ext=tuple(a["glue"][7:]))

    def today(a):
        share, dH_pre, dH_res = site.pre_vjp_res(a["x"], a["H_pre"], a["H_res"], a["dh"], a["g"])
        gs, c2, *_ = coefficients._glue_kernel(a["m"], a["invr"], a["alpha"], a["bias"], a["H_pre"], a["H_post"],
                                               [dH_pre, a["dH_post"], dH_res], n, n * C, 20)
        return coefficients_mma_vjp.dx(a["x"].reshape(T, n * C), a["phi"], gs, c2, gacc=share), gs

    partials = lambda a: opv.partials(a["x"], a["dh"], a["g"])[0]  # noqa: E731
    dx = lambda a: opv.split_dx(a["x"], a["dh"], a["g"], a["H_pre"], a["h_res"], a["phit"], a["gs"], a["c2"])  # noqa: E731
    def dx_mma(a):  # the tensor-core DX adding pre's and post's shares itself (FORM "mma")
        return coefficients_mma_vjp.dx(a["x"].reshape(T, n * C), a["phi"], a["gs"], a["c2"], pre=(a["H_pre"], a["dh"]),
                                       res=(a["h_res"], a["g"]))

    forms = {
        "PARTIALS 64": with_settings(partials, PARTIAL_CS=64),
        "PARTIALS 128": with_settings(partials, PARTIAL_CS=128),
        "GLUE": lambda a: opv.glue_from_partials(a["partial"], a["glue"], T, C, a["sp"], True)[0],
        "DX 1056 blocks": with_settings(dx, DX_BLOCKS=1056),
        "DX mma (PRE, RES)": dx_mma,
        "today: pre bwd": lambda a: site.pre_vjp_res(a["x"], a["H_pre"], a["H_res"], a["dh"], a["g"])[0],
        "today: glue": lambda a: coefficients._glue_kernel(a["m"], a["invr"], a["alpha"], a["bias"], a["H_pre"],
                                                           a["H_post"], a["today_cots"], n, n * C, 20)[0],
        "today: DX (ACC)": lambda a: coefficients_mma_vjp.dx(a["x"].reshape(T, n * C), a["phi"], a["gs"], a["c2"],
                                                             gacc=a["share"]),
        "split, 128 / 1056": with_settings(whole, FORM="split", PARTIAL_CS=128, DX_BLOCKS=1056),
        "mma, 64": with_settings(whole, FORM="mma", PARTIAL_CS=64),
        "mma, 128": with_settings(whole, FORM="mma", PARTIAL_CS=128),
        "today, three steps": today,
    }
    times = {label: [] for label in forms}
    for _ in range(rounds):
        for label, fn in forms.items():
            times[label].append(tput(fn, [[a] for a in sets]))
    for label, t in times.items():
        print(f"one-pass split {T}x{n}x{C} bf16, {label:<20} {statistics.median(t):7.1f} us  "
              f"({' '.join(f'{v:.0f}' for v in t)})")


def record_trace(rows, sets, path):
    """One eval of each row's K applications (graph built first, kernels built before) under
    PyTorch's profiler, between two marker launches per row (gpu_timeline's method); the trace
    written to path."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpu_profile

    torch.cuda.init()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i, fn in enumerate(rows.values()):
            mx.eval([fn(*a) for a in sets])
            outs = [fn(*a) for a in sets]
            mx.synchronize()
            gpu_profile.mark(i)
            mx.eval(outs)
            mx.synchronize()
            gpu_profile.mark(i)
            del outs
    prof.export_chrome_trace(path)


def traced_rows(rows, sets, path):
    """{label: (kernels by name: [µs each], span µs)} of one eval of each row's K applications,
    traced by record_trace."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_timeline import _between_markers, _kernels

    record_trace(rows, sets, path)
    out = {}
    for i, kernels in _between_markers(_kernels(path)).items():
        by_name = {}
        for _, dur, name in kernels:
            by_name.setdefault(name, []).append(dur / 1e3)
        span = (max(t + d for t, d, _ in kernels) - min(t for t, _, _ in kernels)) / 1e3
        out[list(rows)[i]] = (by_name, span)
    os.remove(path)
    return out


def under(settings, fn):
    """fn with each (module, attribute, value) of settings assigned while it runs (so the kernels
    it builds take them), the old values restored after."""
    def run(*args):
        saved = [(m, a, getattr(m, a)) for m, a, _ in settings]
        for m, a, v in settings:
            setattr(m, a, v)
        try:
            return fn(*args)
        finally:
            for m, a, v in saved:
                setattr(m, a, v)
    return run


def timed_and_traced(title, rows, sets, rounds, path, nbytes=None, traced=None):
    """Each row (label -> fn of one input set) timed as the bench times throughput (tput),
    medians of `rounds` alternated rounds; then one eval of each row in `traced` (default all)
    traced by traced_rows. Prints both; nbytes (label -> bytes) adds GB/s to the lines."""
    times = {label: [] for label in rows}
    for _ in range(rounds):
        for label, fn in rows.items():
            times[label].append(tput(fn, sets))
    width = max(len(label) for label in rows) + 2
    rate = lambda label, us: gbps(nbytes[label], us) if nbytes else ""  # noqa: E731
    print(f"{title}, medians of {rounds} alternated rounds")
    for label, t in times.items():
        us = statistics.median(t)
        print(f"  {label:<{width}} {us:7.1f} us {rate(label, us)}  ({' '.join(f'{v:.0f}' for v in t)})")
    found = traced_rows({label: rows[label] for label in (traced or rows)}, sets, path)
    print(f"traced, one eval of {len(sets)} applications per row: span / application, each kernel's count and mean µs")
    for label, (by_name, span) in found.items():
        print(f"  {label:<{width}} span {span / len(sets):7.1f} us {rate(label, span / len(sets))}")
        for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
            print(f"      {len(durs):3d} x {statistics.mean(durs):7.1f} us  {name[:90]}")


def vendor_gemm(rounds=5, T=4096, K=16384, W=24):
    """The coefficient products beside MLX's own matmul of the same shapes (cuBLAS on CUDA), each
    on 10 rotated x [T, K] bf16 (4096 x 4 x 4096's), medians of `rounds` alternated rounds, and
    the copy of x beside them: does the vendor's GEMM read x for a 24-wide product faster than
    ours? MLX's bf16 matmul writes bf16 (the logits' relative error ~2^-9), where ours keep
    float32 (phi in three bf16 parts); its float32 matmul would first cast x (twice x's bytes).
    So the vendor rows bound what such a product can take here, they are not a form we could use
    as they are. Bytes per row: what it must move at least (x read; DX and addmm also an
    accumulator read and the output written). Our partials are timed with phi / gs packed
    before (the packs depend on the parameters only); dphi at several launch sizes. Then one eval
    of the main rows traced, kernel by kernel. (The forward at 1 and 4 token tiles per warp, run
    beside them in the thirteenth session and slower, is in 7e2909e.)"""
    from mhc_mlx.kernels import coefficients_mma as cm
    from mhc_mlx.kernels import coefficients_mma_vjp as cmv

    xs = [mx.random.normal((T, K)).astype(BF) for _ in range(10)]
    phi = 0.01 * mx.random.normal((K, W))
    gs, c2 = mx.random.normal((T, W)) * 0.01, mx.random.normal((T,)) * 0.01
    gacc = mx.random.normal((T, K)).astype(BF)
    hi = phi.astype(BF)
    mid = (phi - hi.astype(mx.float32)).astype(BF)
    lo = (phi - hi.astype(mx.float32) - mid.astype(mx.float32)).astype(BF)
    phi3 = mx.concatenate([hi, mid, lo], axis=1)
    gsb, phitb = gs.astype(BF), mx.contiguous(hi.T)
    packed = cm.pack_phi(phi)
    gs_packed = cmv.pack_b(gs, cmv.DPHI_PARTS, False)
    mx.eval(xs, phi, gs, c2, gacc, hi, phi3, gsb, phitb, packed, gs_packed)
    xb = xs[0].nbytes


    def dphi(tw):
        return under([(cmv, "TARGET_WARPS", tw)], lambda x: cmv.dphi(x, gs, gs_packed))

    rows = {
        "copy x * 1.5": (lambda x: x * 1.5, 2 * xb),
        "ours: forward MMA (the default)": (lambda x: cm.partial_products(x, phi, packed), xb),
        "mlx: x @ phi bf16 [K, 24]": (lambda x: x @ hi, xb),
        "mlx: x @ phi bf16 [K, 72] (three parts)": (lambda x: x @ phi3, xb),
        "ours: dphi (2048 warps; default) + sum": (dphi(2048), xb),
        "ours: dphi (1024 warps) + sum": (dphi(1024), xb),
        "ours: dphi (4096 warps) + sum": (dphi(4096), xb),
        "mlx: x^T @ gs bf16": (lambda x: x.T @ gsb, xb),
        "ours: DX (gacc)": (lambda x: cmv.dx(x, phi, gs, c2, None, gacc), 3 * xb),
        "mlx: addmm(x, gs, phi^T) bf16": (lambda x: mx.addmm(x, gsb, phitb), 2 * xb),
    }
    traced = ["copy x * 1.5", "ours: forward MMA (the default)", "mlx: x @ phi bf16 [K, 24]",
              "mlx: x @ phi bf16 [K, 72] (three parts)", "ours: dphi (2048 warps; default) + sum", "mlx: x^T @ gs bf16",
              "ours: DX (gacc)", "mlx: addmm(x, gs, phi^T) bf16"]
    timed_and_traced(f"vendor GEMM, {T} x {K} bf16 x, W = {W}, 10 rotated x", {k: v[0] for k, v in rows.items()},
                     [[x] for x in xs], rounds, "/tmp/vendor_trace.json", {k: v[1] for k, v in rows.items()}, traced)


def product_parts(rounds=5, T=4096, K=16384, W=24):
    """Is the tensor-core forward (and dphi) bound by its mma count? The partials with phi in 3
    (the default: float32's 24 bits), 2 and 1 bfloat16 parts, and dphi with gs in 3, 2 and 1
    parts: each alone on 10 rotated x [T, K] bf16 (medians of `rounds` alternated rounds), its
    error against the 3-part result, then one eval of each traced. (A diagnosis: fewer parts
    round phi or gs, which the float32 coefficient contract does not allow.)"""
    from mhc_mlx.kernels import coefficients_mma as cm
    from mhc_mlx.kernels import coefficients_mma_vjp as cmv

    xs = [mx.random.normal((T, K)).astype(BF) for _ in range(10)]
    phi = 0.01 * mx.random.normal((K, W))
    gs = mx.random.normal((T, W)) * 0.01
    pks = {p: cm.pack_phi(phi, parts=p) for p in (3, 2, 1)}
    gsbs = {p: cmv.pack_b(gs, p, False) for p in (3, 2, 1)}
    mx.eval(xs, phi, gs, pks, gsbs)

    def fwd(p):
        return under([(cm, "PHI_PARTS", p)], lambda x: cm.partial_products(x, phi, pks[p]))

    def dphi(p):
        return under([(cmv, "DPHI_PARTS", p)], lambda x: cmv.dphi(x, gs, gsbs[p]))

    rows = {f"forward, phi in {p} parts": fwd(p) for p in (3, 2, 1)}
    rows.update({f"dphi, gs in {p} parts": dphi(p) for p in (3, 2, 1)})
    ref_f, ref_d = mx.sum(fwd(3)(xs[0])[0], axis=0), dphi(3)(xs[0])
    for p in (2, 1):
        got_f, got_d = mx.sum(fwd(p)(xs[0])[0], axis=0), dphi(p)(xs[0])
        ef = mx.max(mx.abs(got_f - ref_f)).item() / mx.max(mx.abs(ref_f)).item()
        ed = mx.max(mx.abs(got_d - ref_d)).item() / mx.max(mx.abs(ref_d)).item()
        print(f"{p} parts: forward max |diff| / max |3 parts| {ef:.2e}, dphi {ed:.2e}")
    timed_and_traced(f"products by parts, {T} x {K} bf16 x, W = {W}, packed before", rows, [[x] for x in xs],
                     rounds, "/tmp/parts_trace.json")


def wgmma(rounds=5, T=4096, K=16384, W=24):
    """The forward partials by warpgroup MMA (coefficients_mma.WGMMA, candidate) against the MMA
    kernel: first its sums against the MMA kernel's on one x (a probe of the swapped descriptor
    reading, in the first run, made an illegal memory access; removed); then, phi packed before for
    each, both alone on 10 rotated x [T, K] bf16 (medians of `rounds` alternated rounds), one eval
    of each traced, and the dynamic site at 4096x4x4096 and 512x4x1280, forward and
    forward+backward, with it off and on."""
    from mhc_mlx.kernels import coefficients_mma as cm

    xs = [mx.random.normal((T, K)).astype(BF) for _ in range(10)]
    phi = 0.01 * mx.random.normal((K, W))
    pk, pk_wg = cm.pack_phi(phi), cm.pack_phi_wg(phi)
    mx.eval(xs, phi, pk, pk_wg)

    def form(wg):
        return under([(cm, "WGMMA", wg)], lambda x: cm.partial_products(x, phi, pk_wg if wg else pk))

    ref, ref_ssq = (mx.sum(a, axis=0) for a in form(False)(xs[0]))
    dot, ssq = (mx.sum(a, axis=0) for a in form(True)(xs[0]))
    err = mx.max(mx.abs(dot - ref)).item() / mx.max(mx.abs(ref)).item()
    err_ssq = mx.max(mx.abs(ssq - ref_ssq) / ref_ssq).item()
    print(f"wgmma: dot max |diff| / max |MMA's| {err:.2e}, sum of squares {err_ssq:.2e}")
    rows = {"MMA (default)": form(False), "wgmma": form(True)}
    timed_and_traced(f"forward partials, {T} x {K} bf16 x, W = {W}, phi packed before", rows, [[x] for x in xs],
                     rounds, "/tmp/wgmma_trace.json", {label: xs[0].nbytes for label in rows})
    site_rows = case_rows(("dynamic", "fwd", (4096, 4, 4096), "throughput"),
                          ("dynamic", "fwd+bwd", (4096, 4, 4096), "throughput"),
                          ("dynamic", "fwd", (512, 4, 1280), "throughput"),
                          ("dynamic", "fwd+bwd", (512, 4, 1280), "throughput"))
    alternated_settings("forward partials", site_rows,
                        {"MMA": [(cm, "WGMMA", False)], "wgmma": [(cm, "WGMMA", True)]}, rounds)


def wgmma_dphi(rounds=5, T=4096, K=16384, W=24):
    """dphi by warpgroup MMA (coefficients_mma_vjp.DPHI_WGMMA, candidate, written after the
    thirteenth session's device time) against DPHI: its result against DPHI's on one x (equal
    bits where the token splits agree, else float32 rounding), both alone on 10 rotated x [T, K]
    bf16 (gs packed inside: the bench's path) and traced; then the dynamic site at 4096x4x4096 and
    512x4x1280, forward+backward, with neither, the forward's (WGMMA) and both."""
    from mhc_mlx.kernels import coefficients_mma as cm
    from mhc_mlx.kernels import coefficients_mma_vjp as cmv

    xs = [mx.random.normal((T, K)).astype(BF) for _ in range(10)]
    gs = mx.random.normal((T, W)) * 0.01
    mx.eval(xs, gs)
    # the forward's kernel text changed after its last run (shared staging, constant descriptor
    # offsets, one pack): its sums against the MMA kernel's again
    phi = 0.01 * mx.random.normal((K, W))
    fwd = {wg: under([(cm, "WGMMA", wg)], lambda x, wg=wg: cm.partial_products(
        x, phi, cm.pack_phi_wg(phi) if wg else cm.pack_phi(phi))) for wg in (False, True)}
    (ref_dot, ref_ssq), (dot, ssq) = ([mx.sum(a, axis=0) for a in fwd[wg](xs[0])] for wg in (False, True))
    print(f"forward by wgmma: dot max |diff| / max |MMA's| "
          f"{(mx.max(mx.abs(dot - ref_dot)) / mx.max(mx.abs(ref_dot))).item():.2e}, sum of squares "
          f"{mx.max(mx.abs(ssq - ref_ssq) / ref_ssq).item():.2e}")
    forms = {on: under([(cmv, "DPHI_WGMMA", on)], lambda x: cmv.dphi(x, gs)) for on in (False, True)}
    ref, got = forms[False](xs[0]), forms[True](xs[0])
    err = mx.max(mx.abs(got - ref)).item() / mx.max(mx.abs(ref)).item()
    print(f"dphi by wgmma: max |diff| / max |DPHI's| {err:.2e}")
    rows = {"DPHI (default)": forms[False], "dphi by wgmma": forms[True]}
    timed_and_traced(f"dphi, {T} x {K} bf16 x, W = {W}", rows, [[x] for x in xs], rounds, "/tmp/wgmma_dphi_trace.json",
                     {label: xs[0].nbytes for label in rows})
    warpgroup_site_ab(rounds, ("fwd+bwd", (4096, 4, 4096)), ("fwd+bwd", (512, 4, 1280)))


def warpgroup_site_ab(rounds, *cases):
    """The dynamic site's (pass, shape) cases with neither / the forward's / both warpgroup-MMA
    products, medians of `rounds` alternated rounds in one process."""
    from mhc_mlx.kernels import coefficients_mma as cm
    from mhc_mlx.kernels import coefficients_mma_vjp as cmv

    site_rows = case_rows(*(("dynamic", pass_, shape, "throughput") for pass_, shape in cases))
    alternated_settings("warpgroup MMA", site_rows,
                        {"neither": [(cm, "WGMMA", False), (cmv, "DPHI_WGMMA", False)],
                         "forward": [(cm, "WGMMA", True), (cmv, "DPHI_WGMMA", False)],
                         "both": [(cm, "WGMMA", True), (cmv, "DPHI_WGMMA", True)]}, rounds)


def wg_plan_sizes(rounds=5, T=4096, K=16384, W=24):
    """(fourteenth session) the warpgroup-MMA products' launch sizes, each alone on 10 rotated x
    [T, K] bf16 (medians of `rounds` alternated rounds) and traced: the forward's partials
    (phi packed before) at coefficients_mma.TARGET_WARPS 768 / 1536 (default) / 3072, which sets
    MMA_WG's k splits, and dphi (gs packed inside) at DPHI_WG_TARGET_BLOCKS 132 / 264 / 384
    (default) / 528 / 792, which sets DPHI_WG's token splits."""
    from mhc_mlx.kernels import coefficients_mma as cm
    from mhc_mlx.kernels import coefficients_mma_vjp as cmv

    xs = [mx.random.normal((T, K)).astype(BF) for _ in range(10)]
    phi = 0.01 * mx.random.normal((K, W))
    gs = mx.random.normal((T, W)) * 0.01
    pk = cm.pack_phi_wg(phi)
    mx.eval(xs, phi, gs, pk)
    fwd = {f"forward, TARGET_WARPS {w}": under([(cm, "WGMMA", True), (cm, "TARGET_WARPS", w)],
                                               lambda x: cm.partial_products(x, phi, pk))
           for w in (768, 1536, 3072)}
    timed_and_traced(f"forward partials by wgmma, {T} x {K} bf16 x", fwd, [[x] for x in xs], rounds,
                     "/tmp/wg_plan_fwd.json", {label: xs[0].nbytes for label in fwd})
    dphi = {f"dphi, blocks {b}": under([(cmv, "DPHI_WGMMA", True), (cmv, "DPHI_WG_TARGET_BLOCKS", b)],
                                       lambda x: cmv.dphi(x, gs))
            for b in (132, 264, 384, 528, 792)}
    timed_and_traced(f"dphi by wgmma, {T} x {K} bf16 x", dphi, [[x] for x in xs], rounds,
                     "/tmp/wg_plan_dphi.json", {label: xs[0].nbytes for label in dphi})


def wgmma_ab(rounds=9):
    """(fourteenth session) the warpgroup-MMA products, now the defaults, against the MMA kernels
    in the dynamic site at 4096x4x4096, forward and forward+backward."""
    warpgroup_site_ab(rounds, ("fwd", (4096, 4, 4096)), ("fwd+bwd", (4096, 4, 4096)))


def static_host(rounds=7, T=4096, n=4, C=4096):
    """(fifteenth session) where the static forward's one-eval time goes beyond the GPU's, at
    T x n x C bf16, 10 rotated inputs, one eval (the bench's method), medians of `rounds`
    alternated rounds, then each row traced (its GPU span per application): the copy; the layer
    kernel launched alone with its coefficients given; the coefficient and layer kernels launched
    bare; the inline layer launched bare; those two forms as the custom function the module
    calls (four outputs / one); the two launches under a custom function of one output; the
    MHCLayer module (the bench case) with layer.INLINE_ALWAYS off and on. Then the bench's
    static fwd and fwd+bwd cases with INLINE_ALWAYS off and on."""
    xs = [mx.random.normal((T, n, C)).astype(BF) for _ in range(10)]
    raw = (mx.zeros((n,)), mx.zeros((n,)), 3.0 * mx.eye(n))
    w = mx.ones((C,))
    H = coefficients.activate(*raw, 20)
    module = mhc.MHCLayer(n, C)
    mx.eval(xs, raw, w, H, module.parameters())
    params = (module.H_pre_raw, module.H_post_raw, module.H_res_raw, module.rms_weight)

    @mx.custom_function
    def two_launches_one_output(x, p, q, r, wt):
        return layer.forward(x, *coefficients.activate(p, q, r, 20), wt, 20, 1e-5, False)

    four, one = layer._function(20, 1e-5, False, None), layer._function(20, 1e-5, True, None)
    # compiled once here; the parameters are inputs, not constants of the trace
    compiled_four = mx.compile(lambda x, p, q, r, wt: four(x, p, q, r, wt)[0])
    compiled_one = mx.compile(lambda x, p, q, r, wt: one(x, p, q, r, wt)[0])
    compiled_module = mx.compile(module)
    rows = {
        "copy x * 1.5": lambda x: x * 1.5,
        "LAYER launch (coefficients given)": lambda x: layer.forward(x, *H, w, 20, 1e-5, False),
        "ACTIVATE + LAYER launches": lambda x: layer.forward(x, *coefficients.activate(*raw, 20), w, 20, 1e-5, False),
        "LAYER inline launch": lambda x: layer.forward(x, *raw, w, 20, 1e-5, True),
        "custom fn, 2 launches, 4 outputs": lambda x: four(x, *params)[0],
        "custom fn, 2 launches, 1 output": lambda x: two_launches_one_output(x, *params),
        "custom fn, inline, 1 output": lambda x: one(x, *params)[0],
        "compiled: custom fn, 2 launches, 4 outputs": lambda x: compiled_four(x, *params),
        "compiled: custom fn, inline, 1 output": lambda x: compiled_one(x, *params),
        "MHCLayer (INLINE_ALWAYS off)": module,
        "MHCLayer under mx.compile": lambda x: compiled_module(x),
        "MHCLayer (INLINE_ALWAYS on)": under([(layer, "INLINE_ALWAYS", True)], module),
    }
    timed_and_traced(f"static forward host costs, {T}x{n}x{C} bf16", rows, [[x] for x in xs], rounds,
                     "/tmp/static_host.json", {label: 2 * xs[0].nbytes for label in rows})
    bench_rows = case_rows(("static", "fwd", (T, n, C), "throughput"), ("static", "fwd+bwd", (T, n, C), "throughput"),
                           ("static", "fwd", (2560, n, 2560), "throughput"), ("static", "fwd", (512, n, 1280), "throughput"),
                           ("static", "fwd", (320, n, 1280), "throughput"), ("static", "fwd+bwd", (512, n, 1280), "throughput"))
    alternated_settings("layer.INLINE_ALWAYS", bench_rows,
                        {"off": [(layer, "INLINE_ALWAYS", False)], "on": [(layer, "INLINE_ALWAYS", True)]}, rounds)
    step_rows(rounds, ("static", "fwd", (T, n, C)), ("static", "fwd+bwd", (T, n, C)), ("dynamic", "fwd", (T, n, C)),
              ("dynamic", "fwd+bwd", (T, n, C)))


def step_rows(rounds, *specs):
    """The bench's throughput cases (site, pass, shape; bf16, 10 rotated inputs) eager and as one
    mx.compile'd step (the bench's +step rows), alternated `rounds` times in this process."""
    from mhc_mlx.bench import cases as bench_cases

    for site_, pass_, shape in specs:
        case = bench_cases.Case(site_, pass_, shape, "bfloat16", "throughput")
        forms = {}
        for label, step in (("eager", False), ("+step", True)):
            apply, xs = bench_cases.prepare(case, 10, step)
            forms[label] = (apply, [[x] for x in xs])
        times = {label: [] for label in forms}
        for _ in range(rounds):
            for label, (apply, sets) in forms.items():
                times[label].append(tput(apply, sets))
        cells = [f"{label} {statistics.median(t):6.1f} ({' '.join(f'{v:.0f}' for v in t)})" for label, t in times.items()]
        print(f"eager / +step, {case.id}, median of {rounds} alternated (us): " + ", ".join(cells))


def step_trace(rounds=3, T=4096, n=4, C=4096):
    """(fifteenth session) why the dynamic fwd+bwd as one compiled step (+step) ran ~50 µs slower
    than eager in two processes (kernel-notes row 78): both timed and traced, their kernels listed
    (an extra copy or a changed kernel form would show there)."""
    from mhc_mlx.bench import cases as bench_cases

    case = bench_cases.Case("dynamic", "fwd+bwd", (T, n, C), "bfloat16", "throughput")
    eager, xs = bench_cases.prepare(case, 10)
    step, _ = bench_cases.prepare(case, 1, True)
    timed_and_traced(f"dynamic fwd+bwd {T}x{n}x{C} bf16, eager and as one compiled step",
                     {"eager": eager, "+step": step}, [[x] for x in xs], rounds, "/tmp/step_trace.json")


def wg_time(rounds=5, T=4096, K=16384, W=24):
    """(fifteenth session) the warpgroup-MMA products at their default launch sizes, each alone on
    10 rotated x [T, K] bf16, timed and traced: the forward's partials (phi packed before) and
    dphi (gs packed inside), after their double-buffered loop became one shared helper
    (mhc_wg_steps); rows 74-76 measured them before."""
    from mhc_mlx.kernels import coefficients_mma as cm
    from mhc_mlx.kernels import coefficients_mma_vjp as cmv

    xs = [mx.random.normal((T, K)).astype(BF) for _ in range(10)]
    phi = 0.01 * mx.random.normal((K, W))
    gs = mx.random.normal((T, W)) * 0.01
    pk = cm.pack_phi_wg(phi)
    mx.eval(xs, phi, gs, pk)
    rows = {"forward partials (MMA_WG)": lambda x: cm.partial_products(x, phi, pk),
            "dphi (DPHI_WG)": lambda x: cmv.dphi(x, gs)}
    timed_and_traced(f"warpgroup products, {T} x {K} bf16 x", rows, [[x] for x in xs], rounds,
                     "/tmp/wg_time.json", {label: xs[0].nbytes for label in rows})


def malloc_growth(evals=14, T=4096, n=4, C=4096):
    """(sixteenth session) does the bench's eval of K rotated applications still allocate from
    CUDA after its warm-up? The fifteenth session's trace of the dynamic fwd+bwd (its third eval)
    held 17 cudaMallocAsync calls (557.5 µs of host time) that the copy's had none of. MLX's
    allocator takes from CUDA only when its buffer cache has no buffer of a fitting size, so the
    memory it holds (active + cached) grows exactly when it did. Each case is evaluated `evals`
    times as timing.throughput_us does (graphs built before the clock), printing per eval the
    wall time per application and the growth of MLX's held memory."""
    from mhc_mlx.bench import cases as bench_cases
    from mhc_mlx.bench import timing as bench_timing
    from mhc_mlx.dispatch import use_backend

    def held():
        return mx.get_active_memory() + mx.get_cache_memory()

    for kind, pass_ in (("dynamic", "fwd+bwd"), ("static", "fwd"), ("dynamic", "fwd")):
        case = bench_cases.Case(kind, pass_, (T, n, C), "bfloat16", "throughput")
        K = bench_timing.rotation(case.floor_bytes())
        apply, xs = bench_cases.prepare(case, K)
        rows = []
        with use_backend("kernels"):
            for _ in range(evals):
                outs = [apply(x) for x in xs]
                mx.synchronize()
                before = held()
                t0 = time.perf_counter()
                mx.eval(outs)
                us = 1e6 * (time.perf_counter() - t0) / K
                mx.synchronize()
                rows.append((us, (held() - before) / 2**20))
                del outs
        print(f"malloc growth {kind} {pass_} {T}x{n}x{C} bf16, K = {K}: per eval µs/application (held MB grown): "
              + ", ".join(f"{us:.1f} ({mb:+.0f})" for us, mb in rows), flush=True)


def two_site_draws(draws=3, T=4096, C=4096, seed=0):
    """(sixteenth session) test_one_pass_vjp_through_a_hyper_connection[4096-4096-split] failed
    once (alpha's gradient 4.6 % from the reference against its 3 % tolerance, in its two-site
    compiled step). The same two-site step per seeded draw through the default backward and the
    one-pass candidate's two forms, each gradient's relative error against the reference
    backend's float32 autodiff on the CPU (the test's method): whether the miss is the draw (bf16
    rounding of the first site's output, which the float32 reference does not round, carried
    into cancelling sums) or a form."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "kernels"))
    import kernels_ref64 as ref64
    import numpy as np

    from mhc_mlx import dispatch, kernels
    from mhc_mlx.kernels import coefficients, one_pass_vjp

    n, names = 4, ["phi", "alpha", "bias"]
    forms = {"default": (False, None), "one pass split": (True, "split"), "one pass mma": (True, "mma")}
    saved = kernels.ONE_PASS_VJP, coefficients.MMA_VJP, one_pass_vjp.FORM
    try:
        for d in range(draws):
            mx.random.seed(seed + d)
            hc = mhc.HyperConnection(C, n, init="paper")
            hc.update({"bias": mx.random.normal(hc.bias.shape), "phi": mx.random.normal(hc.phi.shape) / 20})
            hc2 = mhc.HyperConnection(C, n, init="paper")
            hc2.update({"bias": mx.random.normal(hc2.bias.shape), "phi": mx.random.normal(hc2.phi.shape) / 20})
            params = [getattr(hc, k) for k in names]
            x, cot = (mx.random.normal((T, n, C)).astype(BF).astype(mx.float32) for _ in range(2))
            w = mx.random.normal((C,))
            mx.eval(x, cot, w, params, hc2.parameters())

            def two_sites(x_, *ps):
                hc.update(dict(zip(names, ps)))
                y = hc(x_, lambda h: (h.astype(mx.float32) * w).astype(h.dtype))
                return hc2(y, lambda h: (h.astype(mx.float32) * w).astype(h.dtype))

            with dispatch.use_backend("reference"), mx.stream(mx.cpu):
                _, want = mx.vjp(two_sites, [x, *params], [cot])
                mx.eval(want)
            for label, (on, form) in forms.items():
                kernels.ONE_PASS_VJP, coefficients.MMA_VJP = on, True if on else saved[1]
                if form:
                    one_pass_vjp.FORM = form
                step = mx.compile(lambda x_, c_, *ps: mx.vjp(two_sites, [x_, *ps], [c_])[1])
                got = step(x.astype(BF), cot.astype(BF), *params)
                errs = [ref64.rel_err(np.array(g.astype(mx.float32), dtype=np.float64),
                                      np.array(r.astype(mx.float32), dtype=np.float64)) for g, r in zip(got, want)]
                print(f"two sites {T}x{n}x{C} bf16, draw {seed + d}, {label:<15} rel err x {errs[0]:.2e}  "
                      f"phi {errs[1]:.2e}  alpha {errs[2]:.2e}  bias {errs[3]:.2e}", flush=True)
    finally:
        kernels.ONE_PASS_VJP, coefficients.MMA_VJP, one_pass_vjp.FORM = saved


def _graph_nodes(outs) -> dict:
    """Primitive name -> count in the graph of outs (MLX's dot export; arrays without a
    primitive, the inputs and constants, are not counted)."""
    import collections
    import io
    import re

    buf = io.StringIO()
    mx.export_to_dot(buf, outs)
    labels = re.findall(r'label\s*=\s*"([^"]*)"', buf.getvalue())
    return dict(collections.Counter(re.sub(r"\s.*", "", lab) for lab in labels
                                    if not lab.startswith("array") and not lab[:1].isdigit()))


def eval_anatomy(rounds=5, T=4096, n=4, C=4096):
    """(seventeenth session) where a throughput row's one-eval wall time goes beyond the GPU's
    span, and why the dynamic fwd+bwd as one compiled step ran ~50 µs an application slower than
    eager with the same kernels and span (row 80). Rows: the copy, the static forward, the
    dynamic forward and fwd+bwd eagerly, the fwd+bwd compiled as the bench compiles it (its
    parameters and cotangent constants of the trace) and compiled with them as inputs (as a
    training step passes them). Each timed as the bench times throughput (K = 10 rotated inputs,
    graphs built before the clock), medians of `rounds` alternated rounds; then one eval of each
    traced: the GPU's start after the eval began (first kernel against the marker before it),
    its span, its tail (the marker after it against the last kernel: the host's wake-up), the
    CUDA calls the host made meanwhile, and the graph's nodes per application by primitive."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpu_profile
    from gpu_timeline import _host_calls, _kernels

    from mhc_mlx.bench import cases as bench_cases
    from mhc_mlx.dispatch import use_backend

    K = 10
    rows, sets = {}, None
    for label, kind, pass_ in (("static fwd", "static", "fwd"), ("dynamic fwd", "dynamic", "fwd"),
                               ("dynamic fwd+bwd", "dynamic", "fwd+bwd")):
        case = bench_cases.Case(kind, pass_, (T, n, C), "bfloat16", "throughput")
        apply, xs = bench_cases.prepare(case, K)
        sets = sets or [[x] for x in xs]
        rows[label] = apply
    case = bench_cases.Case("dynamic", "fwd+bwd", (T, n, C), "bfloat16", "throughput")
    rows["fwd+bwd +step (constants)"] = bench_cases.prepare(case, 1, True)[0]
    # the same step with the parameters and cotangent as inputs of the compiled function
    forward, names, module = bench_cases._site(case)
    params = [getattr(module, nm) for nm in names]
    cot = mx.random.normal((T, n, C)).astype(BF)
    mx.eval(cot, module.parameters())

    stepped = mx.compile(bench_cases.vjp_step(forward, names, module))
    rows["fwd+bwd +step (inputs)"] = lambda x: stepped(x, cot, *params)
    rows["copy x * 1.5"] = lambda x: x * 1.5

    with use_backend("kernels"):
        for label, fn in rows.items():
            print(f"  nodes per application, {label}: {_graph_nodes(fn(*sets[0]))}", flush=True)
        times = {label: [] for label in rows}
        for _ in range(rounds):
            for label, fn in rows.items():
                times[label].append(tput(fn, sets))
        print(f"eval anatomy {T}x{n}x{C} bf16, K = {K}: one eval's wall / application, medians of {rounds} "
              "alternated rounds")
        for label, t in times.items():
            print(f"  {label:<28} {statistics.median(t):7.1f} us  ({' '.join(f'{v:.0f}' for v in t)})", flush=True)
        path = "/tmp/eval_anatomy.json"
        record_trace(rows, sets, path)
    events = _kernels(path)
    host = _host_calls(path)
    marks = [(t, d) for t, d, name in events if gpu_profile.MARKER in name]
    print("traced, one eval per row (µs per application; start and tail per eval): GPU start after the "
          "marker, span, tail to the next marker; host CUDA calls between the markers")
    for i, label in enumerate(rows):
        (m0, d0), (m1, _) = marks[2 * i], marks[2 * i + 1]
        ks = [(t, d) for t, d, name in events if m0 + d0 <= t < m1 and gpu_profile.MARKER not in name]
        first, last = min(t for t, _ in ks), max(t + d for t, d in ks)
        print(f"  {label:<28} start {(first - m0 - d0) / 1e3:7.1f} us  span {(last - first) / 1e3 / K:7.1f}  "
              f"tail {(m1 - last) / 1e3:7.1f}  kernels {len(ks)}", flush=True)
        if i in host:
            window, by_name = host[i]
            top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:7]
            print(f"      host {window / 1e3:.1f} us between the markers: "
                  + ", ".join(f"{nm} {len(d)}x {sum(d) / 1e3:.1f}" for nm, d in top))
    os.remove(path)


def encode_cost(K=100, rounds=5, T=64, n=4, C=512):
    """(seventeenth session) the host's cost of encoding one launch into an eval, per kind of
    launch: K independent applications on K inputs of T x n x C bf16 (small: the GPU's share
    is a few µs each), their graph built before the clock; `encode` is the wall time of
    mx.async_eval (MLX encodes every node and commits its CUDA graphs, then returns), `eval` of
    mx.eval, both per application, medians of `rounds` alternated rounds. eval-anatomy found the
    GPU of a one-eval throughput row waiting 26 µs an application for the static layer's
    encoding (its whole eval is one CUDA graph) against 8 for the copy's `x * 1.5`."""
    from mhc_mlx.bench import cases as bench_cases
    from mhc_mlx.dispatch import use_backend
    from mhc_mlx.kernels.build import KernelSpec, launch

    xs = [mx.random.normal((T, n, C)).astype(BF) for _ in range(K)]
    raw = [mx.zeros((n,)), mx.zeros((n,)), 3 * mx.eye(n), mx.ones((C,)), mx.array([1, C, 20], dtype=mx.int32),
           mx.array([1e-5])]
    mx.eval(xs, raw)
    one = KernelSpec(name="mhc_one_line", inputs=("vin",), outputs=("vout",),
                     body="  if (KTID == 0 && KBID == 0) vout[0] = vin[0];\n")
    padded = KernelSpec(name="mhc_one_line_16k", inputs=("vin",), outputs=("vout",),
                        body="  if (KTID == 0 && KBID == 0) vout[0] = vin[0];\n"
                             + ("  // padding: a long kernel text, as a real kernel's\n" * 320))
    seven = one_line_7()
    static = mhc.MHCLayer(n, C)
    mx.eval(static.parameters())
    rows = {
        "x * 1.5 (MLX op)": lambda x: x * 1.5,
        # what a graph node that moves nothing costs to encode (our ops' reshapes, and the
        # StopGradient MLX puts on every output of an mx.custom_function)
        "x * 1.5 after 3 reshapes": lambda x: x.reshape(T, n * C).reshape(T * n, C).reshape(T, n, C) * 1.5,
        "x * 1.5 after 3 stop_gradients": lambda x: mx.stop_gradient(mx.stop_gradient(mx.stop_gradient(x))) * 1.5,
        "one-line kernel, 1 input": lambda x: launch(one, [x], [((1,), BF)], 32, 32, [])[0],
        "one-line kernel, 1 input, +16 KB text": lambda x: launch(padded, [x], [((1,), BF)], 32, 32, [])[0],
        "one-line kernel, 7 inputs": lambda x: launch(seven, [x, *raw], [(x.shape, x.dtype)], 256, 256, [])[0],
        "layer kernel alone": lambda x: layer.forward(x, *raw[:4], 20, 1e-5, True),
        "MHCLayer": static,
    }
    for kind, pass_ in (("dynamic", "fwd"), ("dynamic", "fwd+bwd"), ("static", "fwd+bwd")):
        apply, _ = bench_cases.prepare(bench_cases.Case(kind, pass_, (T, n, C), "bfloat16", "throughput"), 1)
        rows[f"{kind} {pass_} (bench's application)"] = apply
    # the dynamic fwd+bwd as the bench's +step compiles it: does a compiled graph cost more to encode?
    rows["dynamic fwd+bwd, +step"] = bench_cases.prepare(
        bench_cases.Case("dynamic", "fwd+bwd", (T, n, C), "bfloat16", "throughput"), 1, True)[0]

    def timed(fn, hand_over):
        outs = [fn(x) for x in xs]
        mx.synchronize()
        t0 = time.perf_counter()
        hand_over(outs)
        us = 1e6 * (time.perf_counter() - t0) / K
        mx.synchronize()
        return us

    with use_backend("kernels"):
        for fn in rows.values():  # kernels built, caches warm
            mx.eval([fn(x) for x in xs])
        enc = {label: [] for label in rows}
        full = {label: [] for label in rows}
        for _ in range(rounds):
            for label, fn in rows.items():
                enc[label].append(timed(fn, mx.async_eval))
                full[label].append(timed(fn, mx.eval))
        nodes = {label: sum(_graph_nodes(fn(xs[0])).values()) for label, fn in rows.items()}
    print(f"encode cost, {K} independent applications of {T}x{n}x{C} bf16 per eval, medians of {rounds} "
          "alternated rounds, µs per application: async_eval (encode and commit) / eval; graph nodes")
    for label in rows:
        print(f"  {label:<40} encode {statistics.median(enc[label]):7.1f}  eval {statistics.median(full[label]):7.1f}"
              f"  nodes {nodes[label]:3d}", flush=True)


def backward_tile_forms(rounds=5, T=4096, C=4096):
    """(seventeenth session) scripts/backward_tile.py: the one-read dynamic backward's memory side
    (x, g, dh read, each token's n + n^2 row sums exchanged, dx written) at T x 4 x C bf16: today's
    two-kernel traffic (SHARE + FINISH, 25 units of [T, C] bf16) against one persistent cluster
    launch (13 units) at several launch sizes, beside the copy (x * 1.5, 2 n units). Each form
    checked against MLX's ops first; then 10 rotated input sets per timing, alternated `rounds`
    times; each form's rate on its own bytes and as a % of the copy's. kernel-notes: the fused
    form must run at >= ~80 % of the copy's rate, with gs phi^T and the glue still to add, for the
    dynamic fwd+bwd target."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import backward_tile as bt

    n = bt.N
    sets = []
    for _ in range(10):
        x = mx.random.normal((T, n, C)).astype(BF) * (1 + mx.arange(T).reshape(T, 1, 1) % 7)
        sets.append([x, mx.random.normal((T, n, C)).astype(BF), mx.random.normal((T, C)).astype(BF),
                     mx.random.uniform(shape=(T, n)), mx.random.uniform(shape=(T, n, n))])
    mx.eval(sets)
    forms = {"two launches (25 units)": (bt.two, 25)}
    # (name, fused form, S, groups, keyword arguments): the next tile in registers; staged by
    # asynchronous copies two tiles deep in 128-thread threadgroups, several an SM; the same
    # re-reading the stage after the exchange (fewer registers); clusters of 4 (half the peers, a
    # token a tile). Then deeper stages and larger threadgroups, the stage in dynamic shared
    # memory past 40 KB (run in the eighteenth session: each slower, kernel-notes row 92)
    reread = {"reread": True}
    table = [("fused", bt.fused, 8, g, {}) for g in (128, 64, 256)]
    table += [("fused async", bt.fused_async, 8, g, {}) for g in (392, 264, 784)]
    table += [("fused async reread", bt.fused_async, 8, g, reread) for g in (528, 784, 1056)]
    table += [("fused async reread", bt.fused_async, 4, g, reread) for g in (528, 1056)]
    table += [("fused async reread", bt.fused_async, S, g, {**reread, "threads": th, "stages": st})
              for S, th, st, g in ((4, 256, 2, 264), (4, 256, 3, 264), (4, 128, 3, 396), (4, 128, 4, 396),
                                   (8, 256, 2, 264))]
    for name, form, S, groups, kw in table:
        shape = f"{kw['threads']} threads, {kw['stages']} stages, " if "stages" in kw else ""
        forms[f"{name}, clusters of {S}, {shape}{groups} groups (13 units)"] = (
            lambda *a, form=form, S=S, groups=groups, kw=kw: form(*a, S=S, groups=groups, **kw), 13)
    check_forms("backward tile", forms, lambda form: form[0](*sets[0]), bt.reference(*sets[0]), 44)
    unit = T * C * 2
    copy_label = f"copy x * 1.5 ({2 * n} units)"  # x is n units: read and written
    rows = {copy_label: (lambda *a: a[0] * 1.5, 2 * n), **forms}
    times = {label: [] for label in rows}
    for _ in range(rounds):
        for label, (fn, _) in rows.items():
            times[label].append(tput(fn, sets))
    copy_rate = 2 * n * unit / statistics.median(times[copy_label])
    for label, (_, units) in rows.items():
        us = statistics.median(times[label])
        rate = units * unit / us
        print(f"backward tile {T}x{n}x{C} bf16, {label:<44} {us:7.1f} us  {rate / 1e3:6.0f} GB/s  "
              f"{100 * rate / copy_rate:5.1f} % of the copy's rate  ({' '.join(f'{v:.0f}' for v in times[label])})",
              flush=True)


MODES = {
    "backward-tile": backward_tile_forms,
    "encode-cost": encode_cost,
    "encode-cost-paper": lambda: encode_cost(K=50, T=512, C=1280),
    "eval-anatomy": eval_anatomy,
    "eval-anatomy-paper": lambda: eval_anatomy(T=512, C=1280),
    "two-site-draws": two_site_draws,
    "malloc-growth": malloc_growth,
    "wg-time": wg_time,
    "step-trace": step_trace,
    "static-host": static_host,
    "wg-plan": wg_plan_sizes,
    "wgmma-ab": wgmma_ab,
    "wgmma-dphi": wgmma_dphi,
    "wgmma": wgmma,
    "parts": product_parts,
    "vendor-gemm": vendor_gemm,
    "one-pass-split": one_pass_split,
    "tile-reuse": tile_reuse_forms,
    "headers": header_sizes,
    "read-step": read_step,
    "chain": chain,
    "b1": b1_layer,
    "wide-n": wide_n,
    "small-tokens": small_tokens,
    "mma-vjp": mma_vjp,
    "launch": launch_costs,
    "layer-coefficients": layer_coefficient_vjp,
    "glue-threads": glue_threads,
    "glue-packs": glue_packs,
    "glue-split": glue_split,
    "sinkhorn-jacobian": sinkhorn_jacobian,
    "layer-jacobian": layer_jacobian,
    "composite-norm": composite_norm,
    "inline-wide": inline_wide,
    "sinkhorn-forms": sinkhorn_forms,
    "defer-post": defer_post,
    "dx-order": dx_order,
    "load-forms": load_forms,
    "small-forms": small_forms,
    "params": params_residency,
    "b1-split": b1_split,
    "b1-probe": b1_probe,
    "flat-logits": flat_logits,
    "b1-sync": b1_sync,
    "b1-latency": b1_latency,
    "b1-trace": b1_trace,
    "layer-source": layer_source,
    "b1-anatomy": b1_anatomy,
    "b1-host": b1_host,
    "layer-forms": layer_forms,
    "one-launch": one_launch,
}


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode not in MODES:
        main()
    else:
        print("mlx", mx.__version__, mx.default_device())
        if mode == "b1":  # b1 ncu: each variant launched for Nsight Compute to time
            b1_layer(ncu_only=sys.argv[2:] == ["ncu"])
        else:
            MODES[mode]()
