"""CUDA only: the dynamic coefficients' backward on tensor cores (by default where the forward
takes the tensor-core form).

The FP32 kernel (coefficients.DYNAMIC_VJP) computes x's cotangent dx = gs phi^T - x c2 and
dphi = x^T gs in one pass on FP32 cores; the H100 profile has it at 519.6 µs for 4096 x 4 x
4096 bf16, latency-bound at 135 registers (one 256-thread block per SM). Here each product is
an mma.sync m16n8k16 bf16 GEMM with float32 accumulation, in two kernels that each read x once:

- DX: M = tokens, N = k, K-dim = w. gs (float32) and phi (float32) are each split into two
  bfloat16 parts and three products are summed (hi hi + hi lo + lo hi: ~16 significant bits,
  ample for a 16-bit dx); then dx = that - x c2 (+ H_pre (x) dh for the fused read step).
- DPHI: M = k, N = w, K-dim = tokens. x is exact in bfloat16 (float16 x: two exact parts) and
  gs is split into three parts, so dphi keeps float32 accuracy, as in the forward. The
  reduction runs over tokens, so a lane needs pairs of tokens at one k while x is stored with k
  contiguous: each lane loads 8 consecutive k of four tokens (16-byte loads) and regroups the
  16-bit halves into token pairs; row g of m-tile q is k = kb + 8g + 2q and row g + 8 is the
  next k (any row order works as long as the output is written back to the same k).

Both operands that are not x come in the lanes' fragment order, packed once per call by PACK_A
and PACK_B (one launch each). n <= 4 only (the accumulators of DPHI grow with the columns).
Taken where the forward takes the tensor-core form (coefficients.MMA_VJP "auto", the default).
Its first form passed scripts/gpu_check.py on the H200 (2026-11-29) but took 591.8-611.4 µs
against 394.9-528.7 for the FP32 kernel: its DX kernel read x at ~0.5 TB/s, two bytes per load.
DX rewritten (a lane owns 16 consecutive k: 16-byte x and dx accesses), it passed the checks
again on 2026-11-30 and took 262.1 µs against 386.8 at 4096 x 4 x 4096 bf16, DX alone 177.5
(docs/kernel-notes.md). tests/kernels run both
kernels on the CPU emulator against float64.
"""

from __future__ import annotations

import mlx.core as mx

from functools import lru_cache

from .build import KernelSpec, edited, int_params, launch, standin, watch
from . import coefficients_mma
from .coefficients_mma import LOAD_X, PTX_MMA, PTX_WGMMA, WG_STAGE, X_PARTS

F32 = mx.float32
DX_PARTS = 2  # bfloat16 parts of gs and of phi in DX
DPHI_PARTS = 3  # bfloat16 parts of gs in DPHI
# dphi by warpgroup MMA (DPHI_WG; bfloat16 x, n = 4, Hopper), as coefficients_mma.WGMMA for the
# forward; elsewhere DPHI. DPHI spans ~70-77 µs per application at 4096 x 4 x 4096 against
# cuBLAS's 31.5 for the same bytes; DPHI_WG 65.3 against 76.7 (H200, fourteenth session of
# 2026-11-30, docs/kernel-notes.md row 75). False: DPHI everywhere.
DPHI_WGMMA = True
MAX_N = 4
DX_TOKEN_TILES = 2  # token tiles of 16 per warp in DX (they share each phi fragment)
# DX's warps ordered token group first (TM), so a block's warps cover 256 consecutive k of the
# same 32 tokens: x, gacc and dx are then read and written 512 contiguous bytes per row and block
# instead of 128 bytes per row with the next warp 32 rows away. Same arithmetic, so the same bits.
# H200, bf16, 4096x4x4096 (2026-11-30, fourth session, medians of 5 alternated runs): DX alone
# 224.8 against 239.1 µs in k-group-first order, dynamic fwd+bwd 750.1 against 761.9 µs.
DX_TOKEN_MAJOR = True
# DX loads every row's x and gacc together as 16-byte vectors after its products (the DX body's
# RAW; 165-187 registers against 156-160). Row by row, each row's gacc load waited for the store
# before it: H200, bf16, 4096x4x4096 (2026-11-30, fourth session, medians of 5 alternated runs):
# DX alone 174.4 against 221.0 µs, the dynamic fwd+bwd 694.1 against 743.7 (docs/kernel-notes.md
# row 35). False: row by row (the same bits).
DX_RAW_ROWS = True
TARGET_WARPS = 2048
WARPS_PER_BLOCK = 4
DPHI_WG_TARGET_BLOCKS = 384  # DPHI_WG's blocks of one warpgroup: about 3 per SM on 132 SMs

# mat [R, KD] float32 -> A fragments [ceil(R/16), ceil(KD/16), P, 32 lanes, 8] bfloat16: lane
# (g, c), element e is register e / 2, half e % 2: row g + 8 (r & 1), column 2c + 8 (r >> 1) + h.
PACK_A = KernelSpec(
    name="mhc_pack_a_fragments",
    inputs=("mat", "iparam"),
    outputs=("pk",),
    body=r"""
  const int R = iparam[0];
  const int KD = iparam[1];
  const int KS = (KD + 15) / 16;
  const int64_t idx = (int64_t)KBID * KNT + KTID;
  const int64_t total = (int64_t)((R + 15) / 16) * KS * 256;
  if (idx >= total) return;
  const int e = (int)(idx & 7);
  const int lane = (int)((idx >> 3) & 31);
  const int64_t rest = idx >> 8;
  const int ks = (int)(rest % KS);
  const int64_t rt = rest / KS;
  const int r = e >> 1;
  const int row = (int)(16 * rt) + (lane >> 2) + 8 * (r & 1);
  const int col = 16 * ks + 2 * (lane & 3) + 8 * (r >> 1) + (e & 1);
  float v = (row < R && col < KD) ? mat[(int64_t)row * KD + col] : 0.0f;
  #pragma unroll
  for (int p = 0; p < P; ++p) {
    const __nv_bfloat16 b = __float2bfloat16_rn(v);
    pk[(((rt * KS + ks) * P + p) * 32 + lane) * 8 + e] = b;
    v -= __bfloat162float(b);
  }
""",
)

