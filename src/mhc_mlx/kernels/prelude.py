"""The thin macro layer that lets one kernel body compile as CUDA and as Metal.

Every kernel body in this package is written once against the K* names below. The CUDA
prelude maps them to CUDA built-ins, the Metal prelude to Metal ones; nothing else differs.
Shared device routines (warp sums, the warp-parallel Sinkhorn) live here too, written only
in K* names, so the logic measured on CUDA is the logic that runs on Metal.

MLX looks for Metal thread attributes (thread_position_in_threadgroup, ...) by substring
search of the kernel *body*, never the header. Each body therefore ends with ATTRIBUTES_NOTE,
a comment naming the attributes the macros use; on CUDA it is just a comment.
"""

from __future__ import annotations

import re

# Named in every body so MLX's Metal signature writer declares these attributes.
ATTRIBUTES_NOTE = (
    "\n// attributes used by the K* macros: thread_position_in_threadgroup threadgroup_position_in_grid"
    " threads_per_threadgroup threadgroups_per_grid thread_index_in_simdgroup"
    " simdgroup_index_in_threadgroup\n"
)

CUDA_MACROS = r"""
#define MHC_BACKEND_CUDA 1
#define KDEV __device__ __forceinline__
#define KSHARED __shared__
#define KSHPTR(type) type*
#define KFLOAT4(a, b, c, d) make_float4((a), (b), (c), (d))
#define KWARP_SYNC() __syncwarp()
#define KTHREAD
#define KBARRIER() __syncthreads()
#define KTID ((int)threadIdx.x)
#define KBID ((int)blockIdx.x)
#define KNT ((int)blockDim.x)
#define KNB ((int)gridDim.x)
#define KLANE ((int)(threadIdx.x & 31u))
#define KWARP ((int)(threadIdx.x >> 5))
#define KUNROLL _Pragma("unroll")
#define KEXP(v) expf(v)
#define KLOG(v) logf(v)
#define KSQRT(v) sqrtf(v)
#define KMAX(a, b) fmaxf((a), (b))
#define KRCP(v) krcp(v)
#define KALIGNED16(p) ((reinterpret_cast<unsigned long long>(p) & 15ull) == 0ull)
// A hint to bring p's cache line into L2 (no register, no wait; a no-op where unsupported)
#define KPREFETCH_L2(p) asm volatile("prefetch.L2 [%0];" ::"l"(p))
// A float passed as its bits in a template int (no parameter array to read: see build.float_bits)
#define KBITS_FLOAT(b) __int_as_float(b)

// 1 / s for the Sinkhorn normalisations: the approximate reciprocal and one Newton step (within
// an ulp of 1.0f / s for the normal s the callers clamp to). With 1.0f / s (a slow-path branch
// per reciprocal, the likely reason a step's N reciprocals did not overlap) 20 iterations of one
// 4 x 4 Sinkhorn took ~8 µs of a 12 µs kernel on the H200 (2026-11-30, ncu); with this ~1.
KDEV float krcp(float s) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(s));
  return fmaf(r, fmaf(-s, r, 1.0f), r);
}
KDEV float kwarp_sum(float v) {
  KUNROLL for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
KDEV float kwarp_max(float v) {
  KUNROLL for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
KDEV float kshfl(float v, int src) { return __shfl_sync(0xffffffffu, v, src); }
KDEV float kshfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

// V consecutive elements of type T at p[off], as floats: one 16-byte load when `vec` holds.
template <typename T, int V, typename P>
KDEV void kload(float* dst, P p, int64_t off, bool vec) {
  if (V > 1 && vec) {
    auto w = *reinterpret_cast<const mlx::core::cu::AlignedVector<T, V>*>(p + off);
    KUNROLL for (int e = 0; e < V; ++e) dst[e] = static_cast<float>(w[e]);
  } else {
    KUNROLL for (int e = 0; e < V; ++e) dst[e] = static_cast<float>(p[off + e]);
  }
}
template <typename T, int V, typename P>
KDEV void kstore(P p, int64_t off, const float* src, bool vec) {
  if (V > 1 && vec) {
    mlx::core::cu::AlignedVector<T, V> w;
    KUNROLL for (int e = 0; e < V; ++e) w[e] = static_cast<T>(src[e]);
    *reinterpret_cast<mlx::core::cu::AlignedVector<T, V>*>(p + off) = w;
  } else {
    KUNROLL for (int e = 0; e < V; ++e) p[off + e] = static_cast<T>(src[e]);
  }
}
"""

