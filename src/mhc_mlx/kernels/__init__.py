"""Fused CUDA / Metal kernels (one source per op, shared through a macro layer).

The dispatcher asks `kernel_for(op, ...)` for a kernel that can run the given arrays on the
current device; None means "use the compiled path", and `why_not(op)` says why.

Choice per backend and shape:
- CPU-only MLX: never (the compiled path is the CPU's fast path).
- CUDA: every op whose shape the kernels cover (n <= 32; dynamic coefficients n <= 8).
- Metal: the same, once that op's kernel has matched the reference on this machine
  (safety.py); MHC_MLX_DISABLE_METAL=1 turns Metal kernels off.
- mhc_layer picks its form by size: up to LATENCY_TOKENS tokens one launch computes the
  coefficients inside the kernel (latency: layer.LAYER_LATENCY); above, a one-warp kernel
  computes them once and the layer kernel reads them (throughput). MHCLayer's dispatch_policy
  forces either.
- A few tokens (build.LATENCY_COMPILE_TOKENS) on a GPU: the latency paths (the layer's single
  launch, the dynamic read step, post, and HyperConnection's dispatch around them) run under
  mx.compile, so a call replays its launches instead of running this package's Python.
- rms_norm stays on mx.fast.rms_norm: MLX's own kernel is already one fused pass.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx

from . import safety
from .build import gpu_backend, metal_disabled, on_gpu, watch

OPS = ("sinkhorn_knopp", "mhc_coefficients", "mhc_pre", "mhc_post", "rms_norm", "mhc_layer")
ACTIVATIONS = (mx.float32, mx.bfloat16, mx.float16)
MAX_N = 32
MAX_N_DYNAMIC = 8
# A dynamic site's read step (coefficients + pre) as one custom function (pre_step.py) whose
# forward is one launch where the coefficients take the kernel form on CUDA and whose backward
# writes x's cotangent once. "auto" (default): only where the forward is that one launch; True:
# wherever the kernels run both ops; False: never. H200 (2026-11-30, scripts/gpu_experiments.py
# read-step / chain, medians of 5 alternated runs, bf16, read step against two ops): forward
# B = 1 298.0 / 333.0 µs, 512x4x1280 81.0 / 91.8, 4096x4x4096 (tensor-core form: two launches
# either way) 252.2 / 257.5; forward+backward B = 1 693.2 / 705.6 and 886.2 / 1018.1,
# 512x4x1280 361.2 / 357.4 and 390.5 / 405.0, 4096x4x4096 1200.9 / 1178.0 (slower there).
FUSED_READ_STEP: bool | str = "auto"
# The chained forms (site.py, "chained"): in a HyperConnection on CUDA each kernel op passes its
# x through to the site's next op, so x's cotangent is written once, by the first op's backward
# kernel (the tensor-core DX kernel adds it in its one pass), instead of being summed by MLX adds
# of [T, n, C] arrays (two at a dynamic site: 2 x 12 C bytes per token at n = 4 in bfloat16).
# "auto" (default): at dynamic sites whose coefficient backward takes the tensor-core form
# (coefficients.backward_on_tensor_cores); True: at every mHC site the kernels run; False: never.
# H200 (2026-11-30, scripts/gpu_experiments.py chain, medians of 5 alternated runs, bf16, dynamic
# fwd+bwd, chained against not): 4096x4x4096 825.4 / 932.4 µs, 512x4x1280 236.8 / 205.9 (slower:
# the FP32 backward there), B = 1 553.3 / 568.5 (within the runs' spread).
CHAIN_X_COTANGENT: bool | str = "auto"
# In the chained forms whose pre is its own op (n <= 8), post's backward leaves x's and H_res's
# cotangents to pre's (site.PRE_VJP_RES), so it no longer reads x nor writes x's cotangent: 16C
# fewer bytes per token at n = 4 (bf16) of the 122C the dynamic site's fwd+bwd kernels moved (post's
# backward took 158.1 µs of the 4096x4x4096 site's 856 in the H200 stream timeline,
# scripts/gpu_timeline.py). H200 (2026-11-30, third session; scripts/gpu_check.py's chain checks
# passed with it, static and dynamic, n = 1, 4, 8, every dtype): dynamic fwd+bwd 4096x4x4096 bf16
# 829.5 against 878.9 µs (gpu_experiments.py defer-post, medians of 5 alternated runs) and, by
# `mhc-mlx bench` in two processes back to back, 762.0 against 843.4 (512x4x1280: 199.7 against
# 217.5). False: post's backward reads x and writes x's cotangent itself.
DEFER_POST_X = True
# Candidate (not among use_candidates'): in the deferred chain at dynamic sites whose backward
# takes tensor cores (16-bit x, n <= 4, C a multiple of 64), the read as one custom function
# whose backward runs pre's backward, the glue and DX reading x less often (one_pass_vjp.py, in
# its FORM), then dphi. H200 (docs/kernel-notes.md rows 64-68): every form slower; with its
# fastest ("mma") the dynamic fwd+bwd at 4096 x 4 x 4096 took 800 µs against 660-664 without.
ONE_PASS_VJP = False


_IMPLEMENTATIONS: dict = {}


def _implementation(op: str):
    if not _IMPLEMENTATIONS:  # imported on first use: importing mhc_mlx builds no kernel
        from . import coefficients, layer, sinkhorn, site

        _IMPLEMENTATIONS.update({
            "sinkhorn_knopp": sinkhorn.sinkhorn_knopp,
            "mhc_coefficients": coefficients.mhc_coefficients,
            "mhc_pre": site.mhc_pre,
            "mhc_post": site.mhc_post,
            "mhc_layer": layer.mhc_layer,
        })
    return _IMPLEMENTATIONS.get(op)


def _backend_reason(op: str) -> str | None:
    """Why no kernel runs `op` on this machine at all, or None."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    if op == "rms_norm":
        return "MLX's mx.fast.rms_norm is already a single fused kernel (used by the compiled path)"
    backend = gpu_backend()
    if backend is None:
        return "this MLX has no GPU backend (CPU only): the compiled path is the fast path here"
    if backend == "metal" and metal_disabled():
        return "Metal kernels are turned off by MHC_MLX_DISABLE_METAL=1"
    if backend == "metal":
        state = safety.result(op)
        if state is not None and state != "ok":
            return f"the Metal kernel {state} at first use; compiled path for this process"
    return None


