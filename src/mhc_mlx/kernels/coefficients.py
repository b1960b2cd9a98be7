"""Site coefficients: H_pre = sigmoid, H_post = 2 sigmoid, H_res = Sinkhorn, per token or static.

Static (one set for all tokens): one warp turns the logits into the three coefficients.
Dynamic: one kernel reads x once for both the GEMM xf @ phi and the sum of squares, then
each warp finishes its tokens (scale, bias, activations, Sinkhorn) without leaving the block.
The backward of the GEMM part is one more kernel that reads x once for both dx and dphi.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from ..compiled import matmul
from ..compiled.site import scale_index
from . import build
from . import sinkhorn as sk
from .build import KernelSpec, edited, float_params, int_params, launch, watch

F32 = mx.float32
MAX_N_DYNAMIC = 8  # W = n(n+2) <= 80 accumulators per lane in the fused kernels
# Dynamic coefficients for MAX_N_DYNAMIC < n <= 32 on the kernel path ("wide n"): xf @ phi and
# the backward's two products as float32-exact MLX matmuls (matmul.product), the activations and
# Sinkhorn by ACTIVATE (one warp per token, the transpose-reduce Sinkhorn), the Sinkhorn backward
# by its kernel. Default since H200 2026-11-30 (docs/kernel-notes.md row 26: 1.5-2.3x the
# compiled path). False: those n take the compiled path (kernels/__init__.py gives the reason).
WIDE_N = True

ACTIVATE = KernelSpec(
    name="mhc_coefficients_static",
    inputs=("rpre", "rpost", "rres", "iparam"),
    outputs=("hpre", "hpost", "hres"),
    body=r"""
  const int M = iparam[0];
  const int iters = iparam[1];
  const int lane = KLANE;
  const int row = KBID * (KNT / 32) + KWARP;
  const bool live = (row < M) && (lane < N);
  if (live) {
    hpre[row * N + lane] = ksigmoid(rpre[row * N + lane]);
    hpost[row * N + lane] = 2.0f * ksigmoid(rpost[row * N + lane]);
  }
  const int64_t base = (int64_t)row * N * N;
  float col[N];
  KUNROLL for (int i = 0; i < N; ++i) col[i] = live ? rres[base + i * N + lane] : 0.0f;
  ksinkhorn_warp<N>(col, live, iters);
  if (live) {
    KUNROLL for (int i = 0; i < N; ++i) hres[base + i * N + lane] = col[i];
  }
""",
)

# Block of 256 threads = 8 warps; TB tokens per block; chunks of KC columns of xf. Per chunk,
# the x tile (transposed) and the matching KC rows of phi are staged in shared memory with
# coalesced loads -- the next chunk's values are already in registers while this one is used
# (software pipelining: the load latency hides behind the FMAs). Warp w then takes KC/8 of the
# columns, lane l output columns l, l+32, ..., and accumulates TB dot products per column.
# The sums of squares come from the same loads.
DYNAMIC = KernelSpec(
    name="mhc_coefficients_dynamic",
    inputs=("xin", "phi", "alpha", "bias", "iparam", "fparam"),
    outputs=("hpre", "hpost", "hres", "mraw", "invr"),
    body=r"""
  constexpr int W = N * (N + 2);
  constexpr int R = (W + 31) / 32;
  constexpr int KC = W <= 32 ? 128 : 64;
  constexpr int RG = 256 / KC;          // row groups in the x tile load
  constexpr int XQ = TB / RG;           // x values per thread per chunk
  constexpr int PQ = (KC * W + 255) / 256;  // phi values per thread per chunk
  constexpr int XS = TB + 4;
  constexpr int TILE = KC * XS + KC * W;
  constexpr int RED = 8 * TB * W;
  constexpr int SMEM = TILE > RED ? TILE : RED;
  KSHARED float4 tile4[(SMEM + 3) / 4];
  KSHARED float ssq[8 * XQ];
  KSHPTR(float) tile = reinterpret_cast<KSHPTR(float)>(tile4);
  KSHPTR(float) phis = tile + KC * XS;
  const int Ttok = iparam[0];
  const int K = iparam[1];
  const int iters = iparam[2];
  const float eps = fparam[0];
  const int tid = KTID;
  const int lane = KLANE;
  const int warp = KWARP;
  const int t0 = KBID * TB;
  const int kx = tid % KC;   // this thread's column in the x tile
  const int qx = tid / KC;   // its first row; rows qx + RG * j

  float acc[R][TB];
  float sq[XQ];
  float xn[XQ];
  float pn[PQ];
  KUNROLL for (int q = 0; q < TB; ++q) {
    KUNROLL for (int r = 0; r < R; ++r) acc[r][q] = 0.0f;
  }
  KUNROLL for (int j = 0; j < XQ; ++j) sq[j] = 0.0f;
  // prefetch chunk 0
  KUNROLL for (int j = 0; j < XQ; ++j) {
    const int t = t0 + qx + RG * j;
    xn[j] = (kx < K && t < Ttok) ? static_cast<float>(xin[(int64_t)t * K + kx]) : 0.0f;
  }
  KUNROLL for (int j = 0; j < PQ; ++j) {
    const int a = tid + 256 * j;
    pn[j] = (a < KC * W && a < K * W) ? phi[a] : 0.0f;
  }
  for (int kb = 0; kb < K; kb += KC) {
    KUNROLL for (int j = 0; j < XQ; ++j) {
      sq[j] += xn[j] * xn[j];
      tile[kx * XS + qx + RG * j] = xn[j];
    }
    KUNROLL for (int j = 0; j < PQ; ++j) {
      const int a = tid + 256 * j;
      if (a < KC * W) phis[a] = pn[j];
    }
    KBARRIER();
    const int kn = kb + KC;
    if (kn < K) {  // prefetch the next chunk while this one is used
      KUNROLL for (int j = 0; j < XQ; ++j) {
        const int t = t0 + qx + RG * j;
        xn[j] = (kn + kx < K && t < Ttok) ? static_cast<float>(xin[(int64_t)t * K + kn + kx]) : 0.0f;
      }
      KUNROLL for (int j = 0; j < PQ; ++j) {
        const int a = tid + 256 * j;
        pn[j] = (a < KC * W && (int64_t)kn * W + a < (int64_t)K * W) ? phi[(int64_t)kn * W + a] : 0.0f;
      }
    }
    KUNROLL for (int u = 0; u < KC / 8; ++u) {
      const int kk = warp * (KC / 8) + u;
      float ph[R];
      KUNROLL for (int r = 0; r < R; ++r) {
        const int c = lane + 32 * r;
        ph[r] = c < W ? phis[kk * W + c] : 0.0f;
      }
      KUNROLL for (int q4 = 0; q4 < TB / 4; ++q4) {
        const float4 xv = tile4[(kk * XS) / 4 + q4];
        KUNROLL for (int r = 0; r < R; ++r) {
          acc[r][4 * q4 + 0] += ph[r] * xv.x;
          acc[r][4 * q4 + 1] += ph[r] * xv.y;
          acc[r][4 * q4 + 2] += ph[r] * xv.z;
          acc[r][4 * q4 + 3] += ph[r] * xv.w;
        }
      }
    }
    KBARRIER();
  }
  // Sums of squares: rows qx + RG*j; warp sums, then across the warps sharing a row group.
  KUNROLL for (int j = 0; j < XQ; ++j) {
    const float s = kwarp_sum(sq[j]);
    if (lane == 0) ssq[warp * XQ + j] = s;
  }
  // Dot products: per-warp partials into shared memory (the tiles are free now).
  KUNROLL for (int q = 0; q < TB; ++q) {
    KUNROLL for (int r = 0; r < R; ++r) {
      const int c = lane + 32 * r;
      if (c < W) tile[(warp * TB + q) * W + c] = acc[r][q];
    }
  }
  KBARRIER();
  for (int idx = tid; idx < TB * W; idx += KNT) {
    float d = 0.0f;
    for (int w = 0; w < 8; ++w) d += tile[w * TB * W + idx];
    tile[idx] = d;
  }
  KBARRIER();
  // Finish: warp w takes tokens w, w + 8, ...: m = dot / r, h = m * alpha + bias, activations.
  for (int q = warp; q < TB; q += 8) {
    const int t = t0 + q;
    const bool tl = t < Ttok;
    float ss = 0.0f;
    const int g = q % RG;  // row group of row q: warps whose qx == g, i.e. tid / KC == g
    for (int w = 0; w < 8; ++w)
      if ((w * 32) / KC == g) ss += ssq[w * XQ + (q - g) / RG];
    const float rr = KSQRT(ss / (float)K + eps);
    KUNROLL for (int r = 0; r < R; ++r) {
      const int c = lane + 32 * r;
      if (c < W) {
        const float m = tile[q * W + c] / rr;
        const float a = alpha[c < N ? 0 : (c < 2 * N ? 1 : 2)];
        if (tl) mraw[(int64_t)t * W + c] = m;
        tile[q * W + c] = m * a + bias[c];
      }
    }
    if (tl && lane == 0) invr[t] = 1.0f / rr;
    KWARP_SYNC();
    const bool live = tl && (lane < N);
    if (live) {
      hpre[(int64_t)t * N + lane] = ksigmoid(tile[q * W + lane]);
      hpost[(int64_t)t * N + lane] = 2.0f * ksigmoid(tile[q * W + N + lane]);
    }
    float col[N];
    KUNROLL for (int i = 0; i < N; ++i) col[i] = live ? tile[q * W + 2 * N + i * N + lane] : 0.0f;
    ksinkhorn_warp<N>(col, live, iters);
    if (live) {
      KUNROLL for (int i = 0; i < N; ++i) hres[((int64_t)t * N + i) * N + lane] = col[i];
    }
  }