METAL_MACROS = r"""
#define MHC_BACKEND_METAL 1
#define KDEV inline
#define KSHARED threadgroup
#define KSHPTR(type) threadgroup type*
#define KFLOAT4(a, b, c, d) float4((a), (b), (c), (d))
#define KWARP_SYNC() metal::simdgroup_barrier(mem_flags::mem_threadgroup)
#define KTHREAD thread
#define KBARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define KTID ((int)thread_position_in_threadgroup.x)
#define KBID ((int)threadgroup_position_in_grid.x)
#define KNT ((int)threads_per_threadgroup.x)
#define KNB ((int)threadgroups_per_grid.x)
#define KLANE ((int)thread_index_in_simdgroup)
#define KWARP ((int)simdgroup_index_in_threadgroup)
#define KUNROLL _Pragma("unroll")
#define KEXP(v) metal::precise::exp(v)
#define KLOG(v) metal::precise::log(v)
#define KSQRT(v) metal::precise::sqrt(v)
#define KMAX(a, b) metal::max((a), (b))
#define KRCP(v) (1.0f / (v))
#define KALIGNED16(p) (true)
#define KPREFETCH_L2(p) ((void)0)
#define KBITS_FLOAT(b) as_type<float>((int)(b))

KDEV float kwarp_sum(float v) { return metal::simd_sum(v); }
KDEV float kwarp_max(float v) { return metal::simd_max(v); }
KDEV float kshfl(float v, int src) { return metal::simd_shuffle(v, (ushort)src); }
KDEV float kshfl_xor(float v, int mask) { return metal::simd_shuffle_xor(v, (ushort)mask); }

// Element loads on Metal: the compiler merges them, and they work in any address space.
template <typename T, int V, typename P>
KDEV void kload(thread float* dst, P p, int64_t off, bool vec) {
  KUNROLL for (int e = 0; e < V; ++e) dst[e] = static_cast<float>(p[off + e]);
}
template <typename T, int V, typename P>
KDEV void kstore(P p, int64_t off, thread const float* src, bool vec) {
  KUNROLL for (int e = 0; e < V; ++e) p[off + e] = static_cast<T>(src[e]);
}
"""

# Up to this n every lane of a warp runs the whole Sinkhorn on its own copy (ksinkhorn_warp);
# the kernels read it as SINKHORN_THREAD_MAX_N, sinkhorn.py when it picks a template.
SINKHORN_THREAD_MAX_N = 8