def _shape_reason(op: str, arrays, params) -> str | None:
    """Why the kernels do not cover these particular arrays, or None."""
    if not arrays:
        return None
    x = arrays[0]
    if x.dtype not in ACTIVATIONS:
        return f"dtype {x.dtype} is not float32/bfloat16/float16"
    n = x.shape[-1] if op == "sinkhorn_knopp" else x.shape[-2]
    if n > MAX_N:
        return f"n={n} streams is above the kernels' limit of {MAX_N}"
    if op == "mhc_coefficients" and len(arrays) > 1 and arrays[1] is not None and n > MAX_N_DYNAMIC:
        from . import coefficients

        if not coefficients.WIDE_N:
            return f"dynamic coefficients with n={n} > {MAX_N_DYNAMIC}: the GEMM has too many columns for the fused kernel"
    for a in arrays:
        if a is not None and a.dtype not in ACTIVATIONS:
            return f"an input has dtype {a.dtype}"
    return None


def kernel_for(op: str, *arrays, **params):
    """A callable with the op's signature, or None when no kernel can run these arrays here."""
    if _backend_reason(op) is not None or not on_gpu():
        return None
    if _shape_reason(op, arrays, params) is not None:
        return None
    impl = _implementation(op)
    if gpu_backend() == "metal" and not safety.verified(op, impl):
        return None
    if op == "mhc_layer":
        impl = partial(impl, inline=_layer_inline(params.get("policy", "auto")),
                       threads=params.get("threads_per_group"))
    return impl


def _layer_inline(policy: str):
    """mhc_layer's inline argument for MHCLayer's dispatch_policy (None: by token count)."""
    return {"latency": True, "throughput": False}.get(policy)


