"""The seeds' static layer in one kernel: aggregate + RMSNorm + mix + add, one token per group.

out = H_res x + H_post (x) rms_norm(sum_i H_pre_i x_i) * w. A threadgroup owns whole tokens
(persistent loop): pass 1 sums the squares of the aggregate, pass 2 writes every stream. When
a thread's share of the token fits in registers (CPT chunks), pass 2 reuses it; else it
re-reads x (from L2). INLINE computes the coefficients inside the kernel from the raw logits
(warp 0 of each group) -- one launch for the whole layer, the default at every token count
(INLINE_ALWAYS); otherwise a one-warp kernel computes them once and every group reads them.
At a few tokens LAYER_LATENCY, a kernel of its own, takes the single launch.

Roundings follow the reference: the aggregate and the normalised value are rounded to x's
dtype, as the unfused pre -> rms_norm -> post chain does.
"""

from __future__ import annotations

from functools import lru_cache, partial

import mlx.core as mx

from . import coefficients, site, sinkhorn
from .build import KernelSpec, compiled, compiles_latency, float_bits, float_params, int_params, launch, tokens, watch

F32 = mx.float32
MAX_N = 32
LATENCY_TOKENS = 16  # up to this many tokens the inline (single-launch) form is used
# The inline form (one launch: each threadgroup runs the Sinkhorn of the raw logits itself) at
# every token count, not only at T <= LATENCY_TOKENS; False: a one-warp coefficient kernel first,
# then the layer kernel (two launches). In one eval of many applications the host's work for the
# second launch is not hidden. H200 (fifteenth session of 2026-11-30, gpu_experiments.py
# static-host, bf16, 10 rotated inputs, medians of 7 alternated rounds, once the inline form held
# 128 registers instead of 144): static fwd 4096x4x4096 104.9 µs against 121.4, 2560x4x2560
# 58.0 / 66.3, 512x4x1280 25.9 / 41.6, 320x4x1280 24.2 / 36.5; fwd+bwd 4096x4x4096 291.8 / 291.4,
# 512x4x1280 94.7 / 84.7 (both spreads 78-126); traced GPU span at 4096 tokens 71.8 against 73.0
# µs per application. (Before, with x held across the Sinkhorn, one group fitted per SM: 2026-11-29
# within the spread, 2026-11-30 149.4 against 115.0 µs.) The backward then runs the coefficient
# kernel itself.
INLINE_ALWAYS = True
# The layer kernels' PF: while a threadgroup writes one token it asks L2 for its token
# PREFETCH_TOKENS ahead (x, and g in the backward; 0: none), so DRAM keeps reading between a
# group's load phases; the forward holds 128 registers at 256 threads (two groups per SM), so
# nothing else keeps loads in flight then.
# H200 (2026-11-29, scripts/gpu_experiments.py, medians of 5 alternated runs, 4096 x 4 x 4096
# bf16, two runs): static fwd 115.3 / 109.4 µs against 131.7 / 117.8 without, fwd+bwd
# 345.1 / 344.6 against 359.6 / 364.8, the forward kernel alone 114.6 / 93.0 against
# 116.8 / 103.5 (one token ahead). Two tokens ahead: 116.6, 382.0 and 102.8 (one run); with
# INLINE_ALWAYS as well: 163.1 and 408.3 (one run).
PREFETCH_TOKENS = 1
# Above this n the fused kernel runs out of registers (n = 32: 255 registers and 3.7 KB of
# spills; measured 1299 µs at 512 x 32 x 1280 against 948 µs compiled), so the layer is
# composed from the pre and post kernels instead (measured alone: 31 µs and 80 µs there).
MAX_N_FUSED = 8
# Above MAX_N_FUSED (and for the unfused backward) the layer is the kernel ops chained, its
# RMSNorm by mx.fast.rms_norm: on a GPU three MLX primitives (to float32, the norm, back) instead
# of the 13 of the ops (graph nodes, broadcasts included: a one-off mx.export_to_dot count), each
# with its own host cost in an eager eval. (MLX's CPU backend runs mx.fast.rms_norm as those same
# ops.) The n = 32 B = 1 static
# forward took 322.6 µs in bench run Z (H200, sixth session of 2026-11-30) against mlx-mhc
# 0.4.1's 137.1. H200, the same session (the layer checks passed with it; medians of 5 alternated
# runs, gpu_experiments.py composite-norm): 1x32x2048 167.6 against 205.2 µs, 512x32x1280 131.5
# against 144.3, fwd+bwd 512x32x1280 602.8 against 646.5. False: the ops.
COMPOSITE_FAST_RMS_NORM = True
# The single-launch (inline) forward also above MAX_N_FUSED, up to this n, where it runs at
# T <= LATENCY_TOKENS (decoding): one kernel instead of the composite's three and its norm, whose
# host costs dominate there (mlx-mhc 0.4.1's 1x32x2048 forward took 110.9 µs against the
# composite's 173.2 in bench run AA). Its register spills at n = 32 cost little on so few tokens.
# The backward above MAX_N_FUSED stays the composite's (recomputing its forward). H200 (sixth
# session of 2026-11-30; gpu_check.py's layer checks passed with it, f32 / bf16 / f16, among
# them (32, 64, 3) and (16, 1000, 2)): medians of 5 alternated runs (gpu_experiments.py
# inline-wide), static fwd 1x32x2048 209.4 against 217.3 µs, 16x32x1280 167.9 against 192.0,
# fwd+bwd 1x32x2048 977.4 against 1039.2 (930-1199: within the spread). MAX_N_FUSED: off.
INLINE_MAX_N = 32
REGISTER_BUDGET = 64  # floats of x a thread may hold between the two passes