# B[kk][nn] (TRANS: src[nn][kk], else src[kk][nn]; KD rows kk, NN columns nn) -> B fragments
# [tiles, ceil(KD/16), P, 32, 4] bfloat16: lane (g, c), element e: row kk = 16 ks + 2c +
# 8 (e >> 1) + (e & 1), column nn = 8 nt + g. PERM64 (DX's phi): column nn of the fragments
# holds source column 64 (nn / 64) + 16 (nn % 8 / 2) + 2 (nn / 8 % 8) + nn % 2, so that in DX
# a lane's accumulators over one group of eight n-tiles are 16 consecutive k (tiles: 8 per 64
# columns, the last group zero-padded); else the identity (tiles: ceil(NN / 8)).
PACK_B = KernelSpec(
    name="mhc_pack_b_fragments",
    inputs=("src", "iparam"),
    outputs=("pk",),
    body=r"""
  const int KD = iparam[0];
  const int NN = iparam[1];
  const int KS = (KD + 15) / 16;
  const int64_t idx = (int64_t)KBID * KNT + KTID;
  const int64_t total = (int64_t)(PERM64 ? 8 * ((NN + 63) / 64) : (NN + 7) / 8) * KS * 128;
  if (idx >= total) return;
  const int e = (int)(idx & 3);
  const int lane = (int)((idx >> 2) & 31);
  const int64_t rest = idx >> 7;
  const int ks = (int)(rest % KS);
  const int64_t nt = rest / KS;
  const int kk = 16 * ks + 2 * (lane & 3) + 8 * (e >> 1) + (e & 1);
  const int nf = (int)(8 * nt) + (lane >> 2);  // the fragments' column
  const int nn = PERM64 ? (nf & ~63) + 16 * ((nf & 7) >> 1) + 2 * ((nf >> 3) & 7) + (nf & 1) : nf;
  float v = 0.0f;
  if (kk < KD && nn < NN) v = TRANS ? src[(int64_t)nn * KD + kk] : src[(int64_t)kk * NN + nn];
  #pragma unroll
  for (int p = 0; p < P; ++p) {
    const __nv_bfloat16 b = __float2bfloat16_rn(v);
    pk[(((nt * KS + ks) * P + p) * 32 + lane) * 4 + e] = b;
    v -= __bfloat162float(b);
  }
""",
)