""",
)

# The read step's one-launch forward (pre_step.py, the kernel form): DYNAMIC, then pre's output
# h[t, c] = sum_i H_pre[t, i] x[t, i C + c] for the block's tokens, from the logits still in the
# tile (the block's x is in L1/L2 by then). Same sum order as site.PRE, so h is the same as
# the two launches give. Saves a launch where launches dominate (few tokens).
_PRE_EPILOGUE = r"""
  KSHARED float hps[TB * N];
  KBARRIER();
  for (int idx = tid; idx < TB * N; idx += KNT) hps[idx] = ksigmoid(tile[(idx / N) * W + idx % N]);
  KBARRIER();
  const int Cw = K / N;  // channels per stream
  for (int idx = tid; idx < TB * Cw; idx += KNT) {
    const int q = idx / Cw;
    const int c = idx - q * Cw;
    const int t = t0 + q;
    if (t < Ttok) {
      float s = 0.0f;
      KUNROLL for (int i = 0; i < N; ++i) s += hps[q * N + i] * static_cast<float>(xin[(int64_t)t * K + i * Cw + c]);
      hout[(int64_t)t * Cw + c] = static_cast<T>(s);
    }
  }
"""

DYNAMIC_PRE = KernelSpec(
    name="mhc_coefficients_dynamic_pre",
    inputs=DYNAMIC.inputs,
    outputs=DYNAMIC.outputs + ("hout",),
    body=DYNAMIC.body + _PRE_EPILOGUE,
)

# The kernel form for a few tokens (up to SMALL_TOKENS, below), one threadgroup of SMALL_THREADS
# per token. DYNAMIC at B = 1 is one block walking K in KC-wide
# chunks, each staged through shared memory between barriers, with one chunk in flight: on the
# H100 the B = 1 coefficient kernel took 36 µs (ncu, 2026-11-25). Here thread i takes rows
# i, i + 256, ... of x and phi with every load independent of the last, the W partial dot
# products are summed over the warps, and warp 0 finishes as DYNAMIC does (the same outputs, the
# dot products summed in another order).
SMALL_THREADS = 256
_SMALL_BODY = r"""
  constexpr int W = N * (N + 2);
  constexpr int NW = 256 / 32;  // warps (launched with SMALL_THREADS = 256)
  KSHARED float red[NW * W];
  KSHARED float ssq[NW];
  KSHARED float lg[W];
  const int K = iparam[1];
  const int iters = iparam[2];
  const float eps = fparam[0];
  const int64_t t = KBID;  // one token per threadgroup
  const int tid = KTID;
  const int lane = KLANE;
  const int warp = KWARP;
  float acc[W];
  KUNROLL for (int c = 0; c < W; ++c) acc[c] = 0.0f;
  float sq = 0.0f;
  for (int k = tid; k < K; k += KNT) {
    const float xv = static_cast<float>(xin[t * K + k]);
    sq += xv * xv;
    KUNROLL for (int c = 0; c < W; ++c) acc[c] += xv * phi[(int64_t)k * W + c];
  }
  KUNROLL for (int c = 0; c < W; ++c) {
    const float v = kwarp_sum(acc[c]);
    if (lane == 0) red[warp * W + c] = v;
  }
  {
    const float v = kwarp_sum(sq);
    if (lane == 0) ssq[warp] = v;
  }
  KBARRIER();
  if (warp == 0) {
    float ss = 0.0f;
    for (int w = 0; w < NW; ++w) ss += ssq[w];
    const float rr = KSQRT(ss / (float)K + eps);
    mhc_dyn_finish<N>(red, W, NW, rr, alpha, bias, mraw, lg, invr, hpre, hpost, hres, t, lane, iters);
  }
"""
# Warp 0's finish of one token (DYNAMIC_SMALL, DYNAMIC_SPLIT_FINISH): each of the W dot products
# summed from `count` partials src[j * stride + c] (lane c + 32 r holds column c), scaled by
# 1 / rr; then the logits, 1 / rr, H_pre, H_post and the Sinkhorn of the res logits.
_FINISH_HELPER = r"""
template <int N, typename PS, typename PA, typename PB, typename PM, typename PI, typename PP, typename PQ,
          typename PR>
KDEV void mhc_dyn_finish(PS src, int stride, int count, float rr, PA alpha, PB bias, PM mraw, KSHPTR(float) lg,
                         PI invr, PP hpre, PQ hpost, PR hres, int64_t t, int lane, int iters) {
  constexpr int W = N * (N + 2);
  constexpr int R = (W + 31) / 32;
  KUNROLL for (int r = 0; r < R; ++r) {
    const int c = lane + 32 * r;
    if (c < W) {
      float d = 0.0f;
      for (int j = 0; j < count; ++j) d += src[j * stride + c];
      const float m = d / rr;
      const float a = alpha[c < N ? 0 : (c < 2 * N ? 1 : 2)];
      mraw[t * W + c] = m;
      lg[c] = m * a + bias[c];
    }
  }
  if (lane == 0) invr[t] = 1.0f / rr;
  KWARP_SYNC();
  const bool live = lane < N;
  if (live) {
    hpre[t * N + lane] = ksigmoid(lg[lane]);
    hpost[t * N + lane] = 2.0f * ksigmoid(lg[N + lane]);
  }
  float col[N];
  KUNROLL for (int i = 0; i < N; ++i) col[i] = live ? lg[2 * N + i * N + lane] : 0.0f;
  ksinkhorn_warp<N>(col, live, iters);
  if (live) {
    KUNROLL for (int i = 0; i < N; ++i) hres[(t * N + i) * N + lane] = col[i];
  }
}
"""
# Each warp's sums of the W + 1 columns of acc (W products and x^2) into red[warp * (W + 1) + c]:
# one transpose-reduce (lane c gets column c, 31 shuffles) where W + 1 <= 32, else a warp sum a
# column (DYNAMIC_SPLIT_PARTIAL, DYNAMIC_ONE).
_WARP_SUMS_HELPER = r"""
template <int W>
KDEV void mhc_dyn_warp_sums(KTHREAD float* acc, KSHPTR(float) red, int lane, int warp) {
  if (W + 1 <= 32) {
    const float v = ktranspose_row_sum<(W + 1 <= 32 ? W + 1 : 1)>(acc);
    if (lane <= W) red[warp * (W + 1) + lane] = v;
  } else {
    KUNROLL for (int c = 0; c <= W; ++c) {
      const float v = kwarp_sum(acc[c]);
      if (lane == 0) red[warp * (W + 1) + c] = v;
    }
  }
}
"""
# The read step's h for token t, h = sum_i hp_i x_i over its K / N channels (as site.PRE sums it),
# by threads s of S (DYNAMIC_SPLIT_FINISH, DYNAMIC_ONE: the warps beside warp 0's finish).
_WRITE_H_HELPER = r"""
template <typename T, int N, int V, typename PX, typename PH>
KDEV void mhc_dyn_write_h(KTHREAD const float* hp, PX xin, PH hout, int64_t t, int K, int s, int S) {
  const int CW = K / N;
  const bool vec = KALIGNED16(xin) && KALIGNED16(hout);
  for (int cv = s; cv < CW / V; cv += S) {
    float xh[N * V];
    KUNROLL for (int i = 0; i < N; ++i) kload<T, V>(xh + i * V, xin, t * K + (int64_t)i * CW + (int64_t)cv * V, vec);
    float o[V];
    KUNROLL for (int e = 0; e < V; ++e) {
      float v = 0.0f;
      KUNROLL for (int i = 0; i < N; ++i) v += hp[i] * xh[i * V + e];
      o[e] = v;
    }
    kstore<T, V>(hout, t * CW + (int64_t)cv * V, o, vec);
  }
}
"""
DYNAMIC_SMALL = KernelSpec(
    name="mhc_coefficients_dynamic_small",
    inputs=DYNAMIC.inputs,
    outputs=DYNAMIC.outputs,
    helpers=_FINISH_HELPER,
    body=_SMALL_BODY,
)
# ... and the read step's h, as DYNAMIC_PRE (same sum order as site.PRE)
DYNAMIC_SMALL_PRE = KernelSpec(
    name="mhc_coefficients_dynamic_small_pre",
    inputs=DYNAMIC.inputs,
    outputs=DYNAMIC.outputs + ("hout",),
    helpers=_FINISH_HELPER,
    body=_SMALL_BODY + r"""
  KSHARED float hps[N];
  KBARRIER();
  if (tid < N) hps[tid] = ksigmoid(lg[tid]);
  KBARRIER();
  const int Cw = K / N;  // channels per stream
  for (int c = tid; c < Cw; c += KNT) {
    float s = 0.0f;
    KUNROLL for (int i = 0; i < N; ++i) s += hps[i] * static_cast<float>(xin[t * K + i * Cw + c]);
    hout[t * Cw + c] = static_cast<T>(s);
  }