# Backend-neutral device code, written only in K* names.
COMMON = r"""
#define MHC_TINY 1e-30f
#define MHC_NEG_BIG (-3.0e38f)
#define SINKHORN_THREAD_MAX_N @SINKHORN_THREAD_MAX_N@

//@part ksigmoid
KDEV float ksigmoid(float v) { return 1.0f / (1.0f + KEXP(-v)); }

//@part kblock_sum
// Sum of v over the threadgroup; `scratch` holds one float per warp. Every thread gets it.
// (Helpers take lane/warp as arguments: on Metal the thread attributes are kernel parameters.)
KDEV float kblock_sum(float v, KSHPTR(float) scratch, int lane, int warp, int nwarps) {
  v = kwarp_sum(v);
  KBARRIER();
  if (lane == 0) scratch[warp] = v;
  KBARRIER();
  float s = 0.0f;
  for (int w = 0; w < nwarps; ++w) s += scratch[w];
  KBARRIER();
  return s;
}

//@part kblock_reduce
// NV sums at once over the threadgroup (scratch: nwarps * NV floats). Thread tid < NV gets
// the total of vals[tid]; the others get 0. Ends with a barrier, so scratch can be reused.
template <int NV>
KDEV float kblock_reduce(KTHREAD float* vals, KSHPTR(float) scratch, int lane, int warp, int nwarps,
                         int tid) {
  KUNROLL for (int i = 0; i < NV; ++i) {
    const float s = kwarp_sum(vals[i]);
    if (lane == 0) scratch[warp * NV + i] = s;
  }
  KBARRIER();
  float total = 0.0f;
  if (tid < NV)
    for (int w = 0; w < nwarps; ++w) total += scratch[w * NV + tid];
  KBARRIER();
  return total;
}

//@part ksinkhorn_thread
// Sinkhorn-Knopp on one N x N matrix held by one thread (p row-major, logits on entry, the
// doubly stochastic matrix on exit): P = exp(L - max L), then `iters` times: scale by the
// reciprocal column sums, then row sums, each clamped at MHC_TINY. No warp exchange inside the
// loop: on the H100 the warp form below spent ~35 µs on 20 iterations of a 4 x 4 matrix, its
// chain of 5-level shuffles per row sum being the critical path (scripts/gpu_profile.py).
template <int N>
KDEV void ksinkhorn_thread(KTHREAD float* p, int iters) {
  float m = MHC_NEG_BIG;
  KUNROLL for (int a = 0; a < N * N; ++a) m = KMAX(m, p[a]);
  KUNROLL for (int a = 0; a < N * N; ++a) p[a] = KEXP(p[a] - m);
  for (int it = 0; it < iters; ++it) {
    KUNROLL for (int j = 0; j < N; ++j) {
      float s = p[j];
      KUNROLL for (int i = 1; i < N; ++i) s += p[i * N + j];
      const float r = KRCP(KMAX(s, MHC_TINY));
      KUNROLL for (int i = 0; i < N; ++i) p[i * N + j] *= r;
    }
    KUNROLL for (int i = 0; i < N; ++i) {
      float s = p[i * N];
      KUNROLL for (int j = 1; j < N; ++j) s += p[i * N + j];
      const float r = KRCP(KMAX(s, MHC_TINY));
      KUNROLL for (int j = 0; j < N; ++j) p[i * N + j] *= r;
    }
  }
}

//@part ktranspose_row_sum
// Row sums of an N x N matrix held by columns (lane j holds col[i] = P_ij; dead lanes zeros):
// lane l returns the sum of row l (0 for l >= N). Recursive halving: at each of the five levels
// a lane keeps half of its rows, sends the other half to its partner and adds what it
// receives, 31 shuffles in all and five levels deep, against 32 five-shuffle warp sums.
template <int N>
KDEV float ktranspose_row_sum(KTHREAD const float* col) {
  float v[32];
  KUNROLL for (int i = 0; i < 32; ++i) v[i] = i < N ? col[i] : 0.0f;
  const int lane = KLANE;
  // the five levels written out: each inner loop has a constant trip count, so v stays in
  // registers (a shifting outer loop left v on the stack)
#define MHC_TR_LEVEL(O)                                        \
  {                                                            \
    const bool upper = (lane & (O)) != 0;                      \
    KUNROLL for (int k = 0; k < (O); ++k) {                    \
      const float send = upper ? v[k] : v[k + (O)];            \
      const float keep = upper ? v[k + (O)] : v[k];            \
      v[k] = keep + kshfl_xor(send, (O));                      \
    }                                                          \
  }
  MHC_TR_LEVEL(16) MHC_TR_LEVEL(8) MHC_TR_LEVEL(4) MHC_TR_LEVEL(2) MHC_TR_LEVEL(1)
#undef MHC_TR_LEVEL
  return v[0];
}

//@part ksinkhorn_warp
// Warp-parallel Sinkhorn-Knopp on one N x N matrix (N <= 32): lane j holds column j in
// col[0..N); lanes j >= N hold zeros. On entry col holds the logits (dead lanes: anything),
// on exit the doubly stochastic matrix. P = exp(L - max L), then `iters` times: divide by
// column sums, then by row sums, each sum clamped at MHC_TINY. For N <= SINKHORN_THREAD_MAX_N
// every lane gathers the whole matrix once (N * N shuffles, none of them chained) and runs
// ksinkhorn_thread on it, the same instructions in every lane; lane j keeps column j.
// For N > SINKHORN_THREAD_MAX_N the row sums come from ktranspose_row_sum and each
// normalisation is one reciprocal per column or row and products. H200 (2026-11-29): the
// n = 32 static coefficients at B = 1 took 84.1 µs against 359.7, 4096 matrices 49.3 µs
// against 168.4, for the earlier form (n warp sums and 2n divisions per step).
template <int N>
KDEV void ksinkhorn_warp(KTHREAD float* col, bool live, int iters) {
  constexpr int PN = N <= SINKHORN_THREAD_MAX_N ? N : 1;  // PN == N where this branch runs
  if (N <= SINKHORN_THREAD_MAX_N) {
    float p[PN * PN];
    KUNROLL for (int i = 0; i < PN; ++i) {
      const float c = live ? col[i] : MHC_NEG_BIG;  // dead entries: exp(-big) = 0
      KUNROLL for (int j = 0; j < PN; ++j) p[i * PN + j] = kshfl(c, j);
    }
    ksinkhorn_thread<PN>(p, iters);
    const int lane = KLANE;
    KUNROLL for (int i = 0; i < PN; ++i) {
      float v = 0.0f;
      KUNROLL for (int j = 0; j < PN; ++j) v = (lane == j) ? p[i * PN + j] : v;
      col[i] = live ? v : 0.0f;
    }
    return;
  }
  float m = MHC_NEG_BIG;
  KUNROLL for (int i = 0; i < N; ++i) m = KMAX(m, live ? col[i] : MHC_NEG_BIG);
  m = kwarp_max(m);
  KUNROLL for (int i = 0; i < N; ++i) col[i] = live ? KEXP(col[i] - m) : 0.0f;
  for (int it = 0; it < iters; ++it) {
    float s = 0.0f;
    KUNROLL for (int i = 0; i < N; ++i) s += col[i];
    const float cinv = KRCP(KMAX(s, MHC_TINY));
    KUNROLL for (int i = 0; i < N; ++i) col[i] *= cinv;
    const float rinv = KRCP(KMAX(ktranspose_row_sum<N>(col), MHC_TINY));  // row `lane`
    KUNROLL for (int i = 0; i < N; ++i) col[i] *= kshfl(rinv, i);
  }
}

//@part ksinkhorn_warp_vjp
// Its exact backward: on entry lc = logits column, g = cotangent column; on exit g = dL.
// The gradient is carried with respect to log P (as compiled/sinkhorn.py explains): for each
// normalisation out = P / s, d(log P) = d(log out) - out * sum(d(log out)), bounded by
// construction, where the P-space form's 1/s factors overflow into inf * 0 = NaN for logits
// spread by more than ~70. The forward is replayed once, keeping per step the sums (to know
// which were clamped) and the cumulative log scalings lu (row `lane`) and lv (own column), so
// each step's output is exp((L - m)_ij + lu_i + lv_j) again, finite at any spread; entries
// whose exp(L - m) underflowed to 0 stay 0, as in the forward.
template <int N, int ITERS>
KDEV void ksinkhorn_warp_vjp(KTHREAD float* lc, KTHREAD float* g, bool live, int lane) {
  float m = MHC_NEG_BIG;
  KUNROLL for (int i = 0; i < N; ++i) m = KMAX(m, live ? lc[i] : MHC_NEG_BIG);
  m = kwarp_max(m);
  float p[N];
  unsigned int at_max = 0u, zero0 = 0u;
  KUNROLL for (int i = 0; i < N; ++i) {
    lc[i] = live ? lc[i] - m : 0.0f;  // log P0
    p[i] = live ? KEXP(lc[i]) : 0.0f;
    if (live && lc[i] == 0.0f) at_max |= (1u << i);
    if (!live || p[i] == 0.0f) zero0 |= (1u << i);
  }
  float cs[ITERS];  // column sums (own column)
  float lv[ITERS];  // cumulative log column scaling after each column step (own column)
  float rs[ITERS];  // row sums (row `lane`)
  float lu[ITERS];  // cumulative log row scaling after each row step (row `lane`)
  float v = 0.0f, u = 0.0f;
  KUNROLL for (int k = 0; k < ITERS; ++k) {
    float s = 0.0f;
    KUNROLL for (int i = 0; i < N; ++i) s += p[i];
    const float sc = KMAX(s, MHC_TINY);
    cs[k] = s;
    v -= KLOG(sc);
    lv[k] = v;
    KUNROLL for (int i = 0; i < N; ++i) p[i] = p[i] / sc;
    float mine = 1.0f;
    KUNROLL for (int i = 0; i < N; ++i) {
      const float r = kwarp_sum(p[i]);
      p[i] = p[i] / KMAX(r, MHC_TINY);
      mine = (lane == i) ? r : mine;
    }
    rs[k] = mine;
    u -= KLOG(KMAX(mine, MHC_TINY));
    lu[k] = u;
  }
  KUNROLL for (int i = 0; i < N; ++i) g[i] = live ? g[i] * p[i] : 0.0f;  // d(log P_T)
  KUNROLL for (int k = ITERS - 1; k >= 0; --k) {
    // row step k: out_ij = exp(logP0_ij + lu_k[i] + lv_k[j]), normalised by the row sums rs[k]
    KUNROLL for (int i = 0; i < N; ++i) {
      const float li = kshfl(lu[k], i);
      const float si = kshfl(rs[k], i);
      const float total = kwarp_sum(g[i]);
      const float out = ((zero0 >> i) & 1u) ? 0.0f : KEXP(lc[i] + li + lv[k]);
      g[i] -= (si > MHC_TINY) ? out * total : 0.0f;
    }
    // column step k: out_ij = exp(logP0_ij + lu_{k-1}[i] + lv_k[j]), normalised by cs[k]
    float total = 0.0f;
    KUNROLL for (int i = 0; i < N; ++i) total += g[i];
    const bool col_live = cs[k] > MHC_TINY;
    KUNROLL for (int i = 0; i < N; ++i) {
      const float li = (k > 0) ? kshfl(lu[k > 0 ? k - 1 : 0], i) : 0.0f;
      const float out = ((zero0 >> i) & 1u) ? 0.0f : KEXP(lc[i] + li + lv[k]);
      g[i] = live ? g[i] - (col_live ? out * total : 0.0f) : 0.0f;
    }
  }
  // log P0 = L - m: the max's share only matters where a clamp broke shift invariance; route
  // it to the argmax entries, split between ties (as autodiff does).
  float local = 0.0f, ties = 0.0f;
  KUNROLL for (int i = 0; i < N; ++i) {
    local += g[i];
    ties += ((at_max >> i) & 1u) ? 1.0f : 0.0f;
  }
  const float shift = kwarp_sum(local);
  const float count = kwarp_sum(ties);
  KUNROLL for (int i = 0; i < N; ++i)
    if ((at_max >> i) & 1u) g[i] -= shift / count;
}

//@part kgroup_sum
// Sum (max) of v over aligned groups of Q lanes (Q a power of two <= 32): every lane of the group
// gets it. Butterfly: lanes add the same pairs in mirrored order, so all get the same bits.
template <int Q>
KDEV float kgroup_sum(float v) {
  KUNROLL for (int o = 1; o < Q; o <<= 1) v += kshfl_xor(v, o);
  return v;
}
template <int Q>
KDEV float kgroup_max(float v) {
  KUNROLL for (int o = 1; o < Q; o <<= 1) v = KMAX(v, kshfl_xor(v, o));
  return v;
}

//@part ksinkhorn_rows_vjp
// ksinkhorn_thread_vjp's backward with the matrix spread over Q lanes (Q a power of two >= N,
// aligned in the warp): the lane of row r = lane % Q holds row r of the logits (lp) and of the
// cotangent (g), N each; rows r >= N and lanes of dead tokens pass live = false (every lane must
// call it: the column sums are group exchanges). On exit g = dL of its row. The same steps as
// the one-thread form, each lane keeping its row's log scalings and every column's (the column
// sums are exchanged, so each lane has them all): ~N + 1 floats per step instead of 2N, and N
// times the threads. Why: with one thread per token the 4096-token glue kernel ran one warp per
// SM with every latency exposed and 1.3 KB of spills per thread (docs/kernel-notes.md).
template <int N, int Q, int ITERS>
KDEV void ksinkhorn_rows_vjp(KTHREAD float* lp, KTHREAD float* g, bool live) {
  constexpr int NW = (ITERS + 31) / 32;
  float m = MHC_NEG_BIG;
  KUNROLL for (int j = 0; j < N; ++j) m = KMAX(m, live ? lp[j] : MHC_NEG_BIG);
  m = kgroup_max<Q>(m);
  float p[N];
  float ties = 0.0f;
  KUNROLL for (int j = 0; j < N; ++j) {
    lp[j] = live ? lp[j] - m : MHC_NEG_BIG;  // log P0; 0 at the argmax entries
    p[j] = live ? KEXP(lp[j]) : 0.0f;
    ties += (live && lp[j] == 0.0f) ? 1.0f : 0.0f;
    if (!live) g[j] = 0.0f;
  }
  ties = kgroup_sum<Q>(ties);
  float lu[ITERS];      // this row's cumulative log scaling after row step k
  float lv[ITERS * N];  // every column's cumulative log scaling after column step k
  unsigned int rclamp[NW], cclamp[NW * N];
  KUNROLL for (int w = 0; w < NW; ++w) rclamp[w] = 0u;
  KUNROLL for (int w = 0; w < NW * N; ++w) cclamp[w] = 0u;
  float u = 0.0f;
  float v[N];
  KUNROLL for (int j = 0; j < N; ++j) v[j] = 0.0f;
  KUNROLL for (int k = 0; k < ITERS; ++k) {
    KUNROLL for (int j = 0; j < N; ++j) {
      const float s = kgroup_sum<Q>(p[j]);
      if (!(s > MHC_TINY)) cclamp[j * NW + k / 32] |= 1u << (k % 32);
      const float sc = KMAX(s, MHC_TINY);
      v[j] -= KLOG(sc);
      lv[k * N + j] = v[j];
      p[j] *= KRCP(sc);
    }
    float s = 0.0f;
    KUNROLL for (int j = 0; j < N; ++j) s += p[j];
    if (!(s > MHC_TINY)) rclamp[k / 32] |= 1u << (k % 32);
    const float sc = KMAX(s, MHC_TINY);
    u -= KLOG(sc);
    lu[k] = u;
    const float r = KRCP(sc);
    KUNROLL for (int j = 0; j < N; ++j) p[j] *= r;
  }
  KUNROLL for (int j = 0; j < N; ++j) {
    g[j] *= p[j];  // d(log P_T)
    // entries whose exp(L - m) underflowed stay 0 in every step: exp(-big + finite) = 0
    if (KEXP(lp[j]) == 0.0f) lp[j] = MHC_NEG_BIG;
  }
  KUNROLL for (int k = ITERS - 1; k >= 0; --k) {
    // row step k: out_ij = exp(logP0_ij + lu_k[i] + lv_k[j]), normalised by its row sum
    if (!((rclamp[k / 32] >> (k % 32)) & 1u)) {
      float total = 0.0f;
      KUNROLL for (int j = 0; j < N; ++j) total += g[j];
      KUNROLL for (int j = 0; j < N; ++j) g[j] -= KEXP(lp[j] + lu[k] + lv[k * N + j]) * total;
    }
    // column step k: out_ij = exp(logP0_ij + lu_{k-1}[i] + lv_k[j]), normalised by its column sum
    const float li = (k > 0) ? lu[k > 0 ? k - 1 : 0] : 0.0f;
    KUNROLL for (int j = 0; j < N; ++j) {
      const float total = kgroup_sum<Q>(g[j]);
      if (!((cclamp[j * NW + k / 32] >> (k % 32)) & 1u))
        g[j] -= KEXP(lp[j] + li + lv[k * N + j]) * total;
    }
  }
  // log P0 = L - m: the max's share goes to the argmax entries, split between ties
  float shift = 0.0f;
  KUNROLL for (int j = 0; j < N; ++j) shift += g[j];
  shift = kgroup_sum<Q>(shift);
  KUNROLL for (int j = 0; j < N; ++j)
    if (live && lp[j] == 0.0f) g[j] -= shift / ties;
}

//@part ksinkhorn_thread_vjp
// The same backward for one whole N x N matrix held by one thread (lp = logits, g = cotangent,
// both row-major; on exit g = dL). No warp exchange: the warp form above chains 5-level
// shuffles through every step, ~69 µs for one 4 x 4 matrix on the H100 (ncu), as the forward
// did before ksinkhorn_thread. The replay keeps the cumulative log scalings of every step
// (2 * ITERS * N floats: registers for small N * ITERS, see sinkhorn.THREAD_VJP_MAX_WORK) and
// the clamped sums as bits (step k, index i: bit (k % 4) * 8 + i of word k / 4; N <= 8).
template <int N, int ITERS>
KDEV void ksinkhorn_thread_vjp(KTHREAD float* lp, KTHREAD float* g) {
  constexpr int NW = (ITERS + 3) / 4;
  float m = MHC_NEG_BIG;
  KUNROLL for (int a = 0; a < N * N; ++a) m = KMAX(m, lp[a]);
  float p[N * N];
  KUNROLL for (int a = 0; a < N * N; ++a) {
    lp[a] = lp[a] - m;  // log P0; 0 at the argmax entries
    p[a] = KEXP(lp[a]);
  }
  float ties = 0.0f;
  KUNROLL for (int a = 0; a < N * N; ++a) ties += (lp[a] == 0.0f) ? 1.0f : 0.0f;
  float lu[ITERS * N];  // cumulative log row scaling after row step k
  float lv[ITERS * N];  // cumulative log column scaling after column step k
  unsigned int rclamp[NW], cclamp[NW];
  KUNROLL for (int w = 0; w < NW; ++w) { rclamp[w] = 0u; cclamp[w] = 0u; }
  float u[N], v[N];
  KUNROLL for (int i = 0; i < N; ++i) { u[i] = 0.0f; v[i] = 0.0f; }
  KUNROLL for (int k = 0; k < ITERS; ++k) {
    KUNROLL for (int j = 0; j < N; ++j) {
      float s = 0.0f;
      KUNROLL for (int i = 0; i < N; ++i) s += p[i * N + j];
      if (!(s > MHC_TINY)) cclamp[k / 4] |= 1u << ((k % 4) * 8 + j);
      const float sc = KMAX(s, MHC_TINY);
      v[j] -= KLOG(sc);
      lv[k * N + j] = v[j];
      const float r = KRCP(sc);
      KUNROLL for (int i = 0; i < N; ++i) p[i * N + j] *= r;
    }
    KUNROLL for (int i = 0; i < N; ++i) {
      float s = 0.0f;
      KUNROLL for (int j = 0; j < N; ++j) s += p[i * N + j];
      if (!(s > MHC_TINY)) rclamp[k / 4] |= 1u << ((k % 4) * 8 + i);
      const float sc = KMAX(s, MHC_TINY);
      u[i] -= KLOG(sc);
      lu[k * N + i] = u[i];
      const float r = KRCP(sc);
      KUNROLL for (int j = 0; j < N; ++j) p[i * N + j] *= r;
    }
  }
  KUNROLL for (int a = 0; a < N * N; ++a) {
    g[a] *= p[a];  // d(log P_T)
    // entries whose exp(L - m) underflowed stay 0 in every step: exp(-big + finite) = 0
    if (KEXP(lp[a]) == 0.0f) lp[a] = MHC_NEG_BIG;
  }
  KUNROLL for (int k = ITERS - 1; k >= 0; --k) {
    // row step k: out_ij = exp(logP0_ij + lu_k[i] + lv_k[j]), normalised by its row sum
    KUNROLL for (int i = 0; i < N; ++i) {
      if ((rclamp[k / 4] >> ((k % 4) * 8 + i)) & 1u) continue;
      float total = 0.0f;
      KUNROLL for (int j = 0; j < N; ++j) total += g[i * N + j];
      KUNROLL for (int j = 0; j < N; ++j)
        g[i * N + j] -= KEXP(lp[i * N + j] + lu[k * N + i] + lv[k * N + j]) * total;
    }
    // column step k: out_ij = exp(logP0_ij + lu_{k-1}[i] + lv_k[j]), normalised by its column sum
    KUNROLL for (int j = 0; j < N; ++j) {
      if ((cclamp[k / 4] >> ((k % 4) * 8 + j)) & 1u) continue;
      float total = 0.0f;
      KUNROLL for (int i = 0; i < N; ++i) total += g[i * N + j];
      KUNROLL for (int i = 0; i < N; ++i) {
        const float li = (k > 0) ? lu[(k > 0 ? k - 1 : 0) * N + i] : 0.0f;
        g[i * N + j] -= KEXP(lp[i * N + j] + li + lv[k * N + j]) * total;
      }
    }
  }
  // log P0 = L - m: the max's share goes to the argmax entries, split between ties
  float shift = 0.0f;
  KUNROLL for (int a = 0; a < N * N; ++a) shift += g[a];
  KUNROLL for (int a = 0; a < N * N; ++a)
    if (lp[a] == 0.0f) g[a] -= shift / ties;
}

//@part ksinkhorn_thread_jvp
// Forward mode of ksinkhorn_thread: p = logits and t = their tangent on entry; on exit p = the
// doubly stochastic matrix (the same steps as ksinkhorn_thread) and t = its tangent. The tangent
// is carried as d(log P), as the backward carries its cotangent: a normalisation out = P / s
// gives d(log out) = d(log P) - sum(out * d(log P)) over the summed row or column, bounded at any
// spread; a clamped sum (s <= MHC_TINY, a constant) leaves it as is. Entries whose exp(L - m)
// underflowed to 0 weigh nothing in the sums and get tangent 0. The max's tangent (split between
// ties, as autodiff does) only matters where a clamp broke shift invariance. With t = e_a this
// gives column a of the Jacobian, so the Jacobian transpose applied to a cotangent is the
// backward (coefficients.SINKHORN_JACOBIAN).
template <int N>
KDEV void ksinkhorn_jvp_normalise(KTHREAD float* p, KTHREAD float* t, int base, int stride) {
  // one row (stride 1) or column (stride N) of ksinkhorn_thread_jvp's step
  float s = p[base];
  KUNROLL for (int k = 1; k < N; ++k) s += p[base + k * stride];
  const float r = KRCP(KMAX(s, MHC_TINY));
  float w = 0.0f;
  KUNROLL for (int k = 0; k < N; ++k) {
    p[base + k * stride] *= r;
    w += p[base + k * stride] * t[base + k * stride];
  }
  if (s > MHC_TINY) {
    KUNROLL for (int k = 0; k < N; ++k) t[base + k * stride] -= w;
  }
}
template <int N>
KDEV void ksinkhorn_thread_jvp(KTHREAD float* p, KTHREAD float* t, int iters) {
  float m = MHC_NEG_BIG;
  KUNROLL for (int a = 0; a < N * N; ++a) m = KMAX(m, p[a]);
  float ties = 0.0f, dm = 0.0f;
  KUNROLL for (int a = 0; a < N * N; ++a) {
    if (p[a] == m) {
      ties += 1.0f;
      dm += t[a];
    }
  }
  dm = dm / ties;
  KUNROLL for (int a = 0; a < N * N; ++a) {
    p[a] = KEXP(p[a] - m);
    t[a] -= dm;
  }
  for (int it = 0; it < iters; ++it) {
    KUNROLL for (int j = 0; j < N; ++j) ksinkhorn_jvp_normalise<N>(p, t, j, N);
    KUNROLL for (int i = 0; i < N; ++i) ksinkhorn_jvp_normalise<N>(p, t, i * N, 1);
  }
  KUNROLL for (int a = 0; a < N * N; ++a) t[a] *= p[a];  // dP = P d(log P)
}

//@part ksinkhorn_jacobian_column
// Column a of the Sinkhorn's Jacobian, d P / d L_a, into col (N * N), by ksinkhorn_thread_jvp;
// p holds the logits on entry and the doubly stochastic matrix on exit.
template <int N>
KDEV void ksinkhorn_jacobian_column(KTHREAD float* p, KTHREAD float* col, int a, int iters) {
  KUNROLL for (int b = 0; b < N * N; ++b) col[b] = b == a ? 1.0f : 0.0f;
  ksinkhorn_thread_jvp<N>(p, col, iters);
}
""".replace("@SINKHORN_THREAD_MAX_N@", str(SINKHORN_THREAD_MAX_N))