# dx[t, k] = sum_w gs[t, w] phi[k, w] - x[t, k] c2[t] (+ H_pre[t, k / C] dh[t, k % C] if PRE)
# (+ gacc[t, k] if ACC: x's cotangent from later in the site, the chained forms of site.py).
# A warp owns MT token tiles of 16 and one group of 64 k: eight n-tiles of phi packed with
# PERM64, so lane (g, c) ends with the 16 consecutive k 64 q + 16 c .. + 15 of its rows g and
# g + 8 and reads x and writes dx there by 16-byte vectors (where aligned). The earlier form (a
# k-tile of 8 at a time, 2-byte loads and stores) passed the H200 check but read x at ~0.5 TB/s
# (dx 504-532 µs at 4096 x 4 x 4096); this one passed it on 2026-11-30 (177.5 µs alone). Its
# pre share read by vectors (PRE, the fused read step at tensor-core sizes; per element before,
# an integer division and a 2-byte load each, when the read step there lost to the two ops:
# docs/kernel-notes.md row 27) passed the H200 checks on 2026-11-30 (third session); with it the
# read step at 4096 x 4 x 4096 took 826.8 µs against the chain's 822.3 (still not taken there).
DX_HELPERS = r"""
// element e (0..7) of eight 16-bit T in a 16-byte vector, as float (e a compile-time constant
// in the unrolled loops, so the word is picked without indexing the registers)
template <typename T>
__device__ __forceinline__ float mhc_elem16(const uint4& v, int e) {
  const uint32_t w = (e >> 1) == 0 ? v.x : (e >> 1) == 1 ? v.y : (e >> 1) == 2 ? v.z : v.w;
  const unsigned short bits = (unsigned short)((e & 1) ? (w >> 16) : (w & 0xffffu));
  return static_cast<float>(*reinterpret_cast<const T*>(&bits));
}

// x[t, k0 .. k0 + 15] as floats (zeros past K or for t >= Ttok): two 16-byte loads where vec
template <typename T, typename P>
__device__ __forceinline__ void mhc_dx_load_row(float* xl, P xin, int t, int Ttok, int K, int k0, bool vec) {
  const int64_t row = (int64_t)(t < Ttok ? t : 0) * K;
  if (vec) {
    kload<T, 8>(xl, xin, row + k0, true);
    kload<T, 8>(xl + 8, xin, row + k0 + 8, true);
  } else {
    #pragma unroll
    for (int i = 0; i < 16; ++i) xl[i] = (t < Ttok && k0 + i < K) ? static_cast<float>(xin[row + k0 + i]) : 0.0f;
  }
}

// o[0 .. 15] += w p[off .. off + 15] (two 16-byte loads)
template <typename T, typename P>
__device__ __forceinline__ void mhc_add_scaled16(float* o, float w, P p, int64_t off) {
  float v[16];
  kload<T, 8>(v, p, off, true);
  kload<T, 8>(v + 8, p, off + 8, true);
  #pragma unroll
  for (int i = 0; i < 16; ++i) o[i] += w * v[i];
}

// o[0 .. 15] (dx at row t, k0 ..) += H_pre[t, k / C] dh[t, k % C] (PRE) + gacc[t, k] (ACC)
// + sum_j H_res[t, j, k / C] g[t, j, k % C] (RES: post's deferred share, g laid out as x)
template <typename T, int N, bool PRE, bool ACC, bool RES, typename PH, typename PD, typename PA, typename PR,
          typename PG>
__device__ __forceinline__ void mhc_dx_addends(float* o, PH hpre, PD dh, PA gacc, PR hres, PG gres, int t, int K,
                                               int Cw, int k0, bool vec) {
  const int64_t row = (int64_t)t * K;
  if (PRE) {
    // the 16 k lie in one stream st when C is a multiple of 16 (k0 is): one H_pre and dh by
    // two 16-byte vectors; else per element (an integer division and 2-byte load each)
    const int st0 = k0 / Cw;
    const int64_t doff = (int64_t)t * Cw + (k0 - st0 * Cw);
    if (vec && Cw % 16 == 0 && KALIGNED16(dh)) {
      mhc_add_scaled16<T>(o, hpre[(int64_t)t * N + st0], dh, doff);
    } else {
      #pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int kk = k0 + i;
        if (kk < K) {
          const int st = kk / Cw;
          o[i] += hpre[(int64_t)t * N + st] * static_cast<float>(dh[(int64_t)t * Cw + (kk - st * Cw)]);
        }
      }
    }
  }
  if (ACC) {  // same 16 k as x: by 16-byte vectors where x's are (gacc is laid out as x)
    float ga[16];
    if (vec && KALIGNED16(gacc)) {
      kload<T, 8>(ga, gacc, row + k0, true);
      kload<T, 8>(ga + 8, gacc, row + k0 + 8, true);
    } else {
      #pragma unroll
      for (int i = 0; i < 16; ++i) ga[i] = k0 + i < K ? static_cast<float>(gacc[row + k0 + i]) : 0.0f;
    }
    #pragma unroll
    for (int i = 0; i < 16; ++i) o[i] += ga[i];
  }
  if (RES) {
    // as PRE: with C a multiple of 16 the 16 k lie in one stream st, and each stream j's g at
    // the same channels is two 16-byte vectors (the n lanes of a token that share these
    // channels read them from L2 but the first); else per element. H200, 4096 x 4 x 4096 with
    // PRE: 322.5 µs against 174.9 for ACC reading pre's share (docs/kernel-notes.md row 67)
    const int st0 = k0 / Cw;
    const int64_t c0 = k0 - st0 * Cw;
    if (vec && Cw % 16 == 0 && KALIGNED16(gres)) {
      #pragma unroll
      for (int j = 0; j < N; ++j) mhc_add_scaled16<T>(o, hres[((int64_t)t * N + j) * N + st0], gres, row + j * Cw + c0);
    } else {
      #pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int kk = k0 + i;
        if (kk < K) {
          const int st = kk / Cw;
          const int64_t c = kk - st * Cw;
          #pragma unroll
          for (int j = 0; j < N; ++j)
            o[i] += hres[((int64_t)t * N + j) * N + st] * static_cast<float>(gres[row + j * Cw + c]);
        }
      }
    }
  }
}
"""