""",
)
# The same few-token forward split over the GPU (coefficients.SPLIT_SMALL): at B = 1 the one
# threadgroup of DYNAMIC_SMALL_PRE read all of phi ([n*C, W] float32, 196 KB at n = 4, C = 512)
# through one SM, 12.2 µs of GPU time against 2.9 for post (H200, 2026-11-30, eighth session,
# gpu_experiments.py b1-trace; the launch's GPU time adds to a B = 1 eval, see layer.LAYER_LATENCY).
# DYNAMIC_SPLIT_PARTIAL: T * P threadgroups of 256 threads, P = ceil(K / 256), each thread one row
# of x and phi: its W products and x^2, summed over the threadgroup into part [T, P, W + 1].
# DYNAMIC_SPLIT_FINISH: one threadgroup per token; warp 0 sums the P partials and finishes as
# DYNAMIC_SMALL does (the same outputs, the dot products summed in another order); with PRE the
# stream threads (warps 1..) compute H_pre from the same partials themselves, so h = sum_i H_pre_i
# x_i needs no barrier and no wait for the Sinkhorn. K, the iterations and eps are template
# constants: nothing waits on a parameter array.
SPLIT_ROWS = 256  # rows of x and phi per partial threadgroup (one a thread)
DYNAMIC_SPLIT_PARTIAL = KernelSpec(
    name="mhc_coefficients_split_partial",
    inputs=("xin", "phi"),
    outputs=("part",),
    helpers=_WARP_SUMS_HELPER,
    body=r"""
  constexpr int W = N * (N + 2);
  constexpr int P = (K + 255) / 256;  // launched with SPLIT_ROWS = 256 threads
  constexpr int NW = 256 / 32;
  KSHARED float red[NW * (W + 1)];
  const int64_t t = KBID / P;
  const int p = KBID % P;
  const int lane = KLANE;
  const int warp = KWARP;
  const int k = p * 256 + KTID;
  float acc[W + 1];
  if (k < K) {
    const float xv = static_cast<float>(xin[t * K + k]);
    float ph[W];
    if (W % 4 == 0) {
      const bool vec = KALIGNED16(phi);
      KUNROLL for (int q = 0; q < W / 4; ++q) kload<float, 4>(ph + 4 * q, phi, (int64_t)k * W + 4 * q, vec);
    } else {
      KUNROLL for (int c = 0; c < W; ++c) ph[c] = phi[(int64_t)k * W + c];
    }
    KUNROLL for (int c = 0; c < W; ++c) acc[c] = xv * ph[c];
    acc[W] = xv * xv;
  } else {
    KUNROLL for (int c = 0; c <= W; ++c) acc[c] = 0.0f;
  }
  mhc_dyn_warp_sums<W>(acc, red, lane, warp);
  KBARRIER();
  for (int c = KTID; c <= W; c += KNT) {
    float v = 0.0f;
    for (int w = 0; w < NW; ++w) v += red[w * (W + 1) + c];
    part[(t * P + p) * (W + 1) + c] = v;
  }
""",
)
DYNAMIC_SPLIT_FINISH = KernelSpec(
    name="mhc_coefficients_split_finish",
    inputs=("xin", "part", "alpha", "bias"),
    outputs=("hpre", "hpost", "hres", "mraw", "invr", "hout"),
    helpers=_FINISH_HELPER + _WRITE_H_HELPER,
    body=r"""
  constexpr int W = N * (N + 2);
  constexpr int P = (K + 255) / 256;
  KSHARED float lg[W];
  const float eps = KBITS_FLOAT(EPS_BITS);
  const int64_t t = KBID;
  const int lane = KLANE;
  const int warp = KWARP;
  const int64_t row = t * P * (W + 1);
  if (warp == 0) {
    float ss = 0.0f;
    for (int p = 0; p < P; ++p) ss += part[row + p * (W + 1) + W];
    const float rr = KSQRT(ss / (float)K + eps);
    mhc_dyn_finish<N>(part + row, W + 1, P, rr, alpha, bias, mraw, lg, invr, hpre, hpost, hres, t, lane, ITERS);
  } else if (PRE) {
    // h = sum_i H_pre_i x_i (as site.PRE sums it), H_pre from the partials as warp 0 computes it
    float ss = 0.0f;
    for (int p = 0; p < P; ++p) ss += part[row + p * (W + 1) + W];
    const float rr = KSQRT(ss / (float)K + eps);
    float hp[N];
    KUNROLL for (int i = 0; i < N; ++i) {
      float d = 0.0f;
      for (int p = 0; p < P; ++p) d += part[row + p * (W + 1) + i];
      hp[i] = ksigmoid(d / rr * alpha[0] + bias[i]);
    }
    mhc_dyn_write_h<T, N, V>(hp, xin, hout, t, K, KTID - 32, KNT - 32);
  }
""",
)
# The few-token forward in one launch again, now as wide as a threadgroup goes (DYNAMIC_ONE): one
# threadgroup of ONE_THREADS threads per token, thread i taking rows i, i + ONE_THREADS, ... of x
# and phi (K / ONE_THREADS of them, loaded before any product; phi by 16-byte vectors), the
# products summed over the threadgroup, then warp 0 finishing as DYNAMIC_SPLIT_FINISH does while
# the other warps compute h. Where it applies (n <= ONE_MAX_N, K <= ONE_MAX_K), one launch instead
# of the split's two: in the ninth session of 2026-11-30 an eval of a B = 1 dynamic site (three
# launches) took ~64 µs against ~39 for the static layer's one (H200, gpu_experiments.py b1-host),
# ~12 µs a launch. It passed the coefficient and read-step checks and its GPU tests on the H200
# (docs/kernel-notes.md row 59). Default since the seventeenth session (row 89): encoding a launch
# costs the host ~6 µs (row 87) against this kernel's ~1 µs more of GPU time than the split's two,
# and the bench's B = 1 dynamic forward took 80.4 µs (median of 15 rounds in three pinned
# processes) against 84.8 for the split form, alternated (row 60's tenth-session timing: 99.1
# against 101.6). False: the split form.
ONE_LAUNCH_SMALL = True
# 512: two rows a thread at a time hold ~60 registers; 1024 threads would allow 64 a thread
ONE_THREADS = 512
ONE_MAX_K = 4 * 1024  # rows of x and phi a token; above it the split form
ONE_MAX_N = 4  # the W + 1 <= 32 column sums by one transpose-reduce, W * 2 floats of phi in registers
DYNAMIC_ONE = KernelSpec(
    name="mhc_coefficients_one",
    inputs=("xin", "phi", "alpha", "bias"),
    outputs=("hpre", "hpost", "hres", "mraw", "invr", "hout"),
    helpers=_FINISH_HELPER + _WARP_SUMS_HELPER + _WRITE_H_HELPER,
    body=r"""
  constexpr int W = N * (N + 2);
  constexpr int R = (K + TG - 1) / TG;  // rows of x and phi per thread
  constexpr int NW = TG / 32;
  KSHARED float red[NW * (W + 1)];
  KSHARED float tot[W + 1];
  KSHARED float lg[W];
  const float eps = KBITS_FLOAT(EPS_BITS);
  const int64_t t = KBID;
  const int tid = KTID;
  const int lane = KLANE;
  const int warp = KWARP;
  constexpr int RB = R < 2 ? R : 2;  // rows loaded before their products (registers: RB * W)
  const bool pvec = (W % 4 == 0) && KALIGNED16(phi);
  float acc[W + 1];
  KUNROLL for (int c = 0; c <= W; ++c) acc[c] = 0.0f;
  for (int r0 = 0; r0 < R; r0 += RB) {
    float xv[RB];
    float ph[RB][W];
    KUNROLL for (int r = 0; r < RB; ++r) {
      const int k = tid + (r0 + r) * TG;
      xv[r] = 0.0f;
      KUNROLL for (int c = 0; c < W; ++c) ph[r][c] = 0.0f;
      if (r0 + r < R && k < K) {
        xv[r] = static_cast<float>(xin[t * K + k]);
        if (W % 4 == 0) {
          KUNROLL for (int q = 0; q < W / 4; ++q) kload<float, 4>(ph[r] + 4 * q, phi, (int64_t)k * W + 4 * q, pvec);
        } else {
          KUNROLL for (int c = 0; c < W; ++c) ph[r][c] = phi[(int64_t)k * W + c];
        }
      }
    }
    KUNROLL for (int r = 0; r < RB; ++r) {
      KUNROLL for (int c = 0; c < W; ++c) acc[c] += xv[r] * ph[r][c];
      acc[W] += xv[r] * xv[r];
    }
  }
  mhc_dyn_warp_sums<W>(acc, red, lane, warp);
  KBARRIER();
  for (int c = tid; c <= W; c += TG) {
    float v = 0.0f;
    for (int w = 0; w < NW; ++w) v += red[w * (W + 1) + c];
    tot[c] = v;
  }
  KBARRIER();
  const float rr = KSQRT(tot[W] / (float)K + eps);
  if (warp == 0) {
    mhc_dyn_finish<N>(tot, 0, 1, rr, alpha, bias, mraw, lg, invr, hpre, hpost, hres, t, lane, ITERS);
  } else if (PRE) {  // h = sum_i H_pre_i x_i, H_pre as warp 0 computes it
    float hp[N];
    KUNROLL for (int i = 0; i < N; ++i) hp[i] = ksigmoid(tot[i] / rr * alpha[0] + bias[i]);
    mhc_dyn_write_h<T, N, V>(hp, xin, hout, t, K, tid - 32, TG - 32);
  }