HELPERS = r"""
// Warp 0 (lane j) writes the coefficients from the raw logits to cf: H_pre = sigmoid,
// H_post = 2 sigmoid, H_res = the Sinkhorn of the res logits (lane j holds column j).
template <int N, typename PP, typename PQ, typename PR>
KDEV void mhc_layer_coefficients(PP cpre, PQ cpost, PR cres, KSHPTR(float) cf, int lane, int iters) {
  const bool live = lane < N;
  if (live) {
    cf[lane] = ksigmoid(cpre[lane]);
    cf[N + lane] = 2.0f * ksigmoid(cpost[lane]);
  }
  float col[N];
  KUNROLL for (int i = 0; i < N; ++i) col[i] = live ? cres[i * N + lane] : 0.0f;
  ksinkhorn_warp<N>(col, live, iters);
  if (live) {
    KUNROLL for (int i = 0; i < N; ++i) cf[2 * N + i * N + lane] = col[i];
  }
}

// Sum over V channels of y^2, y = sum_i H_pre_i x_i rounded to T (as the unfused chain rounds it).
// cf: H_pre first (shared memory, or the latency kernel's registers).
template <typename T, int N, int V, typename PC>
KDEV float mhc_layer_sumsq(KTHREAD const float* xv, PC cf) {
  float ss = 0.0f;
  KUNROLL for (int e = 0; e < V; ++e) {
    float y = 0.0f;
    KUNROLL for (int i = 0; i < N; ++i) y += cf[i] * xv[i * V + e];
    y = static_cast<float>(static_cast<T>(y));
    ss += y * y;
  }
  return ss;
}

// Every stream of V channels: out_i = sum_j M_ij x_j + H_post_i * rms(y) * w, w = wts[woff..).
template <typename T, int N, int V, typename PW, typename PO>
KDEV void mhc_layer_write(KTHREAD const float* xv, KSHPTR(float) cf, float inv, PW wts, int64_t woff, PO xout,
                          int64_t row, int C, int cv, bool vec) {
  float z[V];
  KUNROLL for (int e = 0; e < V; ++e) {
    float y = 0.0f;
    KUNROLL for (int i = 0; i < N; ++i) y += cf[i] * xv[i * V + e];
    y = static_cast<float>(static_cast<T>(y));
    z[e] = static_cast<float>(static_cast<T>(y * inv * static_cast<float>(wts[woff + e])));
  }
  KUNROLL for (int i = 0; i < N; ++i) {
    float o[V];
    KUNROLL for (int e = 0; e < V; ++e) o[e] = cf[N + i] * z[e];
    KUNROLL for (int j = 0; j < N; ++j) {
      const float a = cf[2 * N + i * N + j];
      KUNROLL for (int e = 0; e < V; ++e) o[e] += a * xv[j * V + e];
    }
    kstore<T, V>(xout, (row * N + i) * C + (int64_t)cv * V, o, vec);
  }
}
"""

LAYER = KernelSpec(
    name="mhc_layer",
    inputs=("xin", "cpre", "cpost", "cres", "wts", "iparam", "fparam"),
    outputs=("xout",),
    helpers=HELPERS,
    body=r"""
  constexpr int NC = 2 * N + N * N;
  constexpr int CP = CPT > 0 ? CPT : 1;
  KSHARED float cf[NC];
  KSHARED float scratch[32];
  const int Ttok = iparam[0];
  const int C = iparam[1];
  const int iters = iparam[2];
  const float eps = fparam[0];
  const int nv = C / V;
  const int tid = KTID;
  const int lane = KLANE;
  const int warp = KWARP;
  const int nwarps = KNT / 32;
  const bool vec = KALIGNED16(xin) && KALIGNED16(xout);
  float xr[CP][N * V];
  // The first token's x is on its way while the coefficients are made: held in registers when
  // cf is only filled; asked of L2 while warp 0 runs the Sinkhorn (INLINE), since x held across
  // the Sinkhorn took 144 registers (one group of 256 threads per SM instead of two).
  if (INLINE && KBID < Ttok) {
    for (int cv = tid; cv < nv; cv += KNT) {
      KUNROLL for (int i = 0; i < N; ++i) KPREFETCH_L2(xin + ((int64_t)KBID * N + i) * C + (int64_t)cv * V);
    }
  }
  if (CPT > 0 && !INLINE && KBID < Ttok) {
    KUNROLL for (int c = 0; c < CP; ++c) {
      const int cv = tid + c * KNT;
      if (cv < nv) {
        KUNROLL for (int i = 0; i < N; ++i) kload<T, V>(xr[c] + i * V, xin, ((int64_t)KBID * N + i) * C + (int64_t)cv * V, vec);
      }
    }
  }
  if (INLINE) {
    if (warp == 0) mhc_layer_coefficients<N>(cpre, cpost, cres, cf, lane, iters);
  } else {
    for (int a = tid; a < NC; a += KNT)
      cf[a] = a < N ? cpre[a] : (a < 2 * N ? cpost[a - N] : cres[a - 2 * N]);
  }
  KBARRIER();
  for (int64_t t = KBID; t < Ttok; t += KNB) {
    float ss = 0.0f;
    if (CPT > 0) {
      KUNROLL for (int c = 0; c < CP; ++c) {
        const int cv = tid + c * KNT;
        if (cv < nv) {
          if (t != KBID || INLINE) {
            KUNROLL for (int i = 0; i < N; ++i) kload<T, V>(xr[c] + i * V, xin, (t * N + i) * C + (int64_t)cv * V, vec);
          }
          ss += mhc_layer_sumsq<T, N, V>(xr[c], cf);
        }
      }
    } else {
      for (int cv = tid; cv < nv; cv += KNT) {
        float xv[N * V];
        KUNROLL for (int i = 0; i < N; ++i) kload<T, V>(xv + i * V, xin, (t * N + i) * C + (int64_t)cv * V, vec);
        ss += mhc_layer_sumsq<T, N, V>(xv, cf);
      }
    }
    const float inv = 1.0f / KSQRT(kblock_sum(ss, scratch, lane, warp, nwarps) / (float)C + eps);
    if (PF > 0 && t + PF * KNB < Ttok) {  // a later token's x towards L2 while this one is written
      for (int cv = tid; cv < nv; cv += KNT) {
        KUNROLL for (int i = 0; i < N; ++i) KPREFETCH_L2(xin + ((t + PF * KNB) * N + i) * C + (int64_t)cv * V);
      }
    }
    if (CPT > 0) {
      KUNROLL for (int c = 0; c < CP; ++c) {
        const int cv = tid + c * KNT;
        if (cv < nv) mhc_layer_write<T, N, V>(xr[c], cf, inv, wts, (int64_t)cv * V, xout, t, C, cv, vec);
      }
    } else {
      for (int cv = tid; cv < nv; cv += KNT) {
        float xv[N * V];
        KUNROLL for (int i = 0; i < N; ++i) kload<T, V>(xv + i * V, xin, (t * N + i) * C + (int64_t)cv * V, vec);
        mhc_layer_write<T, N, V>(xv, cf, inv, wts, (int64_t)cv * V, xout, t, C, cv, vec);
      }
    }
  }
""",
)