DX_GROUP = r"""
// One warp's MT token tiles (token group tg) by one group of 64 k (kg) of DX: the products, then
// dx written.
template <typename T, int N, int MT, int KSW, bool PRE, bool ACC, bool RES, bool RAW, typename PGA, typename PPB,
          typename PX, typename PC, typename PH, typename PD, typename PA, typename PR, typename PG, typename PO>
__device__ __forceinline__ void mhc_dx_group(PGA gsa, PPB phb, PX xin, PC ctwo, PH hpre, PD dh, PA gacc, PR hres,
                                             PG gres, PO gx, int Ttok, int K, int Cw, int kg, int tg) {
  const int tt_all = (Ttok + 15) / 16;
  const int lane = (int)(threadIdx.x & 31u);
  const int g = lane >> 2;
  const int c = lane & 3;
  const int k0 = 64 * kg + 16 * c;  // this lane's 16 consecutive k
  const bool vec = (K % 8 == 0) && (k0 + 16 <= K) && KALIGNED16(xin) && KALIGNED16(gx);
  uint32_t a[MT][KSW][2][4];
  float c2v[MT][2];
  #pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int tt = tg * MT + m;
    #pragma unroll
    for (int s = 0; s < KSW; ++s) {
      #pragma unroll
      for (int p = 0; p < 2; ++p) {
        if (tt < tt_all) {
          const uint4 v = *reinterpret_cast<const uint4*>(gsa + ((((int64_t)tt * KSW + s) * 2 + p) * 32 + lane) * 8);
          a[m][s][p][0] = v.x; a[m][s][p][1] = v.y; a[m][s][p][2] = v.z; a[m][s][p][3] = v.w;
        } else {
          a[m][s][p][0] = 0u; a[m][s][p][1] = 0u; a[m][s][p][2] = 0u; a[m][s][p][3] = 0u;
        }
      }
    }
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int t = 16 * tt + g + 8 * h;
      c2v[m][h] = t < Ttok ? ctwo[t] : 0.0f;
    }
  }
  // d[m][j]: n-tile j of the group; element 2h + e is row g + 8h, k = 16c + 2j + e of the group
  float d[MT][8][4];
  #pragma unroll
  for (int j = 0; j < 8; ++j) {
    uint32_t b[KSW][2][2];
    #pragma unroll
    for (int s = 0; s < KSW; ++s) {
      #pragma unroll
      for (int p = 0; p < 2; ++p) {
        const uint2 v = *reinterpret_cast<const uint2*>(phb + (((((int64_t)kg * 8 + j) * KSW + s) * 2 + p) * 32 + lane) * 4);
        b[s][p][0] = v.x;
        b[s][p][1] = v.y;
      }
    }
    #pragma unroll
    for (int m = 0; m < MT; ++m) {
      #pragma unroll
      for (int e = 0; e < 4; ++e) d[m][j][e] = 0.0f;
      #pragma unroll
      for (int s = 0; s < KSW; ++s) {
        mhc_mma_bf16(d[m][j], a[m][s][0], b[s][0][0], b[s][0][1]);
        mhc_mma_bf16(d[m][j], a[m][s][0], b[s][1][0], b[s][1][1]);
        mhc_mma_bf16(d[m][j], a[m][s][1], b[s][0][0], b[s][0][1]);
      }
    }
  }
  // RAW: every row's x and gacc as 16-byte vectors, all in flight together, then
  // dx row by row (the same sums in the same order as below). Held unconverted they take the
  // registers the float x alone takes below, where each row's gacc load waits for the store
  // before it (the compiler cannot tell gacc and gx apart).
  if (RAW && vec && (!ACC || KALIGNED16(gacc))) {
    uint4 xr[MT][2][2];  // 8 elements of T each (T is 16-bit here: x on tensor cores)
    uint4 gr[MT][2][2];
    #pragma unroll
    for (int m = 0; m < MT; ++m) {
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int t = 16 * (tg * MT + m) + g + 8 * h;
        const int64_t off = (int64_t)(t < Ttok ? t : 0) * K + k0;
        #pragma unroll
        for (int v = 0; v < 2; ++v) {
          xr[m][h][v] = *reinterpret_cast<const uint4*>(xin + off + 8 * v);
          if (ACC) gr[m][h][v] = *reinterpret_cast<const uint4*>(gacc + off + 8 * v);
        }
      }
    }
    #pragma unroll
    for (int m = 0; m < MT; ++m) {
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int t = 16 * (tg * MT + m) + g + 8 * h;
        if (t >= Ttok) continue;
        float o[16];
        #pragma unroll
        for (int i = 0; i < 16; ++i) o[i] = d[m][i >> 1][2 * h + (i & 1)] - mhc_elem16<T>(xr[m][h][i >> 3], i & 7) * c2v[m][h];
        if (PRE) mhc_dx_addends<T, N, true, false, false>(o, hpre, dh, gacc, hres, gres, t, K, Cw, k0, vec);
        if (ACC) {
          #pragma unroll
          for (int i = 0; i < 16; ++i) o[i] += mhc_elem16<T>(gr[m][h][i >> 3], i & 7);
        }
        if (RES) mhc_dx_addends<T, N, false, false, true>(o, hpre, dh, gacc, hres, gres, t, K, Cw, k0, vec);
        const int64_t row = (int64_t)t * K;
        kstore<T, 8>(gx, row + k0, o, true);
        kstore<T, 8>(gx, row + k0 + 8, o + 8, true);
      }
    }
  } else {
    // every row's x first (all loads in flight), then dx
    float xv[MT][2][16];
    #pragma unroll
    for (int m = 0; m < MT; ++m) {
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int t = 16 * (tg * MT + m) + g + 8 * h;
        mhc_dx_load_row<T>(xv[m][h], xin, t, Ttok, K, k0, vec);
      }
    }
    #pragma unroll
    for (int m = 0; m < MT; ++m) {
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int t = 16 * (tg * MT + m) + g + 8 * h;
        if (t >= Ttok) continue;
        const int64_t row = (int64_t)t * K;
        float o[16];
        #pragma unroll
        for (int j = 0; j < 8; ++j) {
          #pragma unroll
          for (int e = 0; e < 2; ++e) o[2 * j + e] = d[m][j][2 * h + e] - xv[m][h][2 * j + e] * c2v[m][h];
        }
        // dh and gacc row by row between the stores of dx. Loading them with x before the
        // products (all in flight together) took 226-242 registers against 156-162 and lost on the
        // H200: 860.0 against 790.6 µs at 4096 x 4 x 4096 fwd+bwd (docs/kernel-notes.md row 31)
        mhc_dx_addends<T, N, PRE, ACC, RES>(o, hpre, dh, gacc, hres, gres, t, K, Cw, k0, vec);
        if (vec) {
          kstore<T, 8>(gx, row + k0, o, true);
          kstore<T, 8>(gx, row + k0 + 8, o + 8, true);
        } else {
          #pragma unroll
          for (int i = 0; i < 16; ++i) {
            if (k0 + i < K) gx[row + k0 + i] = static_cast<T>(o[i]);
          }
        }
      }
    }
  }
}
"""

DX = KernelSpec(
    name="mhc_coefficients_dynamic_vjp_dx_mma",
    inputs=("gsa", "phb", "xin", "ctwo", "hpre", "dh", "gacc", "hres", "gres", "iparam"),
    outputs=("gx",),
    helpers=PTX_MMA + DX_HELPERS + DX_GROUP,
    body=r"""
  const int Ttok = iparam[0];
  const int K = iparam[1];
  const int Cw = iparam[3];  // channels per stream (PRE)
  const int kgroups = (K + 63) / 64;
  const int tt_all = (Ttok + 15) / 16;
  const int tgroups = (tt_all + MT - 1) / MT;
  const int gw = (int)(blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5));
  if (gw >= tgroups * kgroups) return;  // whole warps only: mma.sync needs all 32 lanes
  // TM: neighbouring warps share a token group (a block's 4 warps read 512 contiguous bytes of
  // each row of x, gacc and dx); else a k group (phi's fragments stay in L1, rows 128 B apart)
  const int kg = TM ? gw % kgroups : gw / tgroups;
  const int tg = TM ? gw / kgroups : gw - kg * tgroups;
  mhc_dx_group<T, N, MT, KSW, PRE, ACC, RES, RAW>(gsa, phb, xin, ctwo, hpre, dh, gacc, hres, gres, gx, Ttok, K, Cw, kg,
                                                  tg);
""",
)