""",
)

# False: DYNAMIC_SMALL / DYNAMIC_SMALL_PRE (one threadgroup per token).
SPLIT_SMALL = True
SPLIT_FINISH_MAX_THREADS = 256  # stream threads of the finishing kernel, at most


# Up to this many tokens the kernel form takes DYNAMIC_SMALL (DYNAMIC_SMALL_PRE for the read
# step): one threadgroup per token instead of the tiled kernel's idle lanes; 0: never. 16 since
# H200 2026-11-30 (docs/kernel-notes.md row 26).
SMALL_TOKENS = 16

# dxf[t, k] = sum_w gs[t, w] phi[k, w] - xf[t, k] c2[t]   and   dphi[k, w] = sum_t xf[t, k] gs[t, w]
# Thread = one column k of xf, phi row k held in registers; blocks split the tokens in
# chunks of TPS, each writing its own dphi partial (summed afterwards).
DYNAMIC_VJP = KernelSpec(
    name="mhc_coefficients_dynamic_vjp",
    inputs=("xin", "phi", "gsc", "ctwo", "iparam"),
    outputs=("gx", "gphi"),
    body=r"""
  constexpr int W = N * (N + 2);
  constexpr int WP = (W + 3) / 4 * 4;
  constexpr int TS = 32;
  KSHARED float4 gs4[TS * WP / 4];
  KSHARED float c2s[TS];
  KSHPTR(float) gs = reinterpret_cast<KSHPTR(float)>(gs4);
  const int Ttok = iparam[0];
  const int K = iparam[1];
  const int TPS = iparam[2];
  const int nkb = (K + KNT - 1) / KNT;
  const int split = KBID / nkb;
  const int k = (KBID % nkb) * KNT + KTID;
  const bool kl = k < K;
  float pr[WP];
  float acc[WP];
  KUNROLL for (int c = 0; c < WP; ++c) {
    pr[c] = (kl && c < W) ? phi[(int64_t)k * W + c] : 0.0f;
    acc[c] = 0.0f;
  }
  const int tb = split * TPS;
  const int te = (tb + TPS) < Ttok ? (tb + TPS) : Ttok;
  for (int ts = tb; ts < te; ts += TS) {
    KBARRIER();
    for (int idx = KTID; idx < TS * WP; idx += KNT) {
      const int q = idx / WP;
      const int c = idx - q * WP;
      gs[idx] = (c < W && ts + q < te) ? gsc[(int64_t)(ts + q) * W + c] : 0.0f;
    }
    for (int idx = KTID; idx < TS; idx += KNT) c2s[idx] = (ts + idx < te) ? ctwo[ts + idx] : 0.0f;
    KBARRIER();
    const int nq = (te - ts) < TS ? (te - ts) : TS;
    float xq[TS];  // the stage's x values, all loads in flight at once
    KUNROLL for (int q = 0; q < TS; ++q)
      xq[q] = (kl && q < nq) ? static_cast<float>(xin[(int64_t)(ts + q) * K + k]) : 0.0f;
    KUNROLL for (int q = 0; q < TS; ++q) {
      const int64_t t = ts + q;
      const float xv = xq[q];
      float d = 0.0f;
      KUNROLL for (int c4 = 0; c4 < WP / 4; ++c4) {
        const float4 g = gs4[q * (WP / 4) + c4];
        d += g.x * pr[4 * c4 + 0] + g.y * pr[4 * c4 + 1] + g.z * pr[4 * c4 + 2] + g.w * pr[4 * c4 + 3];
        acc[4 * c4 + 0] += xv * g.x;
        acc[4 * c4 + 1] += xv * g.y;
        acc[4 * c4 + 2] += xv * g.z;
        acc[4 * c4 + 3] += xv * g.w;
      }
      if (kl && q < nq) gx[t * K + k] = static_cast<T>(d - xv * c2s[q]);
    }
  }
  if (kl) {
    KUNROLL for (int c = 0; c < W; ++c) gphi[((int64_t)split * K + k) * W + c] = acc[c];
  }
""",
)



def _with_pre_term(body: str) -> str:
    """DYNAMIC_VJP's text plus pre's share of x's cotangent, H_pre[t, i] * dh[t, c] at k = i C + c
    (the fused read step, pre_step.py): the default kernel's text stays as checked."""
    edits = (
        ("  const bool kl = k < K;\n",
         "  const bool kl = k < K;\n"
         "  const int Cw = K / N;  // channels per stream\n"
         "  const int ki = kl ? k / Cw : 0;\n"
         "  const int kc = kl ? k - ki * Cw : 0;\n"
         "  KSHARED float hps[TS * N];\n"),
        ("    for (int idx = KTID; idx < TS; idx += KNT) c2s[idx] = (ts + idx < te) ? ctwo[ts + idx] : 0.0f;\n",
         "    for (int idx = KTID; idx < TS; idx += KNT) c2s[idx] = (ts + idx < te) ? ctwo[ts + idx] : 0.0f;\n"
         "    for (int idx = KTID; idx < TS * N; idx += KNT)\n"
         "      hps[idx] = (ts + idx / N < te) ? hpre[(int64_t)ts * N + idx] : 0.0f;\n"),
        ("      xq[q] = (kl && q < nq) ? static_cast<float>(xin[(int64_t)(ts + q) * K + k]) : 0.0f;\n",
         "      xq[q] = (kl && q < nq) ? static_cast<float>(xin[(int64_t)(ts + q) * K + k]) : 0.0f;\n"
         "    float dq[TS];  // h's cotangent at this thread's channel\n"
         "    KUNROLL for (int q = 0; q < TS; ++q)\n"
         "      dq[q] = (kl && q < nq) ? static_cast<float>(dh[(int64_t)(ts + q) * Cw + kc]) : 0.0f;\n"),
        ("static_cast<T>(d - xv * c2s[q]);",
         "static_cast<T>(d - xv * c2s[q] + hps[q * N + ki] * dq[q]);"),
    )
    return edited(body, edits)


DYNAMIC_VJP_PRE = KernelSpec(
    name="mhc_coefficients_dynamic_vjp_pre",
    inputs=("xin", "phi", "gsc", "ctwo", "hpre", "dh", "iparam"),
    outputs=("gx", "gphi"),
    body=_with_pre_term(DYNAMIC_VJP.body),
)


def _with_accumulated_dx(body: str) -> str:
    """The text plus x's cotangent from later in the site (`gacc`: what pre's or post's
    backward wrote, passed down the chain of site.py's `chained` functions), added as the
    kernel writes its own share: x's cotangent written once, without an MLX add."""
    return edited(body, [("static_cast<T>(d - xv * c2s[q]",
                          "static_cast<T>(static_cast<float>(gacc[t * K + k]) + d - xv * c2s[q]")])


DYNAMIC_VJP_ACC = KernelSpec(
    name="mhc_coefficients_dynamic_vjp_acc",
    inputs=("xin", "phi", "gsc", "ctwo", "gacc", "iparam"),
    outputs=("gx", "gphi"),
    body=_with_accumulated_dx(DYNAMIC_VJP.body),
)

DYNAMIC_VJP_PRE_ACC = KernelSpec(
    name="mhc_coefficients_dynamic_vjp_pre_acc",
    inputs=("xin", "phi", "gsc", "ctwo", "hpre", "dh", "gacc", "iparam"),
    outputs=("gx", "gphi"),
    body=_with_accumulated_dx(DYNAMIC_VJP_PRE.body),
)

