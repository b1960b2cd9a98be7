"""Every kernel body and a spread of template instances, for offline checks.

Used by the CPU tests (the Metal source of each is generated and scanned) and by
scripts/gpu_compile_check.py (each is compiled with nvcc for sm_90a).
"""

from __future__ import annotations

import mlx.core as mx

from . import coefficients, coefficients_mma, coefficients_mma_vjp, layer, one_pass_vjp, sinkhorn, site
from .build import float_bits

SPECS = (
    sinkhorn.FORWARD, sinkhorn.BACKWARD, sinkhorn.BACKWARD_THREAD, sinkhorn.BACKWARD_JACOBIAN, coefficients.ACTIVATE, coefficients.DYNAMIC,
    coefficients.DYNAMIC_PRE, coefficients.DYNAMIC_SMALL, coefficients.DYNAMIC_SMALL_PRE,
    coefficients.DYNAMIC_SPLIT_PARTIAL, coefficients.DYNAMIC_SPLIT_FINISH, coefficients.DYNAMIC_ONE,
    coefficients.DYNAMIC_VJP, coefficients.DYNAMIC_VJP_PRE, coefficients.DYNAMIC_VJP_ACC, coefficients.DYNAMIC_VJP_PRE_ACC,
    site.PRE, site.PRE_VJP, site.PRE_VJP_ACC, site.PRE_VJP_RES, site.POST, site.POST_VJP, layer.LAYER, layer.LAYER_LATENCY, layer.LAYER_VJP,
    layer.COEFFICIENTS_VJP, coefficients.DYNAMIC_VJP_GLUE, coefficients.DYNAMIC_VJP_SINKHORN,
    coefficients.DYNAMIC_VJP_GLUE_AFTER_SINKHORN, coefficients.DYNAMIC_SINKHORN_JACOBIAN,
    coefficients.DYNAMIC_VJP_SINKHORN_APPLY,
)

# Kernels of the CUDA-only tensor-core path; they never reach a Metal compiler.
CUDA_ONLY_SPECS = (coefficients_mma.PACK, coefficients_mma.MMA, coefficients_mma.MMA_WG, coefficients_mma.PACK_WG,
                   coefficients_mma.FINISH,
                   coefficients_mma_vjp.PACK_A, coefficients_mma_vjp.PACK_B, coefficients_mma_vjp.DX,
                   coefficients_mma_vjp.DPHI, coefficients_mma_vjp.DPHI_WG,
                   coefficients_mma_vjp.glue_packs_spec(),
                   coefficients_mma_vjp.glue_packs_spec(after_sinkhorn=True),
                   coefficients_mma_vjp.glue_packs_spec(wg=True),
                   coefficients_mma_vjp.glue_packs_spec(after_sinkhorn=True, wg=True),
                   *one_pass_vjp.SPECS)

F32, BF16, F16, I32 = mx.float32, mx.bfloat16, mx.float16, mx.int32