# The single-launch layer at a few tokens (T <= LATENCY_TOKENS), one threadgroup per token, its
# GPU time made short: MLX's eval waits on a blocking-sync event, so a launch that is still
# running when the host waits costs ~13 µs more (the host thread sleeps; H200, 2026-11-30,
# gpu_experiments.py b1-sync and b1-trace: a one-thread kernel spinning 1980 cycles, 1.98 µs
# traced, evaluated in 16.4 µs, one spinning 3960 cycles, 2.98 µs, in 30.4). Warp 0 runs the
# Sinkhorn while the S stream threads (warps 1..) load their token's x and w at once and sum the
# squares of the aggregate with H_pre in their own registers; one barrier then joins them. Width,
# Sinkhorn iterations and eps are template constants, so nothing waits on a parameter array.
# Traced: 3.71 µs against 5.50 for LAYER's inline form (docs/kernel-notes.md row 50), still above
# the step. False: the LAYER kernel's inline form.
LATENCY_KERNEL = True
# Above MAX_N_FUSED the kernel holds up to 255 registers a thread, and a threadgroup may hold 64 K:
# at most 256 threads (1 x 32 x 2048 with 32 + 256 failed to launch on the H200, "too many
# resources requested", 2026-11-30).
LATENCY_MAX_THREADS_WIDE = 256

LAYER_LATENCY = KernelSpec(
    name="mhc_layer_latency",
    inputs=("xin", "cpre", "cpost", "cres", "wts"),
    outputs=("xout",),
    helpers=HELPERS,
    body=r"""
  constexpr int CP = CPT > 0 ? CPT : 1;
  constexpr int NV = C / V;
  KSHARED float cf[2 * N + N * N];
  KSHARED float scratch[32];
  const float eps = KBITS_FLOAT(EPS_BITS);
  const int lane = KLANE;
  const int warp = KWARP;
  const int64_t t = KBID;
  const int s = KTID - 32;  // stream thread index (warps 1..)
  const int S = KNT - 32;
  const bool vec = KALIGNED16(xin) && KALIGNED16(xout);
  float xr[CP][N * V];
  float wr[CP][V];
  if (warp == 0) {
    mhc_layer_coefficients<N>(cpre, cpost, cres, cf, lane, ITERS);
  } else {
    float hp[N];  // H_pre as warp 0 computes it, so the sum of squares need not wait for it
    KUNROLL for (int i = 0; i < N; ++i) hp[i] = ksigmoid(cpre[i]);
    float ss = 0.0f;
    if (CPT > 0) {
      KUNROLL for (int c = 0; c < CP; ++c) {
        const int cv = s + c * S;
        if (cv < NV) {
          KUNROLL for (int i = 0; i < N; ++i) kload<T, V>(xr[c] + i * V, xin, (t * N + i) * C + (int64_t)cv * V, vec);
          KUNROLL for (int e = 0; e < V; ++e) wr[c][e] = static_cast<float>(wts[cv * V + e]);
        }
      }
      KUNROLL for (int c = 0; c < CP; ++c) {
        if (s + c * S < NV) ss += mhc_layer_sumsq<T, N, V>(xr[c], hp);
      }
    } else {
      for (int cv = s; cv < NV; cv += S) {
        float xv[N * V];
        KUNROLL for (int i = 0; i < N; ++i) kload<T, V>(xv + i * V, xin, (t * N + i) * C + (int64_t)cv * V, vec);
        ss += mhc_layer_sumsq<T, N, V>(xv, hp);
      }
    }
    ss = kwarp_sum(ss);
    if (lane == 0) scratch[warp] = ss;
  }
  KBARRIER();
  if (warp == 0) return;
  float total = 0.0f;
  for (int w = 1; w < KNT / 32; ++w) total += scratch[w];
  const float inv = 1.0f / KSQRT(total / (float)C + eps);
  if (CPT > 0) {
    KUNROLL for (int c = 0; c < CP; ++c) {
      const int cv = s + c * S;
      if (cv < NV) mhc_layer_write<T, N, V>(xr[c], cf, inv, wr[c], 0, xout, t, C, cv, vec);
    }
  } else {
    for (int cv = s; cv < NV; cv += S) {
      float xv[N * V];
      KUNROLL for (int i = 0; i < N; ++i) kload<T, V>(xv + i * V, xin, (t * N + i) * C + (int64_t)cv * V, vec);
      mhc_layer_write<T, N, V>(xv, cf, inv, wts, (int64_t)cv * V, xout, t, C, cv, vec);
    }
  }
""",
)