# dphi partials [S, K, 8 NT] = x^T gs over each split of the tokens. A warp owns 64 k (four
# m-tiles: rows g, g + 8 of tile q are k = kb + 8g + 2q and kb + 8g + 2q + 1) and one split.
DPHI_STEP = r"""
// DPHI's A fragment of m-tile q from the words of tokens 2c, 2c + 1, 2c + 8, 2c + 9 (xs[u][q]:
// the pair k = kx + 2q, kx + 2q + 1): rows g (k even) and g + 8 (k odd), the same for mma.sync
// and wgmma.
__device__ __forceinline__ void mhc_dphi_a(const uint32_t (&xs)[4][4], int q, uint32_t (&af)[4]) {
  af[0] = (xs[0][q] & 0xffffu) | (xs[1][q] << 16);      // row g, tokens 2c, 2c+1
  af[1] = (xs[0][q] >> 16) | (xs[1][q] & 0xffff0000u);  // row g + 8
  af[2] = (xs[2][q] & 0xffffu) | (xs[3][q] << 16);      // row g, tokens 2c+8, 2c+9
  af[3] = (xs[2][q] >> 16) | (xs[3][q] & 0xffff0000u);  // row g + 8
}

// DPHI's step: 16 tokens from ts (below t1) into acc[q][j] for the lane's 8 k from kx (rows g,
// g + 8 of m-tile q are k = kx + 2q and kx + 2q + 1).
template <typename T, int NT, int PG, typename PX, typename PGS>
__device__ __forceinline__ void mhc_dphi_step(PX xin, PGS pgs, int t1, int K, int TS16, int ts, int kx, int lane, bool xvec,
                                              float (&acc)[4][NT][4]) {
  constexpr int AP = mhc_x_parts<T>::count;
  const int c = lane & 3;
  // tokens ts + 2c, ts + 2c + 1, ts + 2c + 8, ts + 2c + 9; word q = the pair (kx + 2q, kx + 2q + 1)
  uint32_t xh[4][4], xl[4][4];
  #pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int t = ts + 2 * c + (u & 1) + 8 * (u >> 1);
    uint32_t w[4];
    mhc_load_x8<T>(t < t1 ? xin + (int64_t)t * K : nullptr, kx, K, xvec, w);
    #pragma unroll
    for (int q = 0; q < 4; ++q) mhc_x_parts<T>::split(w[q], xh[u][q], xl[u][q]);
  }
  const int step = ts / 16;
  #pragma unroll
  for (int j = 0; j < NT; ++j) {
    #pragma unroll
    for (int p = 0; p < PG; ++p) {
      const uint2 bv = *reinterpret_cast<const uint2*>(pgs + ((((int64_t)j * TS16 + step) * PG + p) * 32 + lane) * 4);
      #pragma unroll
      for (int q = 0; q < 4; ++q) {
        #pragma unroll
        for (int part = 0; part < AP; ++part) {
          uint32_t af[4];
          mhc_dphi_a(part == 0 ? xh : xl, q, af);
          mhc_mma_bf16(acc[q][j], af, bv.x, bv.y);
        }
      }
    }
  }
}

// acc -> part[split, k, 8 NT] at the lane's k (kx + 2q + h) and columns 8j + 2c, 8j + 2c + 1
template <int NT, typename PP>
__device__ __forceinline__ void mhc_dphi_store(PP part, int split, int K, int kx, int lane, const float (&acc)[4][NT][4]) {
  constexpr int WP = 8 * NT;
  const int c = lane & 3;
  #pragma unroll
  for (int q = 0; q < 4; ++q) {
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k = kx + 2 * q + h;
      if (k < K) {
        float* out = part + ((int64_t)split * K + k) * WP;
        #pragma unroll
        for (int j = 0; j < NT; ++j) {
          out[8 * j + 2 * c] = acc[q][j][2 * h];
          out[8 * j + 2 * c + 1] = acc[q][j][2 * h + 1];
        }
      }
    }
  }
}
"""

DPHI = KernelSpec(
    name="mhc_coefficients_dynamic_vjp_dphi_mma",
    inputs=("xin", "pgs", "iparam"),
    outputs=("part",),
    helpers=PTX_MMA + X_PARTS + LOAD_X + DPHI_STEP,
    body=r"""
  const int Ttok = iparam[0];
  const int K = iparam[1];
  const int TPS = iparam[2];  // tokens per split, a multiple of 16
  const int S = iparam[3];
  const int TS16 = (Ttok + 15) / 16;
  const int kblocks = (K + 63) / 64;
  const int gw = (int)(blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5));
  if (gw >= kblocks * S) return;
  const int split = gw / kblocks;  // neighbouring warps share a split (gs stays in L1/L2)
  const int kb = (gw - split * kblocks) * 64;
  const int lane = (int)(threadIdx.x & 31u);
  const int kx = kb + 8 * (lane >> 2);
  const int t0 = split * TPS;
  const int t1 = min(Ttok, t0 + TPS);
  const bool xvec = (K % 8 == 0) && ((reinterpret_cast<unsigned long long>(xin) & 15ull) == 0ull);
  float acc[4][NT][4] = {};
  for (int ts = t0; ts < t1; ts += 16) mhc_dphi_step<T, NT, PG>(xin, pgs, t1, K, TS16, ts, kx, lane, xvec, acc);
  mhc_dphi_store<NT>(part, split, K, kx, lane, acc);
""",
)