def instances():
    """(spec, input dtypes, output dtypes, template) tuples covering each kernel's variants."""
    out = []
    for n, iters, thread, jac in ((1, 20, True, False), (4, 20, True, False), (4, 40, False, False),
                                  (8, 20, False, False), (1, 20, True, True), (3, 20, True, True), (4, 20, True, True)):
        out.append((layer.COEFFICIENTS_VJP, (F32, F32, F32, F32, I32), (F32,),
                    [("N", n), ("ITERS", iters), ("THREAD", thread), ("JAC", jac)]))
    for n, iters, gt in ((1, 20, 128), (2, 40, 128), (4, 20, 128), (4, 20, 32)):
        out.append((coefficients.DYNAMIC_VJP_GLUE, (F32,) * 9 + (I32,), (F32, F32, F32),
                    [("N", n), ("ITERS", iters), ("GT", gt)]))
        out.append((coefficients.DYNAMIC_VJP_GLUE_AFTER_SINKHORN, (F32,) * 9 + (I32,), (F32, F32, F32),
                    [("N", n), ("ITERS", iters), ("GT", gt)]))
    for n, iters in ((1, 20), (2, 40), (3, 20), (4, 20)):
        out.append((coefficients.DYNAMIC_VJP_SINKHORN, (F32, F32, F32, F32, I32), (F32,),
                    [("N", n), ("Q", coefficients.group_lanes(n)), ("ITERS", iters)]))
    for n in (1, 2, 3, 4):
        out.append((coefficients.DYNAMIC_SINKHORN_JACOBIAN, (F32, F32, F32, I32), (F32,), [("N", n)]))
        out.append((coefficients.DYNAMIC_VJP_SINKHORN_APPLY, (F32, F32, I32), (F32,), [("N", n)]))
    for n in (1, 4, 9, 32):
        out.append((sinkhorn.FORWARD, (F32, I32), (F32,), [("N", n)]))
        out.append((coefficients.ACTIVATE, (F32, F32, F32, I32), (F32, F32, F32), [("N", n)]))
    for n, iters in ((4, 20), (8, 20), (32, 20)):
        out.append((sinkhorn.BACKWARD, (F32, F32, I32), (F32,), [("N", n), ("ITERS", iters)]))
    for n in (1, 2, 3, 4):
        out.append((sinkhorn.BACKWARD_JACOBIAN, (F32, F32, I32), (F32,), [("N", n)]))
    for n, iters in ((1, 20), (2, 40), (4, 20), (8, 10)):
        out.append((sinkhorn.BACKWARD_THREAD, (F32, F32, I32), (F32,), [("N", n), ("ITERS", iters)]))
    for dt in (F32, BF16, F16):
        for n in (1, 3, 4):
            for K in ((33,) if n == 1 else (n * 512, n * 1000)):
                out.append((coefficients.DYNAMIC_ONE, (dt, F32, F32, F32), (F32,) * 5 + (dt,),
                            [("T", dt), ("N", n), ("K", K), ("V", 16 // dt.size if n > 1 and K % (n * 16) == 0 else 1),
                             ("TG", coefficients.one_threads(K)), ("ITERS", 20), ("EPS_BITS", float_bits(1e-6)),
                             ("PRE", True)]))
        for n in (1, 4, 8):
            tb = coefficients.tokens_per_block(n)
            out.append((coefficients.DYNAMIC, (dt, F32, F32, F32, I32, F32), (F32,) * 5,
                        [("T", dt), ("N", n), ("TB", tb)]))
            out.append((coefficients.DYNAMIC_PRE, (dt, F32, F32, F32, I32, F32), (F32,) * 5 + (dt,),
                        [("T", dt), ("N", n), ("TB", tb)]))
            out.append((coefficients.DYNAMIC_SMALL, (dt, F32, F32, F32, I32, F32), (F32,) * 5,
                        [("T", dt), ("N", n)]))
            out.append((coefficients.DYNAMIC_SMALL_PRE, (dt, F32, F32, F32, I32, F32), (F32,) * 5 + (dt,),
                        [("T", dt), ("N", n)]))
            K = n * (1000 if n == 1 else 512)
            out.append((coefficients.DYNAMIC_SPLIT_PARTIAL, (dt, F32), (F32,), [("T", dt), ("N", n), ("K", K)]))
            for pre in (True, False):
                out.append((coefficients.DYNAMIC_SPLIT_FINISH, (dt, F32, F32, F32), (F32,) * 5 + (dt,),
                            [("T", dt), ("N", n), ("K", K), ("V", 16 // dt.size if n > 1 else 1), ("ITERS", 20),
                             ("EPS_BITS", float_bits(1e-6)), ("PRE", pre)]))
            out.append((coefficients.DYNAMIC_VJP, (dt, F32, F32, F32, I32), (dt, F32),
                        [("T", dt), ("N", n)]))
            out.append((coefficients.DYNAMIC_VJP_PRE, (dt, F32, F32, F32, F32, dt, I32), (dt, F32),
                        [("T", dt), ("N", n)]))
            out.append((coefficients.DYNAMIC_VJP_ACC, (dt, F32, F32, F32, dt, I32), (dt, F32),
                        [("T", dt), ("N", n)]))
            out.append((coefficients.DYNAMIC_VJP_PRE_ACC, (dt, F32, F32, F32, F32, dt, dt, I32), (dt, F32),
                        [("T", dt), ("N", n)]))
            out.append((site.PRE_VJP, (dt, F32, dt, I32), (dt, F32),
                        [("T", dt), ("N", n), ("V", 16 // dt.size), ("SHARED", False), ("DX", False)]))
        for n, V in ((4, 16 // dt.size), (8, 16 // dt.size), (32, 1), (3, 1)):
            for shared in (True, False):
                out.append((site.PRE, (dt, F32, I32), (dt,), [("T", dt), ("N", n), ("V", V), ("SHARED", shared)]))
                out.append((site.POST, (dt, dt, F32, F32, I32), (dt,),
                            [("T", dt), ("N", n), ("V", V), ("SHARED", shared)]))
                out.append((site.PRE_VJP, (dt, F32, dt, I32), (dt, F32),
                            [("T", dt), ("N", n), ("V", V), ("SHARED", shared), ("DX", True)]))
                out.append((site.PRE_VJP_ACC, (dt, F32, dt, dt, I32), (dt, F32),
                            [("T", dt), ("N", n), ("V", V), ("SHARED", shared), ("DX", True)]))
                for defer in (False, True) if n <= 8 else (False,):
                    out.append((site.POST_VJP, (dt, dt, F32, F32, dt, I32), (dt, dt, F32, F32),
                                [("T", dt), ("N", n), ("V", V), ("SHARED", shared), ("HGRAD", n <= 8),
                                 ("DEFER", defer)]))
                if n <= 8:
                    out.append((site.PRE_VJP_RES, (dt, F32, F32, dt, dt, I32), (dt, F32, F32),
                                [("T", dt), ("N", n), ("V", V), ("SHARED", shared)]))
        for n, V, cpt, inline, pf in ((4, 16 // dt.size, 2, True, 0), (4, 16 // dt.size, 2, True, 1),
                                      (4, 16 // dt.size, 2, False, 1), (4, 16 // dt.size, 2, False, 2),
                                      (4, 16 // dt.size, 0, False, 1), (32, 1, 0, False, 0)):
            out.append((layer.LAYER, (dt, F32, F32, F32, F32, I32, F32), (dt,),
                        [("T", dt), ("N", n), ("V", V), ("CPT", cpt), ("INLINE", inline), ("PF", pf)]))
        for n, V, cpt, C, iters in ((4, 16 // dt.size, 1, 512, 20), (8, 4, 2, 1000, 20), (1, 1, 1, 33, 7),
                                    (32, 1, 0, 2048, 20)):
            out.append((layer.LAYER_LATENCY, (dt, F32, F32, F32, F32), (dt,),
                        [("T", dt), ("N", n), ("V", V), ("CPT", cpt), ("C", C), ("ITERS", iters),
                         ("EPS_BITS", float_bits(1e-5))]))
        for n, V, cpt, pf in ((4, 16 // dt.size, 2, 0), (4, 16 // dt.size // 2 or 1, 4, 0),
                              (4, 16 // dt.size // 2 or 1, 4, 1), (4, 16 // dt.size, 0, 1), (8, 4, 1, 1),
                              (1, 1, 0, 1)):
            out.append((layer.LAYER_VJP, (dt, dt, F32, F32, F32, F32, I32, F32), (dt, F32, F32),
                        [("T", dt), ("N", n), ("V", V), ("CPT", cpt), ("PF", pf)]))
    return out


def cuda_only_instances():
    """Instances of the CUDA-only kernels (scripts/gpu_compile_check.py compiles these too)."""
    out = []
    for dt in (BF16, F16):
        for n in (1, 2, 4, 8):
            nt = coefficients_mma.n_tiles(n * (n + 2))
            for ku in (1, 2, 4):
                out.append((coefficients_mma.MMA, (dt, BF16, I32), (F32, F32),
                            [("T", dt), ("NT", nt), ("MT", coefficients_mma.token_tiles_per_warp(nt)),
                             ("PB", coefficients_mma.PHI_PARTS), ("KU", ku)]))
    # the warpgroup-MMA partials (coefficients_mma.WGMMA; Hopper)
    out.append((coefficients_mma.MMA_WG, (BF16, BF16, I32), (F32, F32),
                [("T", BF16), ("PB", coefficients_mma.PHI_PARTS), ("MW", 2)]))
    for perm in (True, False):  # phi's order (MMA_WG) and gs's (DPHI_WG)
        out.append((coefficients_mma.PACK_WG, (F32, I32), (BF16,), [("PB", coefficients_mma.PHI_PARTS), ("PERM", perm)]))
    vjp = coefficients_mma_vjp  # the warpgroup-MMA dphi (DPHI_WGMMA; Hopper)
    out.append((vjp.DPHI_WG, (BF16, BF16, I32), (F32,), [("T", BF16), ("PG", vjp.DPHI_PARTS)]))
    for n in (1, 2, 4, 8):
        nt = coefficients_mma.n_tiles(n * (n + 2))
        for ku in (1, 2, 4):
            out.append((coefficients_mma.PACK, (F32, I32), (BF16,),
                        [("NT", nt), ("PB", coefficients_mma.PHI_PARTS), ("KU", ku)]))
        for tb in (32, 16, 8):
            out.append((coefficients_mma.FINISH, (F32, F32, F32, F32, I32, F32), (F32,) * 5, [("N", n), ("TB", tb)]))
    vjp = coefficients_mma_vjp
    for parts in (2, 3):
        out.append((vjp.PACK_A, (F32, I32), (BF16,), [("P", parts)]))
        for trans, perm in ((True, True), (True, False), (False, False)):
            out.append((vjp.PACK_B, (F32, I32), (BF16,), [("P", parts), ("TRANS", trans), ("PERM64", perm)]))
    for dt in (BF16, F16):
        for n in (1, 2, 4):
            W = n * (n + 2)
            for pre, acc, res in ((False, False, False), (True, False, False), (False, True, False),
                                  (True, True, False), (True, False, True), (False, True, True)):
                for tm, raw in ((False, False), (True, False), (True, True)):
                    out.append((vjp.DX, (BF16, BF16, dt, F32, F32, dt, dt, F32, dt, I32), (dt,),
                                [("T", dt), ("N", n), ("MT", vjp.DX_TOKEN_TILES), ("KSW", -(-W // 16)), ("PRE", pre),
                                 ("ACC", acc), ("RES", res), ("TM", tm), ("RAW", raw)]))
            out.append((vjp.DPHI, (dt, BF16, I32), (F32,), [("T", dt), ("NT", -(-W // 8)), ("PG", vjp.DPHI_PARTS)]))
    opv = one_pass_vjp
    for dt, n, tt, cs in [(dt, n, opv.TT, opv.CS) for dt in (BF16, F16) for n in (1, 2, 4)] + [(BF16, 4, 8, 64)]:
        base = [("T", dt), ("N", n), ("TT", tt), ("CS", cs)]
        tensors = (dt, dt, dt)
        out.append((opv.PARTIALS, tensors + (I32,), (F32,), base))
        out.append((opv.GLUE, (F32,) * 11 + (I32,), (F32, F32, F32), [("N", n), ("TT", tt), ("CS", cs), ("EXT", n != 2)]))
        out.append((opv.DX, tensors + (F32,) * 5 + (I32,), (dt,), base))
    for cs in (128, 256):  # the split's wider PARTIALS slices (one_pass_vjp.PARTIAL_CS)
        out.append((opv.PARTIALS, (BF16,) * 3 + (I32,), (F32,), [("T", BF16), ("N", 4), ("TT", opv.TT), ("CS", cs)]))
    for n, gt in ((1, 128), (4, 128), (4, 32)):
        for after in (False, True):
            for wg in (False, True) if n == 4 else (False,):  # DPHI_WG's order: n = 4 (W = 24) only
                out.append((vjp.glue_packs_spec(after, wg), (F32,) * 9 + (I32,), (F32, F32, F32, BF16, BF16),
                            [("N", n), ("ITERS", 20), ("GT", gt), ("PA", vjp.DX_PARTS), ("PB", vjp.DPHI_PARTS)]))
    return out