def resolve_layer(x, iters: int, eps: float, threads_per_group=None, policy: str = "auto"):
    """mhc_layer's kernel form for x (kernel_for said a kernel runs it), as a function of the
    five arrays with every decision made (layer.resolve)."""
    from . import layer

    return layer.resolve(x, iters, eps, inline=_layer_inline(policy), threads=threads_per_group)


def why_not(op: str, *arrays, **params) -> str:
    """Why `op` (on these arrays, if given) takes the compiled path; '' when kernels run it."""
    reason = _backend_reason(op)
    if reason is None and not on_gpu():
        reason = "the default device is the CPU"
    if reason is None:
        reason = _shape_reason(op, arrays, params)
    return reason or ""


def check_metal_kernels() -> dict:
    """Run every op's Metal first-use check now, eagerly: call it before compiling a step that
    uses the ops, since no check can run while mx.compile traces (an op whose check has not run
    takes the compiled path inside a trace). Returns op -> "ok" / "failed: ..."; {} where
    Metal kernels are not in use (CPU, CUDA, MHC_MLX_DISABLE_METAL=1, or the CPU default device)."""
    if gpu_backend() != "metal" or metal_disabled() or not on_gpu():
        return {}
    for op in OPS:
        if op != "rms_norm":
            safety.verified(op, _implementation(op))
    return {op: safety.result(op) for op in OPS if safety.result(op) is not None}


def status() -> dict:
    """What `mhc-mlx info` prints about kernels: op -> availability and reason."""
    out = {}
    for op in OPS:
        reason = why_not(op)
        entry = {"available": not reason, "reason": reason or f"fused {gpu_backend()} kernel"}
        if gpu_backend() == "metal" and safety.result(op):
            entry["metal_check"] = safety.result(op)
        out[op] = entry
    return out


def _setting_value(text: str, current):
    """1/0/true/false/on/off, auto or an integer; any other word for a setting that is a word
    (one_pass_vjp.FORM)."""
    low = text.strip().lower()
    if low in ("1", "true", "on"):
        return True
    if low in ("0", "false", "off"):
        return False
    if low == "auto":
        return "auto"
    try:
        return int(low)
    except ValueError:
        if isinstance(current, str) and low:
            return text.strip()
        raise ValueError(f"kernel setting value {text!r} is not 1/0/true/false/on/off/auto or an integer") from None


def assign_settings(items) -> None:
    """Assign kernel settings given as 'module.ATTRIBUTE=value' (module under mhc_mlx.kernels,
    'kernels' for this package): value 1/0/true/false/on/off, auto, an integer, or a word for a
    setting that is a word. For side-by-side runs of candidates (scripts/bench_with.py, the
    tests' MHC_TEST_KERNEL_SETTINGS). Every item is checked before any is assigned; a bad one
    raises ValueError naming it."""
    import importlib

    planned = []
    for item in items:
        target, sep, text = item.partition("=")
        module_name, _, attribute = target.strip().rpartition(".")
        if not sep or not module_name or not attribute:
            raise ValueError(f"expected module.ATTRIBUTE=value, got {item!r}")
        name = __name__ if module_name == "kernels" else f"{__name__}.{module_name}"
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise ValueError(f"{item!r}: no kernel module {name}") from None
        if not attribute.isupper() or not hasattr(module, attribute):
            raise ValueError(f"{item!r}: {name} has no setting {attribute}")
        planned.append((module, attribute, _setting_value(text, getattr(module, attribute))))
    for module, attribute, value in planned:
        setattr(module, attribute, value)