# The dynamic backward's per-token steps between its cotangents and the x/phi kernel, in one
# launch, one thread per token (n <= 4 with the one-thread Sinkhorn backward): the logits
# h = m * scale + bias, the sigmoid derivatives, the Sinkhorn backward of the res logits, then
# gm = dh * scale, c2 = (1/r)^2 / K * sum gm * m and gs = gm / r; and per threadgroup the
# partial sums over its tokens of dh (bias's gradient) and of dh * m per alpha segment
# (alpha's). As MLX ops these were about fifteen launches on [T, W] arrays plus the Sinkhorn
# backward's (mx.compile cannot fuse inside a custom function's backward).
# Threads per threadgroup (GT): ncu put the kernel at 98.2 µs in the 4096x4x4096 site backward
# (32 groups of 128 on the H200's 132 SMs), but 64 and 32 threads did not change the site's
# fwd+bwd (H200 2026-11-30, gpu_experiments.py glue-threads, medians of 5 alternated runs:
# 830.4 / 839.7 / 835.1 µs at 128 / 64 / 32; 32 passed the coefficient and chain checks).
GLUE_THREADS = 128
DYNAMIC_VJP_GLUE = KernelSpec(
    name="mhc_coefficients_dynamic_vjp_glue",
    inputs=("mraw", "invr", "alpha", "bias", "hpre", "hpost", "gpre", "gpost", "gres", "iparam"),
    outputs=("gsc", "ctwo", "part"),
    body=r"""
  constexpr int W = N * (N + 2);
  constexpr int WP = W + 3;  // a block's partials: W of dh, then 3 of dh * m per alpha segment
  KSHARED float rows[GT * WP];  // GT == KNT == GLUE_THREADS
  const int Ttok = iparam[0];
  const int K = iparam[1];
  const int tid = KTID;
  const int64_t t = (int64_t)KBID * KNT + tid;
  const bool live = t < Ttok;
  const float a0 = alpha[0], a1 = alpha[1], a2 = alpha[2];
  float gh[W];
  float mv[W];
  KUNROLL for (int c = 0; c < W; ++c) mv[c] = live ? mraw[t * W + c] : 0.0f;
  KUNROLL for (int i = 0; i < N; ++i) {
    const float hp = live ? hpre[t * N + i] : 0.0f;
    const float hq = live ? hpost[t * N + i] : 0.0f;
    gh[i] = live ? gpre[t * N + i] * hp * (1.0f - hp) : 0.0f;
    gh[N + i] = live ? gpost[t * N + i] * hq * (1.0f - 0.5f * hq) : 0.0f;
  }
  {
    float lp[N * N];
    float g[N * N];
    KUNROLL for (int a = 0; a < N * N; ++a) {
      lp[a] = mv[2 * N + a] * a2 + bias[2 * N + a];
      g[a] = live ? gres[t * N * N + a] : 0.0f;
    }
    if (live) ksinkhorn_thread_vjp<N, ITERS>(lp, g);
    KUNROLL for (int a = 0; a < N * N; ++a) gh[2 * N + a] = g[a];
  }
  const float ir = live ? invr[t] : 0.0f;
  float s = 0.0f, seg0 = 0.0f, seg1 = 0.0f, seg2 = 0.0f;
  KUNROLL for (int c = 0; c < W; ++c) {
    const float sc = c < N ? a0 : (c < 2 * N ? a1 : a2);
    const float gm = gh[c] * sc;
    s += gm * mv[c];
    if (live) gsc[t * W + c] = gm * ir;
    const float ghm = gh[c] * mv[c];
    if (c < N) seg0 += ghm;
    else if (c < 2 * N) seg1 += ghm;
    else seg2 += ghm;
    rows[tid * WP + c] = gh[c];
  }
  rows[tid * WP + W] = seg0;
  rows[tid * WP + W + 1] = seg1;
  rows[tid * WP + W + 2] = seg2;
  if (live) ctwo[t] = ir * ir / (float)K * s;
  KBARRIER();
  for (int c = tid; c < WP; c += KNT) {
    float total = 0.0f;
    for (int r = 0; r < KNT; ++r) total += rows[r * WP + c];
    part[(int64_t)KBID * WP + c] = total;
  }
""",
)
# The glue split in two launches (SPLIT_GLUE_SINKHORN): the res logits' Sinkhorn backward with
# the matrix's rows on Q lanes (prelude.ksinkhorn_rows_vjp; Q = 4 at n = 3, 4), then the glue
# without it (the cotangent it reads as gres is then already the logits'). At 4096 tokens the
# one-thread form ran one warp per SM, with 1.3 KB of spills per thread beside the glue's other
# state: 94.7 µs on the stream's critical path (H200, scripts/gpu_timeline.py, 2026-11-30).
DYNAMIC_VJP_SINKHORN = KernelSpec(
    name="mhc_coefficients_dynamic_vjp_sinkhorn",
    inputs=("mraw", "alpha", "bias", "gres", "iparam"),
    outputs=("gl",),
    body=r"""
  constexpr int W = N * (N + 2);
  const int Ttok = iparam[0];
  const int64_t gid = (int64_t)KBID * KNT + KTID;
  const int64_t t = gid / Q;
  const int row = (int)(gid % Q);
  const bool live = t < Ttok && row < N;
  const float a2 = alpha[2];
  float lp[N];
  float g[N];
  KUNROLL for (int j = 0; j < N; ++j) {
    const int a = row * N + j;
    lp[j] = live ? mraw[t * W + 2 * N + a] * a2 + bias[2 * N + a] : 0.0f;
    g[j] = live ? gres[t * N * N + a] : 0.0f;
  }
  ksinkhorn_rows_vjp<N, Q, ITERS>(lp, g, live);
  if (live) {
    KUNROLL for (int j = 0; j < N; ++j) gl[t * N * N + row * N + j] = g[j];
  }
""",
)
SINKHORN_THREADS = 128
DYNAMIC_VJP_GLUE_AFTER_SINKHORN = KernelSpec(
    name="mhc_coefficients_dynamic_vjp_glue_after",
    inputs=DYNAMIC_VJP_GLUE.inputs,
    outputs=DYNAMIC_VJP_GLUE.outputs,
    body=edited(DYNAMIC_VJP_GLUE.body, [("    if (live) ksinkhorn_thread_vjp<N, ITERS>(lp, g);\n", "")]),
)
# The two launches above instead of the glue with the one-thread Sinkhorn backward inside (False).
# nvcc sm_90a, n = 4: 255 registers and 120 B spilled, the glue after it 64 registers and none
# (the one kernel: 1316 B). H200 (2026-11-30, third session; scripts/gpu_check.py passed with it,
# every dtype): dynamic fwd+bwd, medians of 5 alternated runs (gpu_experiments.py glue-split),
# 4096x4x4096 813.0 against 834.0 µs, 512x4x1280 189.0 against 209.7, B = 1 597.5 against
# 605.8 (within the runs' spread); in the stream timeline the Sinkhorn backward (44.9 µs) runs
# beside pre's backward and the glue after it takes 7.5 µs (the one kernel: 94.7 on the
# critical path).
SPLIT_GLUE_SINKHORN = True

# The split-off Sinkhorn backward as the transpose of its Jacobian, the Jacobian computed from
# the forward's logits alone (DYNAMIC_SINKHORN_JACOBIAN, forward mode, one lane per input entry:
# n^2 lanes per token, no exchange). Only the product with the cotangent
# (DYNAMIC_VJP_SINKHORN_APPLY, n^2 multiply-adds per lane) then waits for pre's backward; the
# Jacobian, which depends on nothing in the backward, runs beside post's backward (H200 stream
# timeline, sixth session of 2026-11-30: 23.8 µs, off the critical path). At 4096 tokens the
# replaying backward took 27.2 µs on the stream's critical path between pre's backward and the
# glue (H200 timeline, fourth session). Costs 4 n^4 bytes per token (1 KB at n = 4) written and
# read once. H200 (2026-11-30, fifth session; scripts/gpu_check.py's coefficient and chain checks
# passed with it in every dtype, and 15 `pytest -m gpu` tests of the dynamic backward): dynamic
# fwd+bwd, medians of 5 alternated runs (gpu_experiments.py sinkhorn-jacobian), 4096x4x4096
# 668.5 against 693.3 µs (664-680 against 680-702), 512x4x1280 160.6 against 158.7, B = 1
# 449.4 against 528.1 (both within the runs' spread). False: the replaying DYNAMIC_VJP_SINKHORN.
SINKHORN_JACOBIAN = True
DYNAMIC_SINKHORN_JACOBIAN = KernelSpec(
    name="mhc_coefficients_dynamic_sinkhorn_jacobian",
    inputs=("mraw", "alpha", "bias", "iparam"),
    outputs=("jac",),
    body=r"""
  constexpr int W = N * (N + 2);
  constexpr int NN = N * N;
  const int Ttok = iparam[0];
  const int iters = iparam[1];
  const int64_t gid = (int64_t)KBID * KNT + KTID;
  const int64_t t = gid / NN;
  const int a = (int)(gid % NN);  // this lane's input entry: column a of the Jacobian
  if (t >= Ttok) return;
  const float a2 = alpha[2];
  float p[NN];
  float tg[NN];
  KUNROLL for (int b = 0; b < NN; ++b) p[b] = mraw[t * W + 2 * N + b] * a2 + bias[2 * N + b];
  ksinkhorn_jacobian_column<N>(p, tg, a, iters);
  // jac[t, b, a] = d P_b / d L_a: the token's lanes write consecutive a
  KUNROLL for (int b = 0; b < NN; ++b) jac[(t * NN + b) * NN + a] = tg[b];
""",
)
DYNAMIC_VJP_SINKHORN_APPLY = KernelSpec(
    name="mhc_coefficients_dynamic_vjp_sinkhorn_apply",
    inputs=("jac", "gres", "iparam"),
    outputs=("gl",),
    body=r"""
  constexpr int NN = N * N;
  const int Ttok = iparam[0];
  const int64_t gid = (int64_t)KBID * KNT + KTID;
  const int64_t t = gid / NN;
  const int a = (int)(gid % NN);
  if (t >= Ttok) return;
  float s = 0.0f;
  KUNROLL for (int b = 0; b < NN; ++b) s += jac[(t * NN + b) * NN + a] * gres[t * NN + b];
  gl[t * NN + a] = s;
""",
)


