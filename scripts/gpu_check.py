#!/usr/bin/env python3
"""On a GPU machine: every kernel against the reference, then the benchmark; short table last.

    python scripts/gpu_check.py [--no-bench] [--bench-args "..."] [--out DIR]

Checks, on fresh random inputs for each case (odd and aligned C, n = 1..32, float32 /
bfloat16 / float16, per-token and shared coefficients), with every kernel output filled with
NaN before the launch so an element a kernel forgot to write fails the check:
- forward against an independent float64 NumPy statement of the math (tests/kernels/kernels_ref64.py);
- gradients (mx.vjp through the kernels' fused backwards) against the reference path's
  autodiff gradients computed on the CPU in float32 (no TF32), and their shapes.
Tolerances (relative norm error): float32 1e-5, bfloat16/float16 2e-2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))
sys.path.insert(0, os.path.join(ROOT, "src"))

import mlx.core as mx  # noqa: E402

import kernels_ref64 as ref64  # noqa: E402
from mhc_mlx import kernels, reference  # noqa: E402
from mhc_mlx.kernels import (build, coefficients, coefficients_mma, coefficients_mma_vjp, layer,  # noqa: E402
                             one_pass_vjp, sinkhorn, site)

TOL = {mx.float32: 1e-5, mx.bfloat16: 2e-2, mx.float16: 2e-2}
DTYPES = (mx.float32, mx.bfloat16, mx.float16)
NAMES = {mx.float32: "f32", mx.bfloat16: "bf16", mx.float16: "f16"}
rows: list[dict] = []


def np64(a):
    return np.array(a.astype(mx.float32)).astype(np.float64)


def as_tuple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def check(name, shape, dtype, kernel_fn, ref64_fn, ref_fn, args, grad_args, tol=None, floors=None):
    """One case: forward vs float64, gradients (w.r.t. args[i] for i in grad_args) vs reference.

    floors: {position in grad_args: fraction of the largest gradient} for a gradient that is ~0
    by construction (pure rounding noise), measured against that instead of 1 %.
    """
    tol = tol or TOL[dtype]
    row = {"op": name, "shape": shape, "dtype": NAMES[dtype], "tol": tol}
    try:
        out = as_tuple(kernel_fn(*args))
        mx.eval(out)
        want = as_tuple(ref64_fn(*[None if a is None else np64(a) for a in args]))
        row["fwd"] = max(ref64.rel_err(np64(o), w) for o, w in zip(out, want))
        if grad_args:
            cots = [mx.random.normal(o.shape).astype(o.dtype) for o in out]

            def pick(fn, base=args):
                def f(*g):
                    full = list(base)
                    for i, v in zip(grad_args, g):
                        full[i] = v
                    return fn(*full)
                return f

            primals = [args[i] for i in grad_args]
            _, got = mx.vjp(pick(kernel_fn), primals, cots)
            mx.eval(got)
            # The reference in float32 on the same (16-bit valued) inputs: the kernels
            # accumulate in float32, while the reference run in 16 bits rounds every op and
            # carries noise of the order of the tolerance itself (tests/kernels shows 3.6e-2
            # for a bfloat16 layer gradient against float32 math).
            up = [a.astype(mx.float32) if a is not None and a.dtype in (mx.bfloat16, mx.float16) else a
                  for a in args]
            sixteen = dtype in (mx.bfloat16, mx.float16)
            with mx.stream(mx.cpu):
                _, ref = mx.vjp(pick(ref_fn, up), [up[i] for i in grad_args],
                                [c.astype(mx.float32) for c in cots])
                # ... and run in the activation dtype: its own error is the rounding the dtype's
                # semantics carry (e.g. the sublayer output f rounded to 16 bits before it is
                # mixed, which dH_post = sum g f keeps), which the kernel may show up to twice.
                in_dtype = mx.vjp(pick(ref_fn), primals, cots)[1] if sixteen else ref
                mx.eval(ref, in_dtype)
            bound = max(tol, 1e-5 if dtype == mx.float32 else tol)
            errs, bounds = [], []
            # A gradient that is ~0 by symmetry (e.g. RMSNorm's scale invariance at n=1) has no
            # meaningful relative error: measure each against max(its norm, 1% of the largest).
            scale = max(float(np.linalg.norm(np64(r).ravel())) for r in ref)
            for k, (g, r, d, p) in enumerate(zip(got, ref, in_dtype, primals)):
                if tuple(g.shape) != tuple(p.shape):
                    raise AssertionError(f"gradient shape {tuple(g.shape)} != primal shape {tuple(p.shape)}")
                gr, rr = np64(g), np64(r)
                den = max(float(np.linalg.norm(rr.ravel())), (floors or {}).get(k, 1e-2) * scale, 1e-30)
                own = float(np.linalg.norm((np64(d) - rr).ravel())) / den if sixteen else 0.0
                bounds.append(ref64.rounding_bound(bound, own))
                if not np.all(np.isfinite(gr)):
                    errs.append(float("inf"))
                    continue
                errs.append(float(np.linalg.norm((gr - rr).ravel())) / den)
            row["bwd"] = max(errs)
            row["bwd_each"] = errs
            row["bwd_bounds"] = bounds
        row["ok"] = row["fwd"] <= tol and all(e <= b for e, b in zip(row.get("bwd_each", []), row.get("bwd_bounds", [])))
    except Exception as e:  # noqa: BLE001 -- report, keep checking
        row["ok"] = False
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    rows.append(row)
    if not row["ok"]:
        print("FAIL", json.dumps(row), flush=True)


def cases_sinkhorn():
    for n in (1, 3, 4, 8, 16, 32):
        for M, iters, scale in ((1, 20, 1.0), (5, 20, 4.0)) + (((3, 1, 1.0),) if n == 4 else ()):
            L = scale * mx.random.normal((M, n, n))
            check("sinkhorn", (M, n, n, iters), mx.float32,
                  lambda a, it=iters: sinkhorn.sinkhorn_knopp(a, it),
                  lambda a, it=iters: ref64.sinkhorn(a, it),
                  lambda a, it=iters: reference.sinkhorn_knopp(a, it), [L], [0])


    # Logits spread far beyond float32's exp range: forward and gradient must stay finite
    # (the P-space backward overflowed into NaN here; the kernel carries d(log P) instead).
    for n in (2, 4, 8, 32):
        L = 30.0 * mx.random.normal((64, n, n))
        L[:, 0, :] = L[:, 0, :] - 200.0
        L = mx.concatenate([L, 1e4 * mx.random.normal((16, n, n))])
        row = {"op": "sinkhorn/extreme-finite", "shape": (80, n, n, 20), "dtype": "f32", "tol": 0.0}
        out, g = mx.vjp(lambda a: sinkhorn.sinkhorn_knopp(a, 20), [L], [mx.random.normal(L.shape)])
        mx.eval(out, g)
        row["fwd"] = 0.0 if bool(mx.all(mx.isfinite(out[0]))) else float("inf")
        row["bwd"] = 0.0 if bool(mx.all(mx.isfinite(g[0]))) else float("inf")
        row["ok"] = row["fwd"] == 0.0 and row["bwd"] == 0.0
        rows.append(row)
        if not row["ok"]:
            print("FAIL", json.dumps(row), flush=True)


def cases_coefficients():
    for n in (1, 3, 4, 8, 32):
        bias = mx.random.normal((2 * n + n * n,))
        x = mx.random.normal((2, n, 5))
        check("coeff_static", (n,), mx.float32,
              lambda x_, b: coefficients.mhc_coefficients(x_, None, None, b, 20, 1e-6),
              lambda x_, b: ref64.coefficients(x_, None, None, b, 20, 1e-6),
              lambda x_, b: reference.mhc_coefficients(x_, None, None, b, 20, 1e-6), [x, bias], [1])
    # Each form the dispatcher can take: the fused kernel, and for 16-bit x on CUDA the
    # tensor-core path (forced here at every size; by default it starts at MMA_MIN_ELEMENTS).
    forms = [FORCED_FORM] if FORCED_FORM else ["kernel", "mma"]
    saved = coefficients.DYNAMIC_FORM, coefficients.MMA_MIN_ELEMENTS
    coefficients.MMA_MIN_ELEMENTS = 0
    for dt in DTYPES:
        for form in forms:
            if form in ("mma", "gemm") and dt == mx.float32:
                continue  # float32 x always takes the fused kernel
            if form == "mma" and build.gpu_backend() != "cuda":
                continue
            coefficients.DYNAMIC_FORM = form
            # n > 8: the wide-n path (coefficients.WIDE_N gates only the dispatch to it), once per dtype
            wide = ((9, 65, 9), (16, 33, 5), (32, 20, 3)) if form == forms[0] else ()
            for n, C, T in ((1, 33, 3), (2, 64, 17), (4, 257, 40), (4, 512, 33), (8, 65, 9), (8, 128, 20),
                            (4, 4096, 70), (4, 1280, 600), (4, 512, 1), *wide):
                W = 2 * n + n * n
                x = mx.random.normal((T, n, C)).astype(dt)
                phi = (mx.random.normal((n * C, W)) / np.sqrt(n * C)).astype(mx.float32)
                alpha = mx.random.uniform(0.2, 1.5, (3,))
                bias = mx.random.normal((W,))
                check(f"coeff_dynamic/{form}", (T, n, C), dt,
                      lambda *a: coefficients.mhc_coefficients(*a, 20, 1e-6),
                      lambda *a: ref64.coefficients(*a, 20, 1e-6),
                      lambda *a: reference.mhc_coefficients(*a, 20, 1e-6),
                      [x, phi, alpha, bias], [0, 1, 2, 3])
    coefficients.DYNAMIC_FORM, coefficients.MMA_MIN_ELEMENTS = saved


def cases_read_step():
    # The dynamic site's fused read step (kernels/pre_step.py, taken by size under
    # kernels.FUSED_READ_STEP), checked directly whatever that flag says: read step, a sublayer
    # with a gradient (f = h * w), post; gradients for x, phi, alpha, bias.
    from mhc_mlx.kernels import pre_step

    for dt in DTYPES:
        # up to 70x4x4096 the forward is one launch (coefficients.DYNAMIC_PRE); 300x4x4096 takes
        # the tensor-core form for 16-bit x (two launches)
        for n, C, T in ((1, 33, 3), (2, 64, 17), (4, 257, 40), (4, 4096, 70), (8, 65, 9), (4, 4096, 300),
                        (4, 512, 1)):
            W = 2 * n + n * n
            x = mx.random.normal((T, n, C)).astype(dt)
            phi = (mx.random.normal((n * C, W)) / np.sqrt(n * C)).astype(mx.float32)
            alpha, bias = mx.random.uniform(0.2, 1.5, (3,)), mx.random.normal((W,))
            fw = mx.random.normal((C,))

            def kernel_site(x_, phi_, alpha_, bias_, fw=fw):
                h, _, H_post, H_res = pre_step.mhc_pre_step(x_, phi_, alpha_, bias_, 20, 1e-6)
                return site.mhc_post(x_, (h.astype(mx.float32) * fw).astype(x_.dtype), H_post, H_res)

            def ref64_site(x_, phi_, alpha_, bias_, fw=np64(fw)):
                H_pre, H_post, H_res = ref64.coefficients(x_, phi_, alpha_, bias_, 20, 1e-6)
                return ref64.post(x_, ref64.pre(x_, H_pre) * fw, H_post, H_res)

            def ref_site(x_, phi_, alpha_, bias_, fw=fw):
                H_pre, H_post, H_res = reference.mhc_coefficients(x_, phi_, alpha_, bias_, 20, 1e-6)
                h = reference.mhc_pre(x_, H_pre)
                return reference.mhc_post(x_, (h.astype(mx.float32) * fw).astype(x_.dtype), H_post, H_res)

            check("read_step+post", (T, n, C), dt, kernel_site, ref64_site, ref_site,
                  [x, phi, alpha, bias], [0, 1, 2, 3])


def cases_chain():
    # The chained x cotangent (kernels/site.py "chained", kernels.CHAIN_X_COTANGENT: by default
    # only where the coefficient backward takes tensor cores), switched on here at every size: whole HyperConnection
    # sites through the dispatcher (static, dynamic as two ops, dynamic with the fused read step),
    # a sublayer with a gradient (f = h * w); gradients for x and the site's parameters.
    import mhc_mlx as mhc

    saved = kernels.CHAIN_X_COTANGENT, kernels.FUSED_READ_STEP
    try:
        kernels.CHAIN_X_COTANGENT = True
        for dt in DTYPES:
            for form in ("static", "dynamic", "read step"):
                for n, C, T in ((1, 33, 3), (4, 257, 40), (4, 4096, 70), (8, 65, 9), (4, 4096, 300)):
                    kernels.FUSED_READ_STEP = form == "read step"
                    dynamic = form != "static"
                    W = 2 * n + n * n
                    hc = mhc.HyperConnection(C, n, dynamic=dynamic, init="paper")
                    x = mx.random.normal((T, n, C)).astype(dt)
                    bias = mx.random.normal((W,))
                    fw = mx.random.normal((C,))
                    if dynamic:
                        phi = (mx.random.normal((n * C, W)) / np.sqrt(n * C)).astype(mx.float32)
                        alpha = mx.random.uniform(0.2, 1.5, (3,))
                    else:
                        phi = alpha = None

                    def kernel_site(x_, phi_, alpha_, bias_, hc=hc, fw=fw, dynamic=dynamic, read=form == "read step"):
                        kernels.FUSED_READ_STEP = read
                        hc.update({"bias": bias_, **({"phi": phi_, "alpha": alpha_} if dynamic else {})})
                        h, coeffs = hc.pre(x_)
                        return hc.post(x_, (h.astype(mx.float32) * fw).astype(x_.dtype), coeffs)

                    def ref64_site(x_, phi_, alpha_, bias_, fw=np64(fw)):
                        H_pre, H_post, H_res = ref64.coefficients(x_, phi_, alpha_, bias_, 20, 1e-6)  # phi None: static
                        return ref64.post(x_, ref64.pre(x_, H_pre) * fw, H_post, H_res)

                    def ref_site(x_, phi_, alpha_, bias_, fw=fw):
                        H_pre, H_post, H_res = reference.mhc_coefficients(x_, phi_, alpha_, bias_, 20, 1e-6)
                        h = reference.mhc_pre(x_, H_pre)
                        return reference.mhc_post(x_, (h.astype(mx.float32) * fw).astype(x_.dtype), H_post, H_res)

                    check(f"chain/{form}+post", (T, n, C), dt, kernel_site, ref64_site, ref_site,
                          [x, phi, alpha, bias], [0, 1, 2, 3] if dynamic else [0, 3])
    finally:
        kernels.CHAIN_X_COTANGENT, kernels.FUSED_READ_STEP = saved


SITE_N: set[int] = set()
FORCED_FORM = ""


def cases_site():
    for dt in DTYPES:
        for n, C, lead in ((1, 33, (3,)), (2, 64, (2, 3)), (3, 1, (4,)), (4, 512, (5,)), (4, 1031, (2,)),
                           (8, 256, (3,)), (16, 40, (2,)), (32, 33, (1,))):
            if SITE_N and n not in SITE_N:
                continue
            x = mx.random.normal((*lead, n, C)).astype(dt)
            f = mx.random.normal((*lead, C)).astype(dt)
            for shared in (True, False):
                clead = () if shared else lead
                hpre = mx.random.uniform(0, 1, (*clead, n))
                hpost = mx.random.uniform(0, 2, (*clead, n))
                hres = mx.random.uniform(0, 1, (*clead, n, n))
                tag = "shared" if shared else "per-token"
                check(f"pre/{tag}", (*lead, n, C), dt, site.mhc_pre, ref64.pre, reference.mhc_pre,
                      [x, hpre], [0, 1])
                check(f"post/{tag}", (*lead, n, C), dt, site.mhc_post, ref64.post, reference.mhc_post,
                      [x, f, hpost, hres], [0, 1, 2, 3])


def cases_layer():
    for dt in DTYPES:
        # T = 600: more tokens than the forward's and backward's threadgroups (layer.MAX_GROUPS,
        # VJP_MAX_GROUPS = 528), so groups loop over tokens as at the bench's sizes
        for n, C, T in ((1, 33, 2), (4, 512, 1), (4, 4096, 3), (8, 1000, 5), (32, 64, 3), (16, 1000, 2), (4, 256, 600)):
            x = mx.random.normal((T, n, C)).astype(dt)
            pre, post = mx.random.normal((n,)), mx.random.normal((n,))
            res, w = 2 * mx.random.normal((n, n)), mx.random.uniform(0.5, 1.5, (C,))
            # n = 1: RMSNorm is scale-invariant up to its eps, so dH_pre is ~0 and pure rounding
            # noise (16 bits: up to 1.5e-3 of the largest gradient over 40 seeds on the CPU
            # emulator; float32: 1.1e-7 and 1.5e-7 of it in one H200 run, above 1e-5 of 1 %);
            # measured against 10 % of the largest. A wrong formula errs by about the largest.
            floors = {1: 0.1} if n == 1 else None
            for inline in (True, False):
                check(f"layer/{'inline' if inline else 'two-kernel'}", (T, n, C), dt,
                      lambda *a, i=inline: layer.mhc_layer(*a, 20, 1e-5, inline=i),
                      lambda *a: ref64.layer(*a, 20, 1e-5),
                      lambda *a: reference.mhc_layer(*a, 20, 1e-5),
                      [x, pre, post, res, w], [0, 1, 2, 3, 4], floors=floors)



# Switches for every check: flag -> (module, attribute, value set, help)
SWITCHES = {
    "--mma-vjp": (coefficients, "MMA_VJP", True,
                  "the tensor-core backward of the dynamic coefficients (16-bit x, n <= 4) at every size "
                  "(coefficients.MMA_VJP = True; by default from MMA_MIN_ELEMENTS elements of x)"),
    "--no-layer-inline": (layer, "INLINE_ALWAYS", False,
                          "the static layer's two-launch form above LATENCY_TOKENS (a coefficient kernel, then "
                          "the layer kernel) instead of its single launch (layer.INLINE_ALWAYS = False)"),
    "--layer-candidates": (layer, "INLINE_ALWAYS", True,
                           "the static layer's single launch at every token count (layer.INLINE_ALWAYS; the "
                           "default since the fifteenth session of 2026-11-30, kept for the older session stages)"),
    "--layer-coefficient-ops": (layer, "FUSED_COEFFICIENT_VJP", False,
                                "the layer backward's coefficient gradients as MLX ops instead of one launch "
                                "(layer.FUSED_COEFFICIENT_VJP = False)"),
    "--fused-read-step": (kernels, "FUSED_READ_STEP", True,
                          "the fused read step of dynamic sites at every size (kernels.FUSED_READ_STEP = True; "
                          "by default only where its forward is one launch)"),
    "--vjp-glue-ops": (coefficients, "FUSED_VJP_GLUE", False,
                       "the dynamic backward's per-token steps as MLX ops instead of one launch "
                       "(coefficients.FUSED_VJP_GLUE = False)"),
    "--chain": (kernels, "CHAIN_X_COTANGENT", True,
                "the chained x cotangent of HyperConnection sites at every size (kernels.CHAIN_X_COTANGENT = True; "
                "by default where the coefficient backward takes tensor cores)"),
    "--wgmma": (coefficients_mma, "WGMMA", True,
                "the tensor-core forward partials by warpgroup MMA (coefficients_mma.WGMMA; bf16, n = 4, Hopper; "
                "the default since the fourteenth session of 2026-11-30, kept for the stages that name it)"),
    "--dphi-wgmma": (coefficients_mma_vjp, "DPHI_WGMMA", True,
                     "dphi by warpgroup MMA (coefficients_mma_vjp.DPHI_WGMMA; bf16, n = 4, Hopper; the default "
                     "since the fourteenth session of 2026-11-30, kept for the stages that name it)"),
    "--no-wgmma": (coefficients_mma, "WGMMA", False,
                   "the mma.sync forward partials on Hopper too (coefficients_mma.WGMMA = False)"),
    "--no-dphi-wgmma": (coefficients_mma_vjp, "DPHI_WGMMA", False,
                        "DPHI (mma.sync) on Hopper too (coefficients_mma_vjp.DPHI_WGMMA = False)"),
    "--glue-packs": (coefficients, "GLUE_PACKS", True,
                     "the candidate glue kernel that also writes gs in the tensor-core backward's fragment orders "
                     "(coefficients.GLUE_PACKS)"),
    "--one-kernel-glue": (coefficients, "SPLIT_GLUE_SINKHORN", False,
                          "the dynamic backward's glue as one kernel, the one-thread Sinkhorn backward inside "
                          "(coefficients.SPLIT_GLUE_SINKHORN = False; by default that Sinkhorn backward runs on "
                          "n lanes per token in a launch of its own)"),
    "--layer-composite-wide": (layer, "INLINE_MAX_N", layer.MAX_N_FUSED,
                               "the layer above MAX_N_FUSED always composed from the kernel ops (layer.INLINE_MAX_N = "
                               "MAX_N_FUSED; by default one launch up to n = 32 at T <= LATENCY_TOKENS)"),
    "--layer-inline-kernel": (layer, "LATENCY_KERNEL", False,
                              "the static layer's single launch at T <= LATENCY_TOKENS by LAYER's inline form "
                              "(layer.LATENCY_KERNEL = False; by default LAYER_LATENCY)"),
    "--eager-latency": (build, "COMPILE_LATENCY", False,
                        "the latency paths eager (build.COMPILE_LATENCY = False; by default the static layer's "
                        "single launch, the dynamic read step and post run under mx.compile up to "
                        "LATENCY_COMPILE_TOKENS tokens)"),
    "--layer-replay": (layer, "COEFFICIENTS_JACOBIAN", False,
                       "the static layer coefficient backward's Sinkhorn backward as the one-thread replay "
                       "(layer.COEFFICIENTS_JACOBIAN = False; by default n^2 lanes of forward mode)"),
    "--sinkhorn-replay": (coefficients, "SINKHORN_JACOBIAN", False,
                          "the split-off Sinkhorn backward replaying the forward on n lanes per token "
                          "(coefficients.SINKHORN_JACOBIAN = False; by default its Jacobian, from the forward's "
                          "logits, transposed onto the cotangent)"),
    "--no-defer-post-x": (kernels, "DEFER_POST_X", False,
                          "post's backward reads x and writes x's cotangent itself (kernels.DEFER_POST_X = False; "
                          "by default, in the chained forms whose pre is its own op, it leaves both to pre's)"),
    "--dx-k-major": (coefficients_mma_vjp, "DX_TOKEN_MAJOR", False,
                     "the tensor-core DX kernel's warps k group first (coefficients_mma_vjp.DX_TOKEN_MAJOR = "
                     "False; by default token group first)"),
    "--dx-row-by-row": (coefficients_mma_vjp, "DX_RAW_ROWS", False,
                        "the tensor-core DX loads each row's gacc after storing the row before "
                        "(coefficients_mma_vjp.DX_RAW_ROWS = False; by default every row's x and gacc together)"),
    "--sinkhorn-thread-vjp": (sinkhorn, "JACOBIAN_VJP", False,
                              "the Sinkhorn op's backward as one thread per matrix where that form applies "
                              "(sinkhorn.JACOBIAN_VJP = False; by default n^2 lanes of forward mode per matrix)"),
    "--one-launch-small": (coefficients, "ONE_LAUNCH_SMALL", True,
                           "the few-token dynamic forward and read step in one launch (coefficients.ONE_LAUNCH_SMALL, "
                           "DYNAMIC_ONE; the default since the seventeenth session, kept for the stages that name it)"),
    "--split-small": (coefficients, "ONE_LAUNCH_SMALL", False,
                      "the few-token dynamic forward and read step in the split form's two launches "
                      "(coefficients.ONE_LAUNCH_SMALL = False; by default one launch where n <= 4 and n C <= 4096)"),
    "--one-pass-vjp": (kernels, "ONE_PASS_VJP", True,
                       "the dynamic backward from pre's backward to x's cotangent in one pass over x, in the deferred "
                       "chain where the coefficient backward takes tensor cores (kernels.ONE_PASS_VJP, candidate; "
                       "with --mma-vjp at every chain size with 16-bit x, n <= 4 and C a multiple of 64)"),
    "--one-pass-split": (one_pass_vjp, "FORM", "split",
                         "the one pass (with --one-pass-vjp) with dx by its FP32 DX (one_pass_vjp.FORM \"split\"; by "
                         "default \"mma\", the tensor-core DX adding pre's and post's shares)"),
    "--device-params": (build, "DEVICE_PARAMS", True,
                        "the kernels' run-time parameter arrays padded and copied into GPU memory once "
                        "(build.DEVICE_PARAMS; the default on CUDA since the eighteenth session, kept for the "
                        "stages that name it)"),
    "--host-params": (build, "DEVICE_PARAMS", False,
                      "the kernels' run-time parameter arrays made on the host, which MLX keeps in managed "
                      "memory (build.DEVICE_PARAMS = False; by default on CUDA copied into GPU memory once)"),
    "--sinkhorn-warp-vjp": (sinkhorn, "THREAD_VJP_MAX_WORK", 0,
                            "use the warp-form Sinkhorn backward everywhere (sinkhorn.THREAD_VJP_MAX_WORK = 0; "
                            "the default takes one thread per matrix for n <= 4)"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--only", default="", help="comma list of: sinkhorn,coefficients,site,layer,read_step,chain")
    ap.add_argument("--bench-args", default="", help="extra arguments for `mhc-mlx bench`")
    ap.add_argument("--site-n", default="", help="comma list of n: only these site cases")
    ap.add_argument("--dtypes", default="", help="comma list of f32,bf16,f16 (default all)")
    ap.add_argument("--dynamic-form", choices=coefficients.DYNAMIC_FORMS, default="",
                    help="check only this form of the dynamic coefficients (default: kernel and mma)")
    ap.add_argument("--mma-x-unroll", type=int, choices=(1, 2, 4), default=None,
                    help="16-byte x loads per row and lane in a step of the tensor-core coefficients "
                         "kernel (coefficients_mma.X_UNROLL: 1, 2 or 4) for every check")
    for flag, (_, _, _, help_) in SWITCHES.items():
        ap.add_argument(flag, action="store_true", help=help_ + " for every check")
    ap.add_argument("--small-tokens", type=int, default=None,
                    help="the dynamic coefficients' one-threadgroup-per-token kernels up to this many tokens "
                         "(coefficients.SMALL_TOKENS; default 16, 0 = off) for every check")
    ap.add_argument("--glue-threads", type=int, default=None,
                    help="threads per group of the dynamic backward's glue kernel (coefficients.GLUE_THREADS; "
                         "a multiple of 32) for every check")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    args = ap.parse_args(argv)
    for flag, (module, attribute, value, _) in SWITCHES.items():
        if getattr(args, flag[2:].replace("-", "_")):
            setattr(module, attribute, value)
    if args.small_tokens is not None:
        coefficients.SMALL_TOKENS = args.small_tokens
    if args.glue_threads is not None:
        if args.glue_threads <= 0 or args.glue_threads % 32 or args.glue_threads > 1024:
            ap.error(f"--glue-threads must be a multiple of 32 from 32 to 1024, got {args.glue_threads}")
        coefficients.GLUE_THREADS = args.glue_threads
    if args.mma_x_unroll:
        coefficients_mma.X_UNROLL = args.mma_x_unroll
    global FORCED_FORM
    FORCED_FORM = args.dynamic_form
    os.makedirs(args.out, exist_ok=True)
    SITE_N.update(int(v) for v in args.site_n.split(",") if v)
    if args.dtypes:
        global DTYPES
        by_name = {v: k for k, v in NAMES.items()}
        DTYPES = tuple(by_name[d] for d in args.dtypes.split(",") if d)
    backend = build.gpu_backend()
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mlx": mx.__version__, "backend": backend, "platform": platform.platform(),
        "kernel_settings": kernels.settings(),
    }
    print(json.dumps(header), flush=True)
    if backend is None:
        print("no GPU backend in this MLX: nothing to check here")
        return 2
    build.poison_outputs(float("nan"))
    mx.random.seed(int(time.time()) % 100000)
    start = time.time()
    groups = {"sinkhorn": cases_sinkhorn, "coefficients": cases_coefficients, "site": cases_site,
              "layer": cases_layer, "read_step": cases_read_step, "chain": cases_chain}
    wanted = [g for g in args.only.split(",") if g] or list(groups)
    for g in wanted:
        t0 = time.time()
        groups[g]()
        print(f"checked {g} in {time.time() - t0:.1f} s", flush=True)
        # Written after each group (a run cut short by a time limit keeps what it checked) and
        # marked complete after the last.
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump({"header": header, "rows": rows, "complete": g == wanted[-1]}, f, indent=1)
    build.poison_outputs(None)
    failed = [r for r in rows if not r["ok"]]
    bench_status = 0
    if not args.no_bench:
        from mhc_mlx.cli import bench

        bench_status = bench.main(["--out", args.out, *shlex.split(args.bench_args)])
    # Short table last.
    print(f"\n== kernel checks: {len(rows) - len(failed)}/{len(rows)} passed in {time.time() - start:.0f} s ==")
    worst: dict[tuple, dict] = {}
    for r in rows:
        k = (r["op"], r["dtype"])
        if k not in worst or (r.get("fwd", 9), r.get("bwd", 0)) > (worst[k].get("fwd", 9), worst[k].get("bwd", 0)):
            worst[k] = r
    for (op, dt), r in sorted(worst.items()):
        status = "ok  " if all(x["ok"] for x in rows if (x["op"], x["dtype"]) == (op, dt)) else "FAIL"
        print(f"{status} {op:<22} {dt:<5} worst fwd {r.get('fwd', float('nan')):.1e}  bwd {r.get('bwd', float('nan')):.1e}"
              f"  tol {r['tol']:.0e} {r.get('error', '')[:60]}")
    return 1 if failed or bench_status else 0


if __name__ == "__main__":
    sys.exit(main())