# The layer's whole backward in one pass over x and the cotangent g (per token: recompute y and
# the RMS; dz = sum_i H_post_i g_i; RMSNorm backward; dx = M^T g + H_pre (x) dy), with dM,
# dH_post, dH_pre summed in registers per threadgroup and dw per channel. On 2026-11-25 it passed
# scripts/gpu_check.py --only layer on the H100 (then under a flag since removed) (30/30 cases, all dtypes)
# and measured 401.8 µs against 1436.6 µs for the composed backward at 4096 x 4 x 4096 bfloat16
# (scripts/gpu_experiments.py); see docs/kernel-notes.md. False falls back to the composed backward.
USE_FUSED_VJP = True
# Floats of x per thread and chunk in the backward (site.vector_width), by channel count: 16
# (8-byte vectors of bfloat16 at n = 4, CPT = 4) from VJP_SMALL_BUDGET_MIN_C channels, else 32.
# H200 (2026-11-29): at 4096 x 4 x 4096 bf16 budget 16 took 263.7 and 273.9 µs in two runs
# against 311.8 and 308.5 for 32 (the H100's two runs of 2026-11-25: 284-338 against 319-333);
# at 512 x 4 x 1280, 171.7 µs against 130.0 for 32.
VJP_BUDGET = 32
VJP_SMALL_BUDGET = 16
VJP_SMALL_BUDGET_MIN_C = 4096
GW_REGISTER_BUDGET = 16  # floats of dw a thread may sum in registers over its tokens (CPT * V)

VJP_HELPERS = r"""
// Pass 2 of the layer backward for one chunk of V channels of every stream: writes dx, adds
// the products for dM, dH_post, dH_pre to acc and returns dw's share, dz * rms(y), in gwv.
template <typename T, int N, int V, typename PX, typename PG, typename PW, typename PO>
KDEV void mhc_layer_vjp_chunk(PX xin, PG gin, KSHPTR(float) cf, PW wts, PO gx, KTHREAD float* acc,
                              KTHREAD float* gwv, float inv, float s, int64_t t, int C, int cv, bool vec) {
  float xv[N * V];
  float gv[N * V];
  KUNROLL for (int i = 0; i < N; ++i) {
    kload<T, V>(xv + i * V, xin, (t * N + i) * C + (int64_t)cv * V, vec);
    kload<T, V>(gv + i * V, gin, (t * N + i) * C + (int64_t)cv * V, vec);
  }
  float dy[V];
  KUNROLL for (int e = 0; e < V; ++e) {
    float y = 0.0f, dz = 0.0f;
    KUNROLL for (int i = 0; i < N; ++i) {
      y += cf[i] * xv[i * V + e];
      dz += cf[N + i] * gv[i * V + e];
    }
    y = static_cast<float>(static_cast<T>(y));
    const float w = static_cast<float>(wts[cv * V + e]);
    const float nrm = y * inv;
    const float z = static_cast<float>(static_cast<T>(nrm * w));
    gwv[e] = dz * nrm;
    dy[e] = inv * (dz * w - nrm * s);
    KUNROLL for (int i = 0; i < N; ++i) acc[N * N + i] += gv[i * V + e] * z;
  }
  KUNROLL for (int j = 0; j < N; ++j) {
    float o[V];
    KUNROLL for (int e = 0; e < V; ++e) o[e] = cf[j] * dy[e];
    KUNROLL for (int i = 0; i < N; ++i) {
      const float a = cf[2 * N + i * N + j];
      float d = 0.0f;
      KUNROLL for (int e = 0; e < V; ++e) {
        o[e] += a * gv[i * V + e];
        d += gv[i * V + e] * xv[j * V + e];
      }
      acc[i * N + j] += d;
    }
    float p = 0.0f;
    KUNROLL for (int e = 0; e < V; ++e) p += dy[e] * xv[j * V + e];
    acc[N * N + N + j] += p;
    kstore<T, V>(gx, (t * N + j) * C + (int64_t)cv * V, o, vec);
  }
}
"""