# dphi partials by warpgroup MMA (DPHI_WGMMA, the default; bfloat16 x, n = 4, sm_90a): a block is
# one warpgroup owning 256 k (each warp its 64 k as DPHI's four m-tiles q) and one split of the
# tokens. Per 16-token step each thread loads its x words as DPHI does, builds DPHI's A fragments,
# and the warpgroup issues one m64n24k16 per tile q and part of gs: the 64 rows of wgmma q are
# tile q of the four warps, so its accumulators are DPHI's acc[q]. gs's parts for the step (in
# pack_gs_wg's order: [step][part][token half][column group][8 columns][8 tokens]) sit in shared
# memory, two buffers, the next step's x and gs loaded while this step's wgmma's run.
DPHI_WG = KernelSpec(
    name="mhc_coefficients_dynamic_vjp_dphi_wg",
    inputs=("xin", "pgs", "iparam"),
    outputs=("part",),
    helpers=PTX_MMA + PTX_WGMMA + WG_STAGE + X_PARTS + LOAD_X + DPHI_STEP,
    body=r"""
  constexpr int NT = 3;                      // 24 columns (n = 4)
  constexpr int ST16 = PG * 2 * NT * 64 / 8; // gs's 16-byte pieces per 16-token step
  KSHARED uint4 mhc_gs[2][ST16];
  const int Ttok = iparam[0];
  const int K = iparam[1];
  const int TPS = iparam[2];  // tokens per split, a multiple of 16
  const int S = iparam[3];
  const int kgroups = (K + 255) / 256;
  const int bid = (int)blockIdx.x;
  if (bid >= kgroups * S) return;  // whole blocks (warpgroup instructions and barriers below)
  const int split = bid / kgroups;  // neighbouring blocks share a split (gs stays in L2)
  const int kg = bid - split * kgroups;
  const int tid = (int)threadIdx.x;
  const int lane = tid & 31;
  const int c = lane & 3;
  const int kx = kg * 256 + 64 * (tid >> 5) + 8 * (lane >> 2);
  const int t0 = split * TPS;
  const int t1 = min(Ttok, t0 + TPS);
  const int nst = (t1 - t0 + 15) / 16;
  const bool xvec = (K % 8 == 0) && ((reinterpret_cast<unsigned long long>(xin) & 15ull) == 0ull);
  const uint4* gs4 = reinterpret_cast<const uint4*>(pgs);
  float acc[4][NT][4];
  #pragma unroll
  for (int q = 0; q < 4; ++q) {
    #pragma unroll
    for (int j = 0; j < NT; ++j) {
      #pragma unroll
      for (int e = 0; e < 4; ++e) acc[q][j][e] = 0.0f;
    }
  }
  uint32_t xw[4][4];  // [u][word]: tokens ts + 2c + (u & 1) + 8 (u >> 1), k kx .. kx + 8
  uint32_t xn[4][4];  // ... of the next step
  auto load_x = [&](int step, uint32_t (&dst)[4][4]) {
    const int ts = t0 + 16 * step;
    #pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int t = ts + 2 * c + (u & 1) + 8 * (u >> 1);
      mhc_load_x8<T>(t < t1 ? xin + (int64_t)t * K : nullptr, kx, K, xvec, dst[u]);
    }
  };
  auto products = [&](int buf) {
    uint32_t af[4][4];  // DPHI's A fragment of tile q (bfloat16 x: the words are the parts)
    #pragma unroll
    for (int q = 0; q < 4; ++q) mhc_dphi_a(xw, q, af[q]);
    mhc_wg_fence();
    #pragma unroll
    for (int p = 0; p < PG; ++p) {
      // core matrices of 8 columns x 8 tokens: along the tokens 128 NT bytes apart, along the
      // columns 128 (the reading the forward's MMA_WG confirmed)
      const uint64_t desc = mhc_wg_desc(&mhc_gs[buf][p * 2 * NT * 8], 128 * NT, 128);
      #pragma unroll
      for (int q = 0; q < 4; ++q) mhc_wgmma_n24(*reinterpret_cast<float(*)[12]>(&acc[q][0][0]), af[q], desc);
    }
    mhc_wg_commit();
    mhc_wg_wait();
  };
  // the split's first step
  mhc_wg_steps<ST16>(nst, gs4 + (int64_t)(t0 / 16) * ST16, mhc_gs, tid, xw, xn, load_x, products);
  mhc_dphi_store<NT>(part, split, K, kx, lane, acc);
""",
)


def pack_gs_wg(gs: mx.array, parts: int = DPHI_PARTS) -> mx.array:
    """gs [T, 24] float32 -> DPHI_WG's order (see pack_gs_wg_reference), in one launch
    (coefficients_mma.PACK_WG)."""
    return coefficients_mma.pack_wg(gs, parts, False)