def use_candidates(on: bool = True) -> None:
    """Switch this process's kernel candidates on or off (`mhc-mlx bench --candidates`): the
    tensor-core coefficient backward, the fused read step and the chained x cotangent at every
    size (by default each only where it was faster), which passed scripts/gpu_check.py on the
    H200 but were slower there than the defaults; the glue kernel writing the tensor-core
    backward's fragments of gs (within the runs' spread). Off: the shipped defaults. (The kernels'
    parameter arrays in GPU memory, build.DEVICE_PARAMS, a candidate until the eighteenth
    session, are a default since and not switched here.)"""
    import sys

    from . import coefficients

    this = sys.modules[__name__]  # assigned as attributes, so the settings epoch sees them
    this.FUSED_READ_STEP = True if on else "auto"
    this.CHAIN_X_COTANGENT = True if on else "auto"
    coefficients.MMA_VJP = True if on else "auto"
    coefficients.GLUE_PACKS = on


def settings() -> dict:
    """The kernels' tunable forms in this process (docs/kernel-notes.md; benches record them)."""
    from . import build, coefficients, coefficients_mma, coefficients_mma_vjp, layer, one_pass_vjp, sinkhorn

    return {"dynamic_form": coefficients.DYNAMIC_FORM,
            "mma_min_elements": coefficients.MMA_MIN_ELEMENTS,
            "mma_x_unroll": coefficients_mma.X_UNROLL,
            "mma_target_warps": coefficients_mma.TARGET_WARPS,
            "dphi_target_warps": coefficients_mma_vjp.TARGET_WARPS,
            "mma_wgmma": coefficients_mma.WGMMA,
            "dphi_wgmma": coefficients_mma_vjp.DPHI_WGMMA,
            "mma_vjp": coefficients.MMA_VJP,
            "fused_vjp_glue": coefficients.FUSED_VJP_GLUE,
            "glue_packs": coefficients.GLUE_PACKS,
            "tokens_per_block_small_n": coefficients.TOKENS_PER_BLOCK_SMALL_N,
            "dynamic_small_tokens": coefficients.SMALL_TOKENS,
            "dynamic_wide_n": coefficients.WIDE_N,
            "layer_fused_vjp": layer.USE_FUSED_VJP,
            "layer_inline_always": layer.INLINE_ALWAYS,
            "layer_fused_coefficient_vjp": layer.FUSED_COEFFICIENT_VJP,
            "layer_coefficients_jacobian": layer.COEFFICIENTS_JACOBIAN,
            "layer_inline_max_n": layer.INLINE_MAX_N,
            "layer_composite_fast_rms_norm": layer.COMPOSITE_FAST_RMS_NORM,
            "layer_prefetch_tokens": layer.PREFETCH_TOKENS,
            "layer_flat_logits": layer.FLAT_LOGITS,
            "device_params": build.DEVICE_PARAMS,
            "fused_read_step": FUSED_READ_STEP,
            "chain_x_cotangent": CHAIN_X_COTANGENT,
            "defer_post_x": DEFER_POST_X,
            "one_pass_vjp": ONE_PASS_VJP,
            "one_pass_vjp_form": one_pass_vjp.FORM,
            "split_glue_sinkhorn": coefficients.SPLIT_GLUE_SINKHORN,
            "sinkhorn_jacobian": coefficients.SINKHORN_JACOBIAN,
            "dx_token_major": coefficients_mma_vjp.DX_TOKEN_MAJOR,
            "dx_raw_rows": coefficients_mma_vjp.DX_RAW_ROWS,
            "sinkhorn_thread_vjp_max_work": sinkhorn.THREAD_VJP_MAX_WORK,
            "sinkhorn_jacobian_vjp": sinkhorn.JACOBIAN_VJP,
            "layer_latency_kernel": layer.LATENCY_KERNEL,
            "dynamic_split_small": coefficients.SPLIT_SMALL,
            "dynamic_one_launch_small": coefficients.ONE_LAUNCH_SMALL,
            "compile_latency": build.COMPILE_LATENCY,
            "latency_compile_tokens": build.LATENCY_COMPILE_TOKENS}


LIMITS_NOTE = (
    f"kernels cover n <= {MAX_N} streams (dynamic coefficients above n = {MAX_N_DYNAMIC} by MLX "
    "matmuls and kernels); larger n takes the compiled path"
)


watch(__name__)  # settings assigned later bump build.settings_epoch