LAYER_VJP = KernelSpec(
    name="mhc_layer_vjp",
    inputs=("xin", "gin", "cpre", "cpost", "cres", "wts", "iparam", "fparam"),
    outputs=("gx", "gcoef", "gw"),
    helpers=VJP_HELPERS,
    body=r"""
  // CPT > 0: thread tid owns the chunks cv = tid + q * KNT (q < CPT) of every token and sums
  // their dw in registers, written once at the end; CPT = 0: dw is summed in gw itself.
  constexpr int NA = N * N + 2 * N;  // dM (N*N), dH_post (N), dH_pre (N)
  constexpr int CP = CPT > 0 ? CPT : 1;
  KSHARED float cf[2 * N + N * N];
  KSHARED float scratch[8 * NA];
  const int Ttok = iparam[0];
  const int C = iparam[1];
  const float eps = fparam[0];
  const int nv = C / V;
  const int tid = KTID;
  const int lane = KLANE;
  const int warp = KWARP;
  const int nwarps = KNT / 32;
  for (int a = tid; a < 2 * N + N * N; a += KNT)
    cf[a] = a < N ? cpre[a] : (a < 2 * N ? cpost[a - N] : cres[a - 2 * N]);
  KBARRIER();
  const bool vec = KALIGNED16(xin) && KALIGNED16(gin) && KALIGNED16(gx);
  float acc[NA];
  KUNROLL for (int a = 0; a < NA; ++a) acc[a] = 0.0f;
  float gwr[CP][V];
  KUNROLL for (int q = 0; q < CP; ++q) {
    KUNROLL for (int e = 0; e < V; ++e) gwr[q][e] = 0.0f;
  }
  if (CPT == 0) {
    for (int cv = tid; cv < nv; cv += KNT) {
      KUNROLL for (int e = 0; e < V; ++e) gw[(int64_t)KBID * C + cv * V + e] = 0.0f;
    }
  }
  for (int64_t t = KBID; t < Ttok; t += KNB) {
    // pass 1: sum y^2 and sum dn*y, dn = w * sum_i H_post_i g_i
    float part[2] = {0.0f, 0.0f};
    for (int cv = tid; cv < nv; cv += KNT) {
      float xv[N * V];
      float gv[N * V];
      KUNROLL for (int i = 0; i < N; ++i) {
        kload<T, V>(xv + i * V, xin, (t * N + i) * C + (int64_t)cv * V, vec);
        kload<T, V>(gv + i * V, gin, (t * N + i) * C + (int64_t)cv * V, vec);
      }
      KUNROLL for (int e = 0; e < V; ++e) {
        float y = 0.0f, dz = 0.0f;
        KUNROLL for (int i = 0; i < N; ++i) {
          y += cf[i] * xv[i * V + e];
          dz += cf[N + i] * gv[i * V + e];
        }
        y = static_cast<float>(static_cast<T>(y));
        part[0] += y * y;
        part[1] += dz * static_cast<float>(wts[cv * V + e]) * y;
      }
    }
    const float ss = kblock_sum(part[0], scratch, lane, warp, nwarps);
    const float dny = kblock_sum(part[1], scratch, lane, warp, nwarps);
    const float inv = 1.0f / KSQRT(ss / (float)C + eps);
    const float s = inv * dny / (float)C;  // (sum_c dn_c n_c) / C
    if (PF > 0 && t + PF * KNB < Ttok) {  // a later token's x and g towards L2 during pass 2
      for (int cv = tid; cv < nv; cv += KNT) {
        KUNROLL for (int i = 0; i < N; ++i) {
          KPREFETCH_L2(xin + ((t + PF * KNB) * N + i) * C + (int64_t)cv * V);
          KPREFETCH_L2(gin + ((t + PF * KNB) * N + i) * C + (int64_t)cv * V);
        }
      }
    }
    // pass 2: dx, and the sums for dM, dH_post, dH_pre, dw
    if (CPT > 0) {
      KUNROLL for (int q = 0; q < CP; ++q) {
        const int cv = tid + q * KNT;
        if (cv < nv) {
          float gwv[V];
          mhc_layer_vjp_chunk<T, N, V>(xin, gin, cf, wts, gx, acc, gwv, inv, s, t, C, cv, vec);
          KUNROLL for (int e = 0; e < V; ++e) gwr[q][e] += gwv[e];
        }
      }
    } else {
      for (int cv = tid; cv < nv; cv += KNT) {
        float gwv[V];
        mhc_layer_vjp_chunk<T, N, V>(xin, gin, cf, wts, gx, acc, gwv, inv, s, t, C, cv, vec);
        KUNROLL for (int e = 0; e < V; ++e) gw[(int64_t)KBID * C + cv * V + e] += gwv[e];
      }
    }
  }
  if (CPT > 0) {
    KUNROLL for (int q = 0; q < CP; ++q) {
      const int cv = tid + q * KNT;
      if (cv < nv) {
        KUNROLL for (int e = 0; e < V; ++e) gw[(int64_t)KBID * C + cv * V + e] = gwr[q][e];
      }
    }
  }
  const float total = kblock_reduce<NA>(acc, scratch, lane, warp, nwarps, tid);
  if (tid < NA) gcoef[(int64_t)KBID * NA + tid] = total;
""",
)