def pack_gs_wg_reference(gs: mx.array, parts: int = DPHI_PARTS) -> mx.array:
    """gs [T, 24] float32 -> [T / 16 steps, parts, 2 token halves, 3 column groups, 8 columns, 8
    tokens] bfloat16 parts adding up to gs (zeros past T), the K-major, unswizzled B of a wgmma
    over 16 tokens (MLX ops: the statement coefficients_mma.PACK_WG is tested against)."""
    T, W = gs.shape
    steps = -(-T // 16)
    split = coefficients_mma.bf16_parts(mx.pad(gs.astype(F32), [(0, 16 * steps - T), (0, 0)]), parts)
    a = split.reshape(parts, steps, 2, 8, 3, 8)  # [p, step, half, token, ng, n8]
    return a.transpose(1, 0, 2, 4, 5, 3)


def dphi_wg_applies(x2: mx.array, W: int) -> bool:
    """DPHI_WG takes dphi: DPHI_WGMMA on (the default) and coefficients_mma.warpgroup_fits."""
    return DPHI_WGMMA and coefficients_mma.warpgroup_fits(x2, W)


# Candidate (coefficients.GLUE_PACKS; passed the H200 checks on 2026-11-30, not faster there
# beyond the runs' spread; its after-split form timed, not checked, in the fourth session: 672.1
# against 674.2 µs, docs/kernel-notes.md row 37): the dynamic backward's glue kernel also writes
# gs in the two fragment orders DX and dphi read (as pack_a(gs, DX_PARTS) and, for dphi,
# pack_b(gs, DPHI_PARTS, False) or, where DPHI_WG takes it (wg), pack_gs_wg(gs) would), saving
# their two launches (26.9 µs per application chained for pack_a at 4096 tokens on the H200,
# docs/kernel-notes.md row 28; 3.3 µs each alone under Nsight Compute with the parameter arrays
# in GPU memory, row 94). Each thread of the glue owns one token, i.e. one row of gs: it re-reads
# the row it wrote and scatters it, rows up to the next multiple of 16 and columns up to the
# fragments' width written as zeros, as the packs pad. CUDA only (bfloat16 parts), like DX and DPHI.
@lru_cache(maxsize=None)
def glue_packs_spec(after_sinkhorn: bool = False, wg: bool = False) -> KernelSpec:
    """after_sinkhorn: the form of coefficients.DYNAMIC_VJP_GLUE_AFTER_SINKHORN (SPLIT_GLUE_SINKHORN);
    wg: dphi's fragments in DPHI_WG's order (pack_gs_wg's) instead of DPHI's (pack_b's)."""
    from . import coefficients  # (coefficients imports this module lazily)

    base = coefficients.DYNAMIC_VJP_GLUE_AFTER_SINKHORN if after_sinkhorn else coefficients.DYNAMIC_VJP_GLUE

    dx_order = r"""
  if (live) ctwo[t] = ir * ir / (float)K * s;
  {
    constexpr int KSA = (W + 15) / 16;  // DX's A fragments: k-steps of 16 columns of gs
    const int64_t rows16 = ((int64_t)Ttok + 15) / 16 * 16;
    if (t < rows16) {
      const int64_t rt = t >> 4;
      const int rr = (int)(t & 15);
      KUNROLL for (int c = 0; c < 16 * KSA; ++c) {
        float v = (live && c < W) ? gsc[t * W + c] : 0.0f;
        const int cc = c & 15;
        const int lane = (rr & 7) * 4 + ((cc & 7) >> 1);
        const int e = (((((cc >> 3) << 1) | (rr >> 3))) << 1) | (cc & 1);
        KUNROLL for (int p = 0; p < PA; ++p) {
          const __nv_bfloat16 b = __float2bfloat16_rn(v);
          gsa[(((rt * KSA + (c >> 4)) * PA + p) * 32 + lane) * 8 + e] = b;
          v -= __bfloat162float(b);
        }
      }"""
    dphi_order = r"""
      constexpr int NTB = (W + 7) / 8;    // DPHI's B fragments: n-tiles of 8 columns of gs
      const int64_t ksb = rows16 >> 4;
      KUNROLL for (int c = 0; c < 8 * NTB; ++c) {
        float v = (live && c < W) ? gsc[t * W + c] : 0.0f;
        const int lane = (c & 7) * 4 + ((rr & 7) >> 1);
        const int e = ((rr >> 3) << 1) | (rr & 1);
        KUNROLL for (int p = 0; p < PB; ++p) {
          const __nv_bfloat16 b = __float2bfloat16_rn(v);
          gsb[((((int64_t)(c >> 3) * ksb + rt) * PB + p) * 32 + lane) * 4 + e] = b;
          v -= __bfloat162float(b);
        }
      }
    }
  }"""
    # DPHI_WG's B (pack_gs_wg, coefficients_mma.PACK_WG unpermuted): [step, part, token half,
    # column group, 8 columns, 8 tokens], W = 24
    dphi_wg_order = r"""
      KUNROLL for (int c = 0; c < W; ++c) {
        float v = live ? gsc[t * W + c] : 0.0f;
        KUNROLL for (int p = 0; p < PB; ++p) {
          const __nv_bfloat16 b = __float2bfloat16_rn(v);
          gsb[(((rt * PB + p) * 2 + (rr >> 3)) * 3 + (c >> 3)) * 64 + (c & 7) * 8 + (rr & 7)] = b;
          v -= __bfloat162float(b);
        }
      }
    }
  }"""
    epilogue = dx_order + (dphi_wg_order if wg else dphi_order)
    return KernelSpec(
        name=base.name + ("_packs_wg" if wg else "_packs"),
        inputs=base.inputs,
        outputs=(*base.outputs, "gsa", "gsb"),
        body=edited(base.body, [("\n  if (live) ctwo[t] = ir * ir / (float)K * s;", epilogue)]),
    )


def packed_shapes(T: int, W: int, wg: bool = False) -> tuple[tuple, tuple]:
    """The shapes of gs's fragments for DX (pack_a, DX_PARTS) and dphi: DPHI's (pack_b,
    DPHI_PARTS), or with wg DPHI_WG's (pack_gs_wg)."""
    dphi_shape = ((-(-T // 16), DPHI_PARTS, 2, 3, 8, 8) if wg
                  else (-(-W // 8), -(-T // 16), DPHI_PARTS, 32, 4))
    return (-(-T // 16), -(-W // 16), DX_PARTS, 32, 8), dphi_shape


def pack_a(mat: mx.array, parts: int) -> mx.array:
    R, KD = mat.shape
    total = -(-R // 16) * -(-KD // 16) * 256
    return launch(PACK_A, [mat.astype(F32), int_params(R, KD)],
                  [((-(-R // 16), -(-KD // 16), parts, 32, 8), mx.bfloat16)],
                  -(-total // 256) * 256, 256, [("P", parts)])[0]


def pack_b(src: mx.array, parts: int, transposed: bool, perm64: bool = False) -> mx.array:
    """B fragments of B = src^T (transposed) or B = src, src float32 2-d (perm64: PACK_B's
    column order for DX)."""
    KD, NN = (src.shape[1], src.shape[0]) if transposed else src.shape
    tiles = 8 * -(-NN // 64) if perm64 else -(-NN // 8)
    total = tiles * -(-KD // 16) * 128
    return launch(PACK_B, [src.astype(F32), int_params(KD, NN)],
                  [((tiles, -(-KD // 16), parts, 32, 4), mx.bfloat16)],
                  -(-total // 256) * 256, 256, [("P", parts), ("TRANS", transposed), ("PERM64", perm64)])[0]


def streams_of_width(W: int) -> int:
    """n for the coefficient width W = n (n + 2)."""
    return round((W + 1) ** 0.5) - 1


def _token_splits(T: int, kgroups: int, tokens_per_step: int, target_warps: int) -> tuple[int, int]:
    """(tokens per split, splits) for warps that each own one group of 64 k and walk one split of
    the T tokens tokens_per_step at a time: about target_warps warps in all."""
    steps = -(-T // tokens_per_step)
    splits = max(1, min(-(-target_warps // kgroups), steps))
    tps = tokens_per_step * -(-steps // splits)
    return tps, -(-T // tps)


def _dx_extras(x2, T, K, n, pre, gacc, res=None):
    """DX's optional inputs as (arrays, template flags): (H_pre, dh) for PRE, gacc for ACC and
    (H_res, g) for RES, one-element stand-ins where absent."""
    f32, xd = standin(F32), standin(x2.dtype)
    hpre, dh = (f32, xd) if pre is None else (pre[0].astype(F32).reshape(T, n), pre[1].astype(x2.dtype).reshape(T, K // n))
    acc = xd if gacc is None else gacc.astype(x2.dtype).reshape(T, K)
    hres, g = (f32, xd) if res is None else (res[0].astype(F32).reshape(T, n * n), res[1].astype(x2.dtype).reshape(T, K))
    flags = [("PRE", pre is not None), ("ACC", gacc is not None), ("RES", res is not None)]
    return [hpre, dh, acc, hres, g], flags


def dx(x2, phi, gs, c2, pre=None, gacc=None, gsa=None, res=None):
    """dx [T, K] in x's dtype; pre: (H_pre [T, n], dh [T, C]) adds pre's share, gacc (any shape of
    T * K elements) adds x's cotangent from later in the site, res: (H_res [T, n, n], g [T, n, C])
    adds post's deferred share H_res^T g, all in the same pass. gsa: gs already in DX's fragment
    order (the glue kernel's, GLUE_PACKS), else packed here."""
    T, K = x2.shape
    W = phi.shape[1]
    n = streams_of_width(W)
    ksw = -(-W // 16)
    tgroups = -(-(-(-T // 16)) // DX_TOKEN_TILES)
    kgroups = -(-K // 64)
    warps = tgroups * kgroups
    extras, flags = _dx_extras(x2, T, K, n, pre, gacc, res)
    return launch(
        DX, [pack_a(gs, DX_PARTS) if gsa is None else gsa, pack_b(phi, DX_PARTS, True, perm64=True), x2, c2.astype(F32),
             *extras, int_params(T, K, 0, K // n)],
        [((T, K), x2.dtype)], -(-warps // WARPS_PER_BLOCK) * WARPS_PER_BLOCK * 32, WARPS_PER_BLOCK * 32,
        [("T", x2.dtype), ("N", n), ("MT", DX_TOKEN_TILES), ("KSW", ksw), *flags, ("TM", DX_TOKEN_MAJOR),
         ("RAW", DX_RAW_ROWS)],
    )[0]


def dphi(x2, gs, gsb=None):
    """x2^T gs [K, W] float32 for 16-bit x2 [T, K] and float32 gs [T, W] (gsb: gs already in the
    fragment order of the kernel that takes it, DPHI_WG's where dphi_wg_applies, else DPHI's;
    else packed here)."""
    T, K = x2.shape
    W = gs.shape[1]
    if dphi_wg_applies(x2, W):
        kgroups = -(-K // 256)
        tps, splits = _token_splits(T, kgroups, 16, DPHI_WG_TARGET_BLOCKS)
        gsw = pack_gs_wg(gs) if gsb is None else gsb
        part = launch(DPHI_WG, [x2, gsw, int_params(T, K, tps, splits)], [((splits, K, 24), F32)],
                      kgroups * splits * 128, 128, [("T", x2.dtype), ("PG", DPHI_PARTS)])[0]
        return mx.sum(part, axis=0)
    NT = -(-W // 8)
    kblocks = -(-K // 64)
    tps, splits = _token_splits(T, kblocks, 16, TARGET_WARPS)
    warps = kblocks * splits
    part = launch(
        DPHI, [x2, pack_b(gs, DPHI_PARTS, False) if gsb is None else gsb, int_params(T, K, tps, splits)],
        [((splits, K, 8 * NT), F32)], -(-warps // WARPS_PER_BLOCK) * WARPS_PER_BLOCK * 32,
        WARPS_PER_BLOCK * 32, [("T", x2.dtype), ("NT", NT), ("PG", DPHI_PARTS)],
    )[0]
    return mx.sum(part, axis=0)[:, :W]


def vjp_x_phi(x2, phi, gs, c2, pre=None, gacc=None, packed=None):
    """(dxf [T, K] in x's dtype, dphi [K, W] float32), as coefficients.dynamic_vjp_x_phi.
    packed: (gsa, gsb), gs in both fragment orders (glue_packs_spec), or None."""
    gsa, gsb = packed if packed is not None else (None, None)
    return dx(x2, phi, gs, c2, pre, gacc, gsa), dphi(x2, gs, gsb)


watch(__name__)  # settings assigned later bump build.settings_epoch