def _parts(common: str) -> list[tuple[str, str]]:
    """COMMON cut at its `//@part name` markers: [("", base), (name, text), ...] in order."""
    pieces = common.split("//@part ")
    out = [("", pieces[0])]
    for piece in pieces[1:]:
        name, _, text = piece.partition("\n")
        out.append((name.strip(), text))
    return out


COMMON_PARTS = _parts(COMMON)


def common_for(uses: str) -> str:
    """The parts of COMMON that `uses` (a kernel's helpers and body) names, with the parts they
    name in turn, in COMMON's order; the base part (constants) always."""
    need, scan = {""}, uses
    grew = True
    while grew:
        grew = False
        for name, text in COMMON_PARTS:
            if name not in need and re.search(rf"\b{name}\b", scan):
                need.add(name)
                scan += text
                grew = True
    return "".join(text for name, text in COMMON_PARTS if name in need)


def compact(text: str) -> str:
    """text without its whole-line // comments and blank lines. MLX hashes a custom kernel's
    whole source on every launch (mlx/backend/cuda/custom_kernel.cpp), so headers stay short;
    bodies keep theirs (MLX reads the Metal attributes from ATTRIBUTES_NOTE, a comment)."""
    return "".join(line + "\n" for line in text.splitlines() if line.strip() and not line.lstrip().startswith("//"))


def header(backend: str, uses: str | None = None) -> str:
    """The header for one backend: its macros, then the shared device code (all of it, or
    only what `uses` names: common_for)."""
    common = COMMON if uses is None else common_for(uses)
    if backend == "cuda":
        return CUDA_MACROS + common
    if backend == "metal":
        return METAL_MACROS + common
    raise ValueError(f"unknown kernel backend {backend!r}; expected 'cuda' or 'metal'")


# Tokens that must never reach a Metal compiler (the CUDA macro layer's vocabulary).
CUDA_ONLY_TOKENS = (
    "__global__", "__device__", "__shared__", "__syncthreads", "__shfl", "threadIdx",
    "blockIdx", "blockDim", "gridDim", "__forceinline__", "__nv_bfloat16", "__half",
    "cooperative_groups", "AlignedVector", "mlx::core::cu", "expf(", "logf(", "sqrtf(", "fmaxf(",
    "__int_as_float",
)