# The layer backward's coefficient gradients after LAYER_VJP, in one launch: the sum of its
# per-threadgroup partials [groups, n*n + 2n] (laid out res | post | pre), the sigmoid
# derivatives of H_pre and H_post, and the Sinkhorn backward of the raw res logits (one thread
# for small n, as sinkhorn.BACKWARD_THREAD, else one warp, as sinkhorn.BACKWARD). Out: the raw
# logits' cotangents [pre n | post n | res n*n]. As MLX ops these were about ten small launches
# (a sum, two gathers, seven elementwise ops, the Sinkhorn backward): mx.compile cannot fuse
# them inside a custom function's backward, where MLX keeps every array a tracer.
COEFFICIENTS_VJP = KernelSpec(
    name="mhc_layer_coefficients_vjp",
    inputs=("gcoef", "hpre", "hpost", "lres", "iparam"),
    outputs=("glog",),
    body=r"""
  constexpr int NA = N * N + 2 * N;
  KSHARED float scratch[8 * NA];
  KSHARED float sums[NA];
  const int G = iparam[0];
  const int tid = KTID;
  const int lane = KLANE;
  const int warp = KWARP;
  const int nwarps = KNT / 32;
  float acc[NA];
  KUNROLL for (int a = 0; a < NA; ++a) acc[a] = 0.0f;
  for (int r = tid; r < G; r += KNT) {
    KUNROLL for (int a = 0; a < NA; ++a) acc[a] += gcoef[(int64_t)r * NA + a];
  }
  const float total = kblock_reduce<NA>(acc, scratch, lane, warp, nwarps, tid);
  if (tid < NA) sums[tid] = total;
  KBARRIER();
  if (tid < N) {
    const float h = hpre[tid];
    glog[tid] = sums[N * N + N + tid] * h * (1.0f - h);
  } else if (tid < 2 * N) {
    const float h = hpost[tid - N];
    glog[tid] = sums[N * N + tid - N] * h * (1.0f - 0.5f * h);
  }
  if (JAC) {
    // lane a: column a of the Sinkhorn's Jacobian by forward mode, then its dot with the
    // cotangent (kernels.layer.COEFFICIENTS_JACOBIAN): n^2 lanes, no exp in the iterations
    if (tid < N * N) {
      float p[N * N];
      float tg[N * N];
      KUNROLL for (int b = 0; b < N * N; ++b) p[b] = lres[b];
      ksinkhorn_jacobian_column<N>(p, tg, tid, ITERS);
      float d = 0.0f;
      KUNROLL for (int b = 0; b < N * N; ++b) d += tg[b] * sums[b];
      glog[2 * N + tid] = d;
    }
  } else if (THREAD) {
    if (tid == 0) {
      float lp[N * N];
      float g[N * N];
      KUNROLL for (int a = 0; a < N * N; ++a) {
        lp[a] = lres[a];
        g[a] = sums[a];
      }
      ksinkhorn_thread_vjp<N, ITERS>(lp, g);
      KUNROLL for (int a = 0; a < N * N; ++a) glog[2 * N + a] = g[a];
    }
  } else if (warp == 0) {
    const bool live = lane < N;
    float lc[N];
    float g[N];
    KUNROLL for (int i = 0; i < N; ++i) {
      lc[i] = live ? lres[i * N + lane] : 0.0f;
      g[i] = live ? sums[i * N + lane] : 0.0f;
    }
    ksinkhorn_warp_vjp<N, ITERS>(lc, g, live, lane);
    if (live) {
      KUNROLL for (int i = 0; i < N; ++i) glog[2 * N + i * N + lane] = g[i];
    }
  }
""",
)
COEFFICIENTS_VJP_THREADS = 256
# COEFFICIENTS_VJP's Sinkhorn backward as n^2 lanes each taking one column of the Jacobian by
# forward mode (prelude.ksinkhorn_thread_jvp) and its dot with the cotangent, where the one-thread
# backward applies (n <= 4); 48 registers against the replay's 191. In every H200 timeline the
# replaying one-block kernel took 94-97 µs (ncu 96.5), on the static fwd+bwd's critical path after
# the layer backward; its only serial work is the one-thread replay and walk back (640 exps at
# n = 4, 20 iterations), where forward mode needs no exp inside the iterations. H200 (2026-11-30,
# sixth session; scripts/gpu_check.py's sinkhorn, coefficient and layer checks passed with it in
# every dtype): static fwd+bwd bf16, medians of 5 alternated runs (gpu_experiments.py
# layer-jacobian), 4096x4x4096 285.6 against 305.2 µs (283-289 against 298-318), 512x4x1280 108.7
# against 117.6, B = 1 206.5 against 241.2. False: the one-thread replay.
COEFFICIENTS_JACOBIAN = True
# The layer backward's coefficient gradients by COEFFICIENTS_VJP (one launch); False: the same
# steps as MLX ops. H200 (2026-11-30, scripts/gpu_experiments.py layer-coefficients, medians of
# 5 alternated runs, static fwd+bwd bf16): 4096x4x4096 301.1 against 321.5 µs, 512x4x1280 119.2
# against 149.8, B = 1 451.0 against 521.7.
FUSED_COEFFICIENT_VJP = True


# Threadgroups (each loops over tokens), at most. H200 (2026-11-29, 4096 x 4 x 4096 bf16, each
# kernel alone): forward 528 groups 101.1 / 104.6 µs (two runs), 264 104.0 / 105.5, 1056
# 108.8 / 107.1; backward 528 273.6 µs, 1056 283.2 (one run). On the H100 (2026-11-25) 1056 was
# the best of the forward shapes then tried.
MAX_GROUPS = 528
VJP_MAX_GROUPS = 528