def group_lanes(n: int) -> int:
    """Q: lanes per matrix in DYNAMIC_VJP_SINKHORN, the power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


# The dynamic backward's glue by DYNAMIC_VJP_GLUE where the one-thread Sinkhorn backward applies;
# False: the same steps as MLX ops. H200 (2026-11-30, scripts/gpu_experiments.py chain, medians
# of 5 alternated runs, dynamic fwd+bwd bf16): 4096x4x4096 1119.5 against 1178.0 µs, 512x4x1280
# 221.4 against 405.0, B = 1 590.5 against 1018.1.
FUSED_VJP_GLUE = True
# Candidate: where the backward takes the tensor-core products, the glue kernel also writes gs in
# their fragment orders (coefficients_mma_vjp.glue_packs_spec), instead of two pack launches.
# H200 (2026-11-30, third session; its checks and GPU test passed with the one-kernel glue):
# dynamic fwd+bwd 4096x4x4096 828.4 against 836.1 µs, 815.5 against 843.1 with the read step
# (gpu_experiments.py glue-packs, medians of 5 alternated runs): within the runs' spread. Its form
# after the split-off Sinkhorn backward (SPLIT_GLUE_SINKHORN) was timed, not checked, in the fourth
# session: 672.1 against 674.2 µs. Since the eighteenth session its second order is DPHI_WG's where
# that kernel takes dphi (Hopper, bfloat16, n = 4), so both of gs's pack launches go there too
# (before, DPHI_WG still packed gs itself); checked on the emulator, not yet on a GPU.
GLUE_PACKS = False

DYNAMIC_THREADS = 256
# The backward's launch (DYNAMIC_VJP, 136 registers): 128-thread blocks of 512 tokens each.
# H200 (2026-11-29): at T = 4096, n*C = 16384, bf16, 128/512 took 403.1 and 394.9 µs in two
# runs against 539.8 and 510.6 for the earlier 256/256 (a 256-thread block at 136 registers
# leaves one block per SM), 425.3 for 128/256, 386.7 for 128/1024; at T = 512, n*C = 5120,
# 43.6 µs against 52.6 for 256/256 and 45.9 for 128/64.
VJP_THREADS = 128
VJP_TOKENS_PER_SPLIT = 512
# The backward's two products on tensor cores for 16-bit x, n <= 4, CUDA (coefficients_mma_vjp.py).
# "auto" (default): where the forward takes the tensor-core form (MMA_MIN_ELEMENTS elements of x
# and more); True: at every size; False: never. H200 (2026-11-30, scripts/gpu_experiments.py
# mma-vjp, medians of 5 alternated runs, bf16, with its DX kernel rewritten): dynamic site
# fwd+bwd 4096x4x4096 926.5 against 1118.1 µs for the FP32 kernel (the products alone 262.1
# against 386.8), but 512x4x1280 230.1 against 213.8.
MMA_VJP: bool | str = "auto"


def _tensor_core_vjp(x2) -> bool:
    """MMA_VJP for x2 [T, K]: True, False, or "auto" (the forward's tensor-core threshold)."""
    if MMA_VJP == "auto":
        return x2.size >= MMA_MIN_ELEMENTS
    return bool(MMA_VJP)


# TB tokens share each staged chunk of phi, for n <= 4 (n > 4 always takes 8). On the H100
# at 4096 x 4 x 4096 (bf16) the kernel took 990 µs at TB=16, 771 µs at TB=8 and 879 µs at
# TB=32 (2026-11-25, scripts/gpu_experiments.py; an earlier run: 951 / 607 / ~920 µs), and the
# TB=8 instance passed the coefficients cases of scripts/gpu_check.py (26/26): latency-bound either way.
TOKENS_PER_BLOCK_SMALL_N = 8


def tokens_per_block(n: int) -> int:
    return TOKENS_PER_BLOCK_SMALL_N if n * (n + 2) <= 24 else 8


def activate(rpre, rpost, rres, iters: int):
    """Float32 logits [M, n], [M, n], [M, n, n] -> (H_pre, H_post, H_res), one warp per row.
    Unbatched logits ([n], [n], [n, n]) are one row, M = 1: the kernel reads them as they are,
    so the static layer adds no reshape nodes to the graph (each costs host time per eval)."""
    n = rres.shape[-1]
    M = rres.size // (n * n)
    grid, tg = sk._grid(M)
    return launch(
        ACTIVATE, [rpre, rpost, rres, int_params(M, iters)],
        [((M, n), F32), ((M, n), F32), ((M, n, n), F32)], grid, tg, [("N", n)],
    )


def sigmoid_grads(H_pre, H_post, g_pre, g_post):
    """Cotangents of the H_pre and H_post logits (H_pre = sigmoid, H_post = 2 sigmoid)."""
    g_pre, g_post = g_pre.astype(F32), g_post.astype(F32)
    return g_pre * H_pre * (1.0 - H_pre), g_post * H_post * (1.0 - 0.5 * H_post)


def _activation_vjp_parts(H_pre, H_post, L_res, g_pre, g_post, g_res, iters):
    """Cotangents of the logits (pre [M, n], post [M, n], res [M, n, n]) from the coefficients'."""
    M, n = L_res.shape[0], L_res.shape[-1]
    gp, gq = sigmoid_grads(H_pre, H_post, g_pre, g_post)
    return gp, gq, sk.project_vjp(L_res, g_res.astype(F32).reshape(M, n, n), iters)


def _activation_vjp(H_pre, H_post, L_res, g_pre, g_post, g_res, iters):
    """Cotangents of the logits [M, 2n + n*n] from those of the coefficients."""
    gp, gq, gr = _activation_vjp_parts(H_pre, H_post, L_res, g_pre, g_post, g_res, iters)
    return mx.concatenate([gp, gq, gr.reshape(gr.shape[0], -1)], axis=-1)


def _split_logits(h, n):
    M = h.shape[0]
    return h[:, :n], h[:, n : 2 * n], h[:, 2 * n :].reshape(M, n, n)


@lru_cache(maxsize=None)
def _static_function(n: int, iters: int):
    @mx.custom_function
    def coefficients(bias):
        h = bias.astype(F32).reshape(1, -1)
        H_pre, H_post, H_res = activate(*_split_logits(h, n), iters)
        # reshape, not [0]: MLX runs an integer index as a gather launch
        return H_pre.reshape(n), H_post.reshape(n), H_res.reshape(n, n)

    @coefficients.vjp
    def coefficients_vjp(bias, cotangents, outputs):
        H_pre, H_post, _ = outputs
        L_res = bias.astype(F32)[2 * n :].reshape(1, n, n)
        g = _activation_vjp(
            H_pre[None], H_post[None], L_res, cotangents[0][None], cotangents[1][None],
            cotangents[2][None], iters,
        )
        return g.reshape(-1).astype(bias.dtype)

    return coefficients


@lru_cache(maxsize=None)
def _raw_function(n: int, iters: int):
    """The seed layer's form: separate raw logits H_pre_raw [n], H_post_raw [n], H_res_raw [n, n]."""

    @mx.custom_function
    def coefficients(pre_raw, post_raw, res_raw):
        H_pre, H_post, H_res = activate(
            pre_raw.astype(F32).reshape(1, n), post_raw.astype(F32).reshape(1, n),
            res_raw.astype(F32).reshape(1, n, n), iters,
        )
        return H_pre.reshape(n), H_post.reshape(n), H_res.reshape(n, n)

    @coefficients.vjp
    def coefficients_vjp(primals, cotangents, outputs):
        pre_raw, post_raw, res_raw = primals
        H_pre, H_post, _ = outputs
        gp, gq, gr = _activation_vjp_parts(
            H_pre, H_post, res_raw.astype(F32).reshape(1, n, n),
            cotangents[0], cotangents[1], cotangents[2], iters,
        )
        return gp.astype(pre_raw.dtype), gq.astype(post_raw.dtype), gr.reshape(n, n).astype(res_raw.dtype)

    return coefficients


def raw_coefficients(pre_raw, post_raw, res_raw, iters: int):
    return _raw_function(res_raw.shape[-1], iters)(pre_raw, post_raw, res_raw)


# Forms of the dynamic coefficients for 16-bit x (float32 x always takes the fused kernel):
# - "kernel": the fused FP32-core kernel above (one launch; the latency path);
# - "mma" (CUDA): the GEMM on tensor cores in our own kernel (mma.sync, phi split into three
#   bfloat16 parts so the products keep float32 accuracy, split over K; coefficients_mma.py),
#   reading x once, then one finishing kernel. On the H100 at 4096 x 4 x 4096 bf16 it took
#   194-240 µs against 559-990 µs for "kernel" (297 µs when its packing and finish were MLX
#   ops), and it passed every coefficients case of scripts/gpu_check.py (55/55 with both
#   forms, 2026-11-25). Taken from MMA_MIN_ELEMENTS elements of x (T * n * C) up; below,
#   "kernel" (one launch instead of three); 1 << 22 sits between the sizes where each won
#   (not yet re-run on the device with this rule): in two runs of scripts/gpu_experiments.py
#   the fused kernel was faster at
#   T * K <= 2.6 M (e.g. 512 x 4 x 1280: 58.6 / 72.8 µs against 67.1 / 79.8), they tied or the
#   tensor cores won at 5.2 M (1024 x 4 x 1280: 75.0 / 95.3 against 75.3 / 88.5) and the tensor
#   cores won at 8.4 M (512 x 4 x 4096: 86.7 / 100.2 against 113.4 / 127.1).
# - "gemm": MLX's TF32 matmul (x is exact in TF32, phi split into [phi_hi | phi_lo],
#   compiled/matmul.py), Σx² as an MLX reduction, then the activations kernel; it reads x
#   about three times. Passed the same check; 777 µs there. Kept for comparison.
DYNAMIC_FORM = "mma"  # or "kernel", "gemm"
MMA_MIN_ELEMENTS = 1 << 22
DYNAMIC_FORMS = ("kernel", "gemm", "mma")


def gemm_logits(x2, phi, eps: float):
    """(m [T, W], 1/r [T]) with m = (xf @ phi) / r and r = sqrt(mean(xf²) + eps), in float32."""
    invr = mx.rsqrt(mx.mean(mx.square(x2.astype(F32)), axis=-1) + eps)
    return matmul.product(x2, phi) * invr[:, None], invr


def _finish(m, invr, alpha, bias, n: int, iters: int):
    """The fused kernel's five outputs from m = (xf @ phi) / r and 1/r: scale, bias, activations."""
    h = m * alpha.astype(F32)[scale_index(n)] + bias.astype(F32)
    H_pre, H_post, H_res = activate(*_split_logits(h, n), iters)
    return H_pre, H_post, H_res, m, invr


def _dynamic_gemm_forward(x2, phi, alpha, bias, n: int, iters: int, eps: float):
    return _finish(*gemm_logits(x2, phi, eps), alpha, bias, n, iters)


def _dynamic_mma_forward(x2, phi, alpha, bias, n: int, iters: int, eps: float):
    from . import coefficients_mma

    return coefficients_mma.dynamic_forward(x2, phi, alpha, bias, n, iters, eps)


def dynamic_forward(x2, phi, alpha, bias, n: int, iters: int, eps: float, tb: int | None = None,
                    form: str | None = None):
    """x2 [T, n*C] -> H_pre [T, n], H_post [T, n], H_res [T, n, n], m [T, W], 1/r [T]."""
    if n > MAX_N_DYNAMIC:  # (WIDE_N) no fused kernel holds W = n(n+2) columns
        return _dynamic_gemm_forward(x2, phi, alpha, bias, n, iters, eps)
    form = _form(x2, form)
    if form == "gemm":
        return _dynamic_gemm_forward(x2, phi, alpha, bias, n, iters, eps)
    if form == "mma":
        return _dynamic_mma_forward(x2, phi, alpha, bias, n, iters, eps)
    return _dynamic_kernel(DYNAMIC, x2, phi, alpha, bias, n, iters, eps, tb)


def _form(x2, form: str | None = None) -> str:
    """The form dynamic_forward takes for x2 (`form` None: DYNAMIC_FORM, by size)."""
    if form is None:
        form = DYNAMIC_FORM
        if form == "mma" and x2.size < MMA_MIN_ELEMENTS:
            form = "kernel"
    if form not in DYNAMIC_FORMS:
        raise ValueError(f"unknown dynamic coefficient form {form!r}; choose one of {', '.join(DYNAMIC_FORMS)}")
    if form == "gemm" and x2.dtype == F32:  # float32 x is not exact in TF32: 4 GEMMs, kernel wins
        return "kernel"
    if form == "mma" and (x2.dtype == F32 or build.gpu_backend() != "cuda"):
        return "kernel"
    return form


def one_launch_applies(n: int, K: int) -> bool:
    """Whether a few-token dynamic forward of n streams and K = n C columns takes DYNAMIC_ONE
    (ONE_LAUNCH_SMALL, within ONE_MAX_N and ONE_MAX_K) rather than the split form."""
    return ONE_LAUNCH_SMALL and n <= ONE_MAX_N and K <= ONE_MAX_K


def _dynamic_kernel(spec, x2, phi, alpha, bias, n: int, iters: int, eps: float, tb: int | None = None):
    """DYNAMIC or DYNAMIC_PRE for x2 [T, K]; up to SMALL_TOKENS tokens (and no tb asked for) their
    one-threadgroup-per-token forms."""
    T, K = x2.shape
    W = n * (n + 2)
    outputs = [((T, n), F32), ((T, n), F32), ((T, n, n), F32), ((T, W), F32), ((T,), F32)]
    with_h = spec is DYNAMIC_PRE
    if with_h:
        outputs.append(((T, K // n), x2.dtype))
    inputs = [x2, phi.astype(F32), alpha.astype(F32), bias.astype(F32), int_params(T, K, iters), float_params(eps)]
    if tb is None and T <= SMALL_TOKENS:
        if one_launch_applies(n, K):
            return _one_small(x2, phi, alpha, bias, n, iters, eps, with_h)
        if SPLIT_SMALL:
            return _split_small(x2, phi, alpha, bias, n, iters, eps, with_h)
        return launch(DYNAMIC_SMALL_PRE if with_h else DYNAMIC_SMALL, inputs, outputs, T * SMALL_THREADS,
                      SMALL_THREADS, [("T", x2.dtype), ("N", n)])
    tb = tb or tokens_per_block(n)
    blocks = -(-T // tb)
    return launch(spec, inputs, outputs, blocks * DYNAMIC_THREADS, DYNAMIC_THREADS,
                  [("T", x2.dtype), ("N", n), ("TB", tb)])



def _split_small(x2, phi, alpha, bias, n: int, iters: int, eps: float, with_h: bool):
    """DYNAMIC_SMALL's outputs (and h with with_h) by DYNAMIC_SPLIT_PARTIAL + DYNAMIC_SPLIT_FINISH."""
    from .site import vector_width

    T, K = x2.shape
    W = n * (n + 2)
    P = -(-K // SPLIT_ROWS)
    part = launch(DYNAMIC_SPLIT_PARTIAL, [x2, phi.astype(F32)], [((T, P, W + 1), F32)], T * P * SPLIT_ROWS,
                  SPLIT_ROWS, [("T", x2.dtype), ("N", n), ("K", K)])[0]
    C = K // n
    V = vector_width(C, x2.dtype.size, n, budget=32)
    S = min(SPLIT_FINISH_MAX_THREADS, -(-(C // V) // 32) * 32) if with_h else 0
    outputs = [((T, n), F32), ((T, n), F32), ((T, n, n), F32), ((T, W), F32), ((T,), F32),
               ((T, C) if with_h else (1,), x2.dtype)]
    out = launch(DYNAMIC_SPLIT_FINISH, [x2, part, alpha.astype(F32), bias.astype(F32)], outputs, T * (32 + S),
                 32 + S, [("T", x2.dtype), ("N", n), ("K", K), ("V", V), ("ITERS", iters),
                          ("EPS_BITS", build.float_bits(eps)), ("PRE", with_h)])
    return out if with_h else out[:5]


def one_threads(K: int) -> int:
    """DYNAMIC_ONE's threadgroup for K rows: a power of two, at least 64 (warp 0 finishes, the
    others write h), at most ONE_THREADS, no more than the rows need."""
    tg = 64
    while tg < ONE_THREADS and tg < K:
        tg *= 2
    return tg


def _one_small(x2, phi, alpha, bias, n: int, iters: int, eps: float, with_h: bool):
    """DYNAMIC_SMALL's outputs (and h with with_h) by DYNAMIC_ONE, one launch."""
    from .site import vector_width

    T, K = x2.shape
    W = n * (n + 2)
    C = K // n
    V = vector_width(C, x2.dtype.size, n, budget=32)
    tg = one_threads(K)
    outputs = [((T, n), F32), ((T, n), F32), ((T, n, n), F32), ((T, W), F32), ((T,), F32),
               ((T, C) if with_h else (1,), x2.dtype)]
    out = launch(DYNAMIC_ONE, [x2, phi.astype(F32), alpha.astype(F32), bias.astype(F32)], outputs, T * tg, tg,
                 [("T", x2.dtype), ("N", n), ("K", K), ("V", V), ("TG", tg), ("ITERS", iters),
                  ("EPS_BITS", build.float_bits(eps)), ("PRE", with_h)])
    return out if with_h else out[:5]


def dynamic_read_forward(x2, phi, alpha, bias, n: int, iters: int, eps: float, form: str | None = None):
    """(H_pre, H_post, H_res, m, 1/r, h [T, C]) in one launch (DYNAMIC_PRE) where the forward
    takes the kernel form; None where it takes the tensor-core or GEMM form."""
    if n > MAX_N_DYNAMIC or _form(x2, form) != "kernel":
        return None
    return _dynamic_kernel(DYNAMIC_PRE, x2, phi, alpha, bias, n, iters, eps)


def read_step_in_one_launch(x) -> bool:
    """Whether the read step's forward (coefficients + pre) takes one launch for x [..., n, C]:
    on CUDA, where the coefficients take the kernel form (kernels.FUSED_READ_STEP "auto")."""
    return build.gpu_backend() == "cuda" and x.shape[-2] <= MAX_N_DYNAMIC and _form(x) == "kernel"


def backward_on_tensor_cores(x, n: int | None = None) -> bool:
    """Whether the dynamic coefficients' backward takes the tensor-core products for x
    ([..., n, C], or [T, n*C] with n given): CUDA, 16-bit x, n <= 4, MMA_VJP (kernels.
    CHAIN_X_COTANGENT "auto" and the glue's GLUE_PACKS ask)."""
    from . import coefficients_mma_vjp

    n = x.shape[-2] if n is None else n
    return (build.gpu_backend() == "cuda" and x.size > 0 and _tensor_core_vjp(x)
            and x.dtype in (mx.bfloat16, mx.float16) and n <= coefficients_mma_vjp.MAX_N)


def dynamic_vjp_x_phi(x2, phi, gs, c2, pre=None, gacc=None, packed=None):
    """(dxf [T, K] in x's dtype, dphi [K, W] float32) from gs = dm / r [T, W] and c2 [T].

    packed: gs in the tensor-core backward's fragment orders (the glue kernel's, GLUE_PACKS);
    given only where backward_on_tensor_cores(x2, n).

    pre: (H_pre [T, n], dh [T, C]) adds pre's share H_pre (x) dh to dxf in the same pass.
    gacc: x's cotangent from later in the site ([T, K], or any shape of T*K elements), added too.
    """
    T, K = x2.shape
    from .coefficients_mma_vjp import streams_of_width

    n = streams_of_width(phi.shape[1])
    if n > MAX_N_DYNAMIC:
        return _wide_vjp_x_phi(x2, phi, gs, c2, pre, gacc)
    if backward_on_tensor_cores(x2, n):
        from . import coefficients_mma_vjp

        return coefficients_mma_vjp.vjp_x_phi(x2, phi, gs, c2, pre, gacc, packed)
    if packed is not None:
        raise ValueError("gs fragments were given, but this backward does not take the tensor cores")
    splits = -(-T // VJP_TOKENS_PER_SPLIT)
    nkb = -(-K // VJP_THREADS)
    spec, inputs = DYNAMIC_VJP, [x2, phi.astype(F32), gs, c2]
    if pre is not None:
        spec = DYNAMIC_VJP_PRE
        inputs += [pre[0].astype(F32).reshape(T, n), pre[1].astype(x2.dtype).reshape(T, K // n)]
    if gacc is not None:
        spec = DYNAMIC_VJP_PRE_ACC if pre is not None else DYNAMIC_VJP_ACC
        inputs.append(gacc.astype(x2.dtype).reshape(T, K))
    gx, gphi = launch(
        spec, inputs + [int_params(T, K, VJP_TOKENS_PER_SPLIT)],
        [((T, K), x2.dtype), ((splits, K, phi.shape[1]), F32)],
        splits * nkb * VJP_THREADS, VJP_THREADS, [("T", x2.dtype), ("N", n)],
    )
    return gx, mx.sum(gphi, axis=0)


def _wide_vjp_x_phi(x2, phi, gs, c2, pre=None, gacc=None):
    """dynamic_vjp_x_phi for n > MAX_N_DYNAMIC (WIDE_N) as float32-exact MLX matmuls."""
    T, K = x2.shape
    gx = matmul.product(gs, phi.astype(F32).T) - x2.astype(F32) * c2[:, None]
    if pre is not None:
        n = pre[0].shape[-1]
        gx = gx + (pre[0].astype(F32).reshape(T, n, 1) * pre[1].astype(F32).reshape(T, 1, K // n)).reshape(T, K)
    if gacc is not None:
        gx = gx + gacc.astype(F32).reshape(T, K)
    return gx.astype(x2.dtype), matmul.product(x2.T, gs)


def _scaled_cotangents(gp, gq, gr, m, invr, scale, n: int, K: int):
    """(gs = dm / r [T, W], c2 [T], g_bias [W], g_alpha [3]) from the logits' cotangents, as MLX
    ops: the dynamic backward's per-token steps after the activations' (DYNAMIC_VJP_GLUE does
    them in one launch where the one-thread Sinkhorn backward applies). No mx.compile: inside a
    custom function's backward MLX keeps every array a tracer (transforms.cpp, RetainGraph) and
    would run the ops unfused anyway, unless the caller compiles the whole step, whose compile
    fuses them with the rest."""
    gh = mx.concatenate([gp, gq, gr.reshape(gr.shape[0], n * n)], axis=-1)
    ghm = mx.sum(gh * m, axis=0)
    g_alpha = mx.stack([mx.sum(ghm[:n]), mx.sum(ghm[n : 2 * n]), mx.sum(ghm[2 * n :])])
    gm = gh * scale
    c2 = invr * invr / K * mx.sum(gm * m, axis=-1)
    return gm * invr[:, None], c2, mx.sum(gh, axis=0), g_alpha


def sinkhorn_jacobian(m, alpha, bias, n: int, iters: int) -> mx.array:
    """[T, n^2, n^2] float32: each token's res logits' Sinkhorn Jacobian (DYNAMIC_SINKHORN_JACOBIAN),
    from the forward's saved m [T, W]."""
    T = m.shape[0]
    lanes = -(-T * n * n // SINKHORN_THREADS) * SINKHORN_THREADS
    return launch(DYNAMIC_SINKHORN_JACOBIAN, [m, alpha.astype(F32), bias.astype(F32), int_params(T, iters)],
                  [((T, n * n, n * n), F32)], lanes, SINKHORN_THREADS, [("N", n)])[0]


def _glue_kernel(m, invr, alpha, bias, H_pre, H_post, cotangents, n: int, K: int, iters: int,
                 packs: bool = False, wg: bool = False):
    """(gs [T, W], c2 [T], g_bias [W], g_alpha [3], packed) by DYNAMIC_VJP_GLUE (or, with
    SPLIT_GLUE_SINKHORN, DYNAMIC_VJP_SINKHORN then DYNAMIC_VJP_GLUE_AFTER_SINKHORN; with
    SINKHORN_JACOBIAN too, the Jacobian and its product in place of the first) and one sum over
    its threadgroups' partials; packs: its CUDA form that also writes gs in the tensor-core
    backward's two fragment orders (packed = (gsa, gsb); else None), dphi's in DPHI_WG's order
    with wg (where coefficients_mma_vjp.dphi_wg_applies)."""
    T, W = m.shape
    blocks = -(-T // GLUE_THREADS)
    outputs = [((T, W), F32), ((T,), F32), ((blocks, W + 3), F32)]
    spec, template = DYNAMIC_VJP_GLUE, [("N", n), ("ITERS", iters), ("GT", GLUE_THREADS)]
    gres = cotangents[2].astype(F32).reshape(T, n * n)
    alpha, bias = alpha.astype(F32), bias.astype(F32)
    if SPLIT_GLUE_SINKHORN and SINKHORN_JACOBIAN:
        lanes = -(-T * n * n // SINKHORN_THREADS) * SINKHORN_THREADS
        jac = sinkhorn_jacobian(m, alpha, bias, n, iters)
        gres = launch(DYNAMIC_VJP_SINKHORN_APPLY, [jac, gres, int_params(T)], [((T, n * n), F32)], lanes,
                      SINKHORN_THREADS, [("N", n)])[0]
        spec = DYNAMIC_VJP_GLUE_AFTER_SINKHORN
    elif SPLIT_GLUE_SINKHORN:
        q = group_lanes(n)
        gres = launch(
            DYNAMIC_VJP_SINKHORN, [m, alpha, bias, gres, int_params(T)],
            [((T, n * n), F32)], -(-T * q // SINKHORN_THREADS) * SINKHORN_THREADS, SINKHORN_THREADS,
            [("N", n), ("Q", q), ("ITERS", iters)],
        )[0]
        spec = DYNAMIC_VJP_GLUE_AFTER_SINKHORN
    if packs:
        from . import coefficients_mma_vjp as cmv

        spec = cmv.glue_packs_spec(SPLIT_GLUE_SINKHORN, wg)
        outputs += [(shape, mx.bfloat16) for shape in cmv.packed_shapes(T, W, wg)]
        template += [("PA", cmv.DX_PARTS), ("PB", cmv.DPHI_PARTS)]
    gs, c2, part, *packed = launch(
        spec,
        [m, invr, alpha, bias, H_pre.reshape(T, n), H_post.reshape(T, n),
         cotangents[0].astype(F32).reshape(T, n), cotangents[1].astype(F32).reshape(T, n), gres,
         int_params(T, K)],
        outputs, blocks * GLUE_THREADS, GLUE_THREADS, template,
    )
    sums = mx.sum(part, axis=0)
    return gs, c2, sums[:W], sums[W:], (tuple(packed) if packs else None)


def dynamic_vjp(primals, cotangents, outputs, n: int, iters: int, pre=None, gacc=None):
    """Cotangents of (x, phi, alpha, bias) from those of (H_pre, H_post, H_res) (and the saved m, 1/r).

    pre: (H_pre, dh), to add pre's share of x's cotangent in the same pass (pre_step.py).
    gacc: x's cotangent from later in the site, added in the same pass (the chained functions).
    """
    x, phi, alpha, bias = primals
    H_pre, H_post, _, m, invr = outputs
    C = x.shape[-1]
    K = n * C
    T = m.shape[0]
    x2 = x.reshape(T, K)
    packed = None
    if FUSED_VJP_GLUE and T and sk.uses_thread_vjp(n, iters):
        from .coefficients_mma_vjp import dphi_wg_applies

        packs = GLUE_PACKS and backward_on_tensor_cores(x2, n)
        # dphi's fragments in the order of the kernel dynamic_vjp_x_phi will launch for them
        wg = packs and dphi_wg_applies(x2, m.shape[1])
        gs, c2, g_bias, g_alpha, packed = _glue_kernel(m, invr, alpha, bias, H_pre, H_post, cotangents, n, K,
                                                       iters, packs, wg)
    else:
        scale = alpha.astype(F32)[scale_index(n)]
        L_res = (m[:, 2 * n :] * scale[2 * n :] + bias.astype(F32)[2 * n :]).reshape(T, n, n)  # h = m scale + bias
        gp, gq, gr = _activation_vjp_parts(H_pre.reshape(T, n), H_post.reshape(T, n), L_res,
                                           cotangents[0].reshape(T, n), cotangents[1].reshape(T, n),
                                           cotangents[2], iters)
        gs, c2, g_bias, g_alpha = _scaled_cotangents(gp, gq, gr, m, invr, scale, n, K)
    gx, g_phi = dynamic_vjp_x_phi(x2, phi, gs, c2, pre, gacc, packed)
    return (gx.reshape(x.shape), g_phi.astype(phi.dtype), g_alpha.astype(alpha.dtype),
            g_bias.astype(bias.dtype))


def dynamic_coefficients_forward(x, phi, alpha, bias, n: int, iters: int, eps: float):
    """(H_pre [..., n], H_post [..., n], H_res [..., n, n], m [T, W], 1/r [T]) for x [..., n, C]."""
    lead, C = x.shape[:-2], x.shape[-1]
    x2 = x.reshape(-1, n * C)
    H_pre, H_post, H_res, m, invr = dynamic_forward(x2, phi, alpha, bias, n, iters, eps)
    return H_pre.reshape(*lead, n), H_post.reshape(*lead, n), H_res.reshape(*lead, n, n), m, invr


@lru_cache(maxsize=None)
def _dynamic_function(n: int, iters: int, eps: float):
    @mx.custom_function
    def coefficients(x, phi, alpha, bias):
        return dynamic_coefficients_forward(x, phi, alpha, bias, n, iters, eps)

    @coefficients.vjp
    def coefficients_vjp(primals, cotangents, outputs):
        return dynamic_vjp(primals, cotangents, outputs, n, iters)

    return coefficients


@lru_cache(maxsize=None)
def _chained_function(n: int, iters: int, eps: float):
    """As _dynamic_function, with x passed through as a sixth output for the site's next op to
    read: that op's backward hands its x cotangent back here, added in this backward's kernel."""

    @mx.custom_function
    def coefficients(x, phi, alpha, bias):
        return (*dynamic_coefficients_forward(x, phi, alpha, bias, n, iters, eps), x)

    @coefficients.vjp
    def coefficients_vjp(primals, cotangents, outputs):
        return dynamic_vjp(primals, cotangents[:3], outputs[:5], n, iters, gacc=cotangents[5])

    return coefficients


def mhc_coefficients(x, phi, alpha, bias, iters: int = 20, eps: float = 1e-6):
    n = x.shape[-2]
    if phi is None:
        return _static_function(n, iters)(bias)
    return _dynamic_function(n, iters, float(eps))(x, phi, alpha, bias)[:3]


def mhc_coefficients_chained(x, phi, alpha, bias, iters: int = 20, eps: float = 1e-6):
    """(H_pre, H_post, H_res, x') for a dynamic site: x' is x, to be read by the site's next op
    in place of x (site.py, "chained")."""
    H_pre, H_post, H_res, _, _, x_next = _chained_function(x.shape[-2], iters, float(eps))(x, phi, alpha, bias)
    return H_pre, H_post, H_res, x_next


watch(__name__)  # settings assigned later bump build.settings_epoch