def plan(T: int, n: int, C: int, itemsize: int, threads: int | None = None, groups: int | None = None):
    """(V, threads, CPT, groups) for one call: 16-byte vectors where C allows, a threadgroup
    no larger than the token needs, x kept in registers between passes when it fits."""
    V = site.vector_width(C, itemsize, n, budget=32)
    nv = C // V
    if threads is None:
        threads = 256
        while threads > 32 and threads // 2 >= nv:
            threads //= 2
    chunks = -(-nv // threads)
    cpt = chunks if chunks * n * V <= REGISTER_BUDGET else 0
    return V, threads, cpt, groups or max(1, min(T, MAX_GROUPS))


def forward(x, pre, post, res, weight, iters: int, eps: float, inline: bool, threads=None, groups=None):
    *lead, n, C = x.shape
    T = 1
    for d in lead:
        T *= d
    V, tg, cpt, groups = plan(T, n, C, x.dtype.size, threads, groups)
    return launch(
        LAYER,
        [x, pre, post, res, weight, int_params(T, C, iters), float_params(eps)],
        [(x.shape, x.dtype)], groups * tg, tg,
        [("T", x.dtype), ("N", n), ("V", V), ("CPT", cpt), ("INLINE", inline), ("PF", PREFETCH_TOKENS)],
    )[0]



def latency_forward(x, pre, post, res, weight, iters: int, eps: float):
    """The single-launch layer by LAYER_LATENCY: one threadgroup of 32 + S threads per token,
    S the fewest of plan()'s sizes that cover the token's vectors (a threads hint is not taken:
    more warps only lengthen the block's sum), for T <= LATENCY_TOKENS."""
    *lead, n, C = x.shape
    T = 1
    for d in lead:
        T *= d
    V, tg, cpt, _ = plan(T, n, C, x.dtype.size)
    if n > MAX_N_FUSED and tg + 32 > LATENCY_MAX_THREADS_WIDE:
        V, tg, cpt, _ = plan(T, n, C, x.dtype.size, LATENCY_MAX_THREADS_WIDE - 32)
    return launch(
        LAYER_LATENCY, [x, pre, post, res, weight], [(x.shape, x.dtype)], T * (tg + 32), tg + 32,
        [("T", x.dtype), ("N", n), ("V", V), ("CPT", cpt), ("C", C), ("ITERS", iters),
         ("EPS_BITS", float_bits(eps))],
    )[0]

def vjp_plan(T: int, n: int, C: int, itemsize: int, threads: int = 256, budget: int | None = None,
             groups: int | None = None):
    """(V, CPT, groups) of the layer backward: V from the per-thread register budget for the
    n*V floats of x (and of g) a chunk holds; CPT chunks of dw per thread kept in registers
    when CPT * V <= GW_REGISTER_BUDGET, else 0 (dw summed in memory, any C)."""
    if budget is None:
        budget = VJP_SMALL_BUDGET if C >= VJP_SMALL_BUDGET_MIN_C else VJP_BUDGET
    V = site.vector_width(C, itemsize, n, budget=budget)
    chunks = -(-(C // V) // threads)
    cpt = chunks if chunks * V <= GW_REGISTER_BUDGET else 0
    return V, cpt, groups or max(1, min(T, VJP_MAX_GROUPS))


def fused_vjp(x, g, H_pre, H_post, H_res, weight, eps: float, threads: int = 256, budget: int | None = None,
              groups: int | None = None):
    """(dx, dH_pre [n], dH_post [n], dH_res [n, n], dw [C]) of the layer for coefficients
    H_* (float32), in one pass over x and the cotangent g (the layer's backward while
    USE_FUSED_VJP). `budget`: floats of x per thread and chunk (site.vector_width; default by C,
    see VJP_BUDGET); 32 gives 16-byte vectors of bfloat16 at n = 4, 16 half of that. `threads` <= 256 (a multiple of 32)."""
    gx, gcoef, gw = _partials(x, g, H_pre, H_post, H_res, weight, eps, threads, budget, groups)
    return (gx, *_summed(gcoef, x.shape[-2]), mx.sum(gw, axis=0))


def _summed(gcoef, n: int):
    """(dH_pre [n], dH_post [n], dH_res [n, n]) from LAYER_VJP's per-group partials (res | post | pre)."""
    s = mx.sum(gcoef, axis=0)
    return s[n * n + n :], s[n * n : n * n + n], s[: n * n].reshape(n, n)


def _partials(x, g, H_pre, H_post, H_res, weight, eps: float, threads: int = 256, budget: int | None = None,
              groups: int | None = None):
    """LAYER_VJP's outputs: dx, the coefficient gradients' per-group partials [groups, n*n + 2n]
    (res | post | pre) and dw's [groups, C]."""
    *lead, n, C = x.shape
    T = 1
    for d in lead:
        T *= d
    V, cpt, groups = vjp_plan(T, n, C, x.dtype.size, threads, budget, groups)
    na = n * n + 2 * n
    return launch(
        LAYER_VJP,
        [x, g.astype(x.dtype), H_pre, H_post, H_res, weight, int_params(T, C), float_params(eps)],
        [(x.shape, x.dtype), ((groups, na), F32), ((groups, C), F32)], groups * threads, threads,
        [("T", x.dtype), ("N", n), ("V", V), ("CPT", cpt), ("PF", PREFETCH_TOKENS)],
    )


def coefficients_vjp(gcoef, H_pre, H_post, res_raw, iters: int):
    """Cotangents of the raw logits (pre [n], post [n], res [n, n], float32) from the layer
    backward's per-group partials gcoef [groups, n*n + 2n] and the forward's H_pre, H_post
    ([1, n] or [n]): COEFFICIENTS_VJP, one launch; None where the Sinkhorn backward is too long
    for a fused kernel (n * iters > sinkhorn.MAX_BACKWARD_WORK)."""
    n = res_raw.shape[-1]
    if n * iters > sinkhorn.MAX_BACKWARD_WORK:
        return None
    glog = launch(
        COEFFICIENTS_VJP,
        [gcoef, H_pre.reshape(n), H_post.reshape(n), res_raw.astype(F32).reshape(n * n), int_params(gcoef.shape[0])],
        [((2 * n + n * n,), F32)], COEFFICIENTS_VJP_THREADS, COEFFICIENTS_VJP_THREADS,
        [("N", n), ("ITERS", iters), ("THREAD", sinkhorn.uses_thread_vjp(n, iters)),
         ("JAC", COEFFICIENTS_JACOBIAN and sinkhorn.uses_thread_vjp(n, iters))],
    )[0]
    return glog[:n], glog[n : 2 * n], glog[2 * n :].reshape(n, n)


def _fused_layer_vjp(primals, cotangent, iters, eps, threads: int = 256, budget: int | None = None,
                     groups: int | None = None, coefficients_=None):
    """coefficients_: the forward's (H_pre [1, n], H_post [1, n], H_res [1, n, n]) when it
    computed them in a launch of its own; None: computed here (the single-launch forward)."""
    x, pre_raw, post_raw, res_raw, weight = primals
    n = x.shape[-2]
    H_pre, H_post, H_res = coefficients_ or _activate(pre_raw, post_raw, res_raw, iters)
    gx, gcoef, gw = _partials(x, cotangent, H_pre.reshape(n), H_post.reshape(n), H_res.reshape(n, n), weight, eps,
                              threads, budget, groups)
    parts = coefficients_vjp(gcoef, H_pre, H_post, res_raw, iters) if FUSED_COEFFICIENT_VJP else None
    if parts is None:  # the ops (for a long Sinkhorn backward, its compiled form)
        parts = coefficients._activation_vjp_parts(
            H_pre.reshape(n), H_post.reshape(n), res_raw.astype(F32).reshape(1, n, n), *_summed(gcoef, n), iters)
    gp, gq, gr = parts
    return (gx, gp.astype(pre_raw.dtype), gq.astype(post_raw.dtype), gr.reshape(n, n).astype(res_raw.dtype),
            mx.sum(gw, axis=0).astype(weight.dtype))


def _composite(x, pre_raw, post_raw, res_raw, weight, iters, eps):
    """The same layer from the separate kernel ops (each with its fused backward)."""
    H_pre, H_post, H_res = coefficients.raw_coefficients(pre_raw, post_raw, res_raw, iters)
    y = site.mhc_pre(x, H_pre)
    if COMPOSITE_FAST_RMS_NORM:
        # float32 weight, so MLX's kernel runs in float32 and x's dtype is rounded to once
        z = mx.fast.rms_norm(y, weight.astype(F32), eps)
    else:
        y = y.astype(F32)
        z = y * mx.rsqrt(mx.mean(y * y, axis=-1, keepdims=True) + eps) * weight.astype(F32)
    return site.mhc_post(x, z.astype(x.dtype), H_post, H_res)


# The raw logits go to the coefficient kernel as they are ([n], [n], [n, n]: one row); False:
# reshaped to [1, n], [1, n], [1, n, n] first, three graph nodes more per call (as before the
# seventh session of 2026-11-30). Measured by gpu_experiments.py flat-logits.
FLAT_LOGITS = True


def _activate(pre_raw, post_raw, res_raw, iters: int):
    """(H_pre [1, n], H_post [1, n], H_res [1, n, n]) float32 from the raw logits: one launch."""
    pre, post, res = pre_raw.astype(F32), post_raw.astype(F32), res_raw.astype(F32)
    if not FLAT_LOGITS:
        n = pre.shape[-1]
        pre, post, res = pre.reshape(1, n), post.reshape(1, n), res.reshape(1, n, n)
    return coefficients.activate(pre, post, res, iters)


@lru_cache(maxsize=None)
def _function(iters: int, eps: float, inline: bool, threads):
    """The layer as a custom function: outputs (y,) in the single-launch form, (y, H_pre,
    H_post, H_res) in the two-launch form, whose backward then reuses the forward's
    coefficients instead of launching their kernel again."""

    @mx.custom_function
    def layer(x, pre_raw, post_raw, res_raw, weight):
        if inline:
            raw = (pre_raw.astype(F32), post_raw.astype(F32), res_raw.astype(F32), weight)
            if LATENCY_KERNEL and tokens(x) <= LATENCY_TOKENS:
                return (latency_forward(x, *raw, iters, eps),)
            return (forward(x, *raw, iters, eps, True, threads),)
        H = _activate(pre_raw, post_raw, res_raw, iters)
        return (forward(x, *H, weight, iters, eps, False, threads), *H)

    @layer.vjp
    def layer_vjp(primals, cotangents, outputs):
        if USE_FUSED_VJP and primals[0].shape[-2] <= MAX_N_FUSED:
            return _fused_layer_vjp(primals, cotangents[0], iters, eps, coefficients_=tuple(outputs[1:]) or None)
        _, grads = mx.vjp(lambda *a: _composite(*a, iters, eps), list(primals), [cotangents[0]])
        return tuple(grads)

    return layer


@lru_cache(maxsize=None)
def _latency_call(iters: int, eps: float, threads):
    """The single-launch layer as a plain function of its arrays (for build.compiled)."""
    layer = _function(iters, eps, True, threads)
    return lambda x, pre_raw, post_raw, res_raw, weight: layer(x, pre_raw, post_raw, res_raw, weight)[0]


def mhc_layer(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight, iters: int, eps: float,
              inline: bool | None = None, threads: int | None = None):
    return resolve(x, iters, eps, inline, threads)(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight)


def resolve(x, iters: int, eps: float, inline: bool | None = None, threads: int | None = None):
    """The layer's form for stream state x's shape and dtype under the current settings, chosen
    once: a function of (x, H_pre_raw, H_post_raw, H_res_raw, rms_weight). Valid while neither
    x's shape and dtype nor the settings change (MHCLayer keeps it per dispatch.state())."""
    n, T, eps = x.shape[-2], tokens(x), float(eps)
    if n > MAX_N_FUSED and not (n <= INLINE_MAX_N and T <= LATENCY_TOKENS and inline is not False):
        return partial(_composite, iters=iters, eps=eps)
    if inline is None:
        inline = INLINE_ALWAYS or T <= LATENCY_TOKENS or n > MAX_N_FUSED
    if inline and T <= LATENCY_TOKENS and compiles_latency(x):
        return compiled(_latency_call(iters, eps, threads))
    return _first(_function(iters, eps, bool(inline), threads))


@lru_cache(maxsize=None)
def _first(fn):
    """fn's first output."""
    return lambda *arrays: fn(*arrays)[0]


watch(__name__)  # settings assigned later bump build.settings_epoch
