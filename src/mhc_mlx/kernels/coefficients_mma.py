"""CUDA only: the dynamic coefficients' GEMM on tensor cores (the default form for large 16-bit x).

The fused dynamic kernel (coefficients.py) does xf @ phi on FP32 cores and is latency-bound
at 151 registers per thread (docs/kernel-notes.md). Here each warp runs `mma.sync` m16n8k16
bf16 tiles with float32 accumulation, split over K so every SM holds many warps:

- x is exact in bfloat16; float16 x is split into two bfloat16 parts (hi + lo, exact).
- phi (float32) is split into three bfloat16 parts p1 + p2 + p3 (24 significant bits, i.e.
  float32's), packed once per call into the per-lane order of the B fragments. Every product
  of parts is exact in float32 and the tensor core accumulates in float32, so the result has
  float32 accuracy, not bfloat16's.
- A lane loads 8 consecutive elements of a token's row (one 16-byte load) and uses them as
  its A-fragment elements of two k16 steps. The sum over k does not care which k sits where,
  as long as A and B agree: phi is packed with the same permutation (`pack_phi`).
- Each warp owns MT tiles of 16 tokens and one slice of K; it writes partial dot products
  [split, token, column] and partial sums of squares. The finishing kernel (FINISH) adds the
  partials and runs the activations and Sinkhorn per token; PACK lays phi out once per call.

The default form for 16-bit x on CUDA from coefficients.MMA_MIN_ELEMENTS elements of x up
(coefficients.DYNAMIC_FORM). It passed every coefficients case of `scripts/gpu_check.py` on the
H100 (2026-11-25) and on the H200 (2026-11-29: the earlier k loop at X_UNROLL 1, 2 and 4;
KLOOP at 1 and at 2, the default); `scripts/gpu_experiments.py` times it against the fused
kernel. The layout
logic is checked on the CPU by a NumPy model of the lanes and the g++ emulator (tests/kernels).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from .build import KernelSpec, float_params, int_params, launch, watch

F32 = mx.float32
PHI_PARTS = 3
WARPS_PER_BLOCK = 4
# Warps of the partials' launch: one wave where 3 blocks of 4 warps fit per SM (nvcc, sm_90a: 136
# registers at n = 4, bfloat16, X_UNROLL 2) on 132 SMs (H100, H200): 1584 resident, the plan
# takes 12 splits of 128 warps at 4096 tokens. At 2048 (16 splits) a third of the blocks ran in
# a second wave: partials alone 110.2 against 133.1 µs, the dynamic fwd 250.9 against 259.1
# (H200, medians of 5 alternated runs, docs/kernel-notes.md row 34).
TARGET_WARPS = 1536
# 16-byte loads of x per row and lane in one step (the MMA and PACK kernels' KU): a step covers
# 32 * KU consecutive k of each of the warp's token rows, 16 * KU bytes per lane, contiguous
# across its four lanes. At KU = 1 each row is read in 64-byte pieces one step apart, on
# rows 32 KB apart; the ncu profiles (H100 2026-11-25, H200 2026-11-29) had this kernel
# reading x at 760-920 GB/s where pre and post, which read whole rows, reach 2.4-3.0 TB/s. On
# the H200, 2 and 4 passed the GPU check; with the earlier k loop neither beat 1, with KLOOP
# 2 did (pack + mma 128.4 against 134.0 µs, then 96.0-110.7 against 130.4-134.1 over five
# launch sizes; docs/kernel-notes.md, rows 13 and 16).
X_UNROLL = 2
# The partials by Hopper's warpgroup MMA (MMA_WG, sm_90a; MLX compiles custom kernels for sm_90a
# on such GPUs) for bfloat16 x at n = 4; elsewhere the MMA kernel. H200 (gpu_experiments.py
# parts, vendor-gemm): the MMA kernel spans 66.9 / 53.9 / 46.3 µs per application with phi in
# 3 / 2 / 1 parts, and staging every load through shared memory did not change it (64.3): it is
# bound by its mma.sync's (36 m16n8k16 per 64 tokens and k16 step at n = 4), where cuBLAS's wgmma
# kernel does the same 72-column product in 37.8. Here a warpgroup issues 3 m64n24k16 per 64
# tokens and k16 step, A (x) from registers as MMA loads it, B (phi's parts) from shared memory:
# the same bits as MMA, 49.2 µs against 66.6-68.0; with dphi's (coefficients_mma_vjp.DPHI_WGMMA)
# 14-22 µs off the dynamic fwd+bwd in one process (a candidate in the thirteenth session, the
# default since the fourteenth's GPU tests; docs/kernel-notes.md rows 74-75). False: the MMA
# kernel everywhere.
WGMMA = True

# The tensor-core instruction (tests substitute a CPU model of it, with the same fragments).
PTX_MMA = r"""
__device__ __forceinline__ void mhc_mma_bf16(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
"""

X_PARTS = r"""
__device__ __forceinline__ uint32_t mhc_pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// One 32-bit word of x (two elements, lower k in the low half) -> its bfloat16 parts, and the
// sum of the two squares. bfloat16 x is its own single part; float16 x is hi + lo (exact).
template <typename T> struct mhc_x_parts;
template <> struct mhc_x_parts<__nv_bfloat16> {
  static constexpr int count = 1;
  static __device__ __forceinline__ float split(uint32_t w, uint32_t& hi, uint32_t& lo) {
    const float a = __uint_as_float(w << 16);
    const float b = __uint_as_float(w & 0xffff0000u);
    hi = w;
    lo = 0u;
    return a * a + b * b;
  }
};
template <> struct mhc_x_parts<__half> {
  static constexpr int count = 2;
  static __device__ __forceinline__ float split(uint32_t w, uint32_t& hi, uint32_t& lo) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    hi = mhc_pack_bf16(f.x, f.y);
    const float2 h = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&hi));
    lo = mhc_pack_bf16(f.x - h.x, f.y - h.y);
    return f.x * f.x + f.y * f.y;
  }
};

// The A registers of k step s (0, 1: k + 0..7, k + 8..15 of a row's 16) of an m16n8k16 tile
// from the words of its rows g (w[0]) and g + 8 (w[1]): the same for mma.sync and wgmma.
__device__ __forceinline__ void mhc_a_step(const uint32_t (&w)[2][4], int s, uint32_t (&a)[4]) {
  a[0] = w[0][2 * s]; a[1] = w[1][2 * s];
  a[2] = w[0][2 * s + 1]; a[3] = w[1][2 * s + 1];
}
"""

# One token row's outputs, shared by MMA and MMA_WG: its sum of squares (the row's four lanes c
# hold partials; every lane of the warp takes part in the shuffles) and its accumulators, which
# both product forms leave as d[4 j + 2 h + e] at column 8 j + 2 c + e (h: the row's half of the
# 16-row tile, rows g and g + 8).
PARTIALS_ROW = r"""
template <int NT>
__device__ __forceinline__ void mhc_partials_row(float* part, float* ssq, int64_t row, bool valid, int c, int h,
                                                 float sq, const float* d) {
  sq += __shfl_xor_sync(0xffffffffu, sq, 1);
  sq += __shfl_xor_sync(0xffffffffu, sq, 2);
  if (!valid) return;
  if (c == 0) ssq[row] = sq;
  float* out = part + row * (8 * NT);
  #pragma unroll
  for (int j = 0; j < NT; ++j) {
    out[8 * j + 2 * c] = d[4 * j + 2 * h];
    out[8 * j + 2 * c + 1] = d[4 * j + 2 * h + 1];
  }
}
"""

# 8 consecutive elements of x from row[kx] as four 32-bit words (lower k in the low half; zeros
# past K, or everywhere for row == nullptr): one 16-byte load when xvec, else element by element.
# Shared by the tensor-core kernels here and in coefficients_mma_vjp.py.
LOAD_X = r"""
template <typename T>
__device__ __forceinline__ void mhc_load_x8(const T* row, int kx, int K, bool xvec, uint32_t* w) {
  #pragma unroll
  for (int q = 0; q < 4; ++q) w[q] = 0u;
  if (row == nullptr) return;
  if (xvec && kx + 8 <= K) {
    const uint4 v = *reinterpret_cast<const uint4*>(row + kx);
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  } else {
    #pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (kx + e < K) {
        const T val = row[kx + e];
        const uint32_t bits = (uint32_t)(*reinterpret_cast<const unsigned short*>(&val));
        w[e >> 1] |= bits << (16 * (e & 1));
      }
    }
  }
}
"""

# The MMA kernel's k loop over [k0, k1) in steps of 32 * KU k. Per step x's 16-byte loads first (LOAD), then per k block each A fragment assembled once (not
# before each of its NT * PB mma's) and phi's fragments loaded from 32-bit offsets (STEP).
# BVEC: phi's fragments by 16-byte loads; without it by 2-byte words (the packed phi is a fresh
# MLX allocation, so only a misaligned buffer takes that path). H200 (2026-11-29): pack + mma
# 134.0 / 128.4 µs at KU = 1 / 2 against 156.1 / 164.7 for the earlier loop, which rebuilt each
# A fragment before every mma and had both load forms inline. Issuing the next step's loads
# before the current step's mma's (two register buffers, 172 registers) did not gain (docs/
# kernel-notes.md row 34).
KLOOP = r"""
template <typename T, int MT, int KU>
__device__ __forceinline__ void mhc_mma_load_step(const T* xin, int Ttok, int K, int kb, int t0, int lane, bool xvec,
                                                  uint32_t (&wx)[KU][MT][2][4]) {
  const int g = lane >> 2;
  const int c = lane & 3;
  #pragma unroll
  for (int u = 0; u < KU; ++u) {
    #pragma unroll
    for (int m = 0; m < MT; ++m) {
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int t = t0 + 16 * m + g + 8 * h;  // recomputed, not held: fewer live registers
        mhc_load_x8<T>(t < Ttok ? xin + (int64_t)t * K : nullptr, kb + 8 * KU * c + 8 * u, K, xvec, wx[u][m][h]);
      }
    }
  }
}

template <typename T, int MT, int NT, int PB, int KU, bool BVEC, typename PK>
__device__ __forceinline__ void mhc_mma_step(const uint32_t (&wx)[KU][MT][2][4], PK pk, int KB, int kb, int lane,
                                             float (&acc)[MT][NT][4], float (&sq)[MT][2]) {
  constexpr int AP = mhc_x_parts<T>::count;  // bfloat16 parts of x
  const uint4* pk4 = reinterpret_cast<const uint4*>(pk) + lane;
  const unsigned short* pk2 = reinterpret_cast<const unsigned short*>(pk) + 8 * lane;
  const int pstride = KB * NT * 32;  // one part of the packed phi, in 8-element words
  #pragma unroll
  for (int u = 0; u < KU; ++u) {
    uint32_t af[MT][2][4], afl[MT][2][4];  // [m][s]: a0a1 row g, a2a3 row g + 8, then k + 8
    #pragma unroll
    for (int m = 0; m < MT; ++m) {
      uint32_t ah[2][4], al[2][4];
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        #pragma unroll
        for (int q = 0; q < 4; ++q) sq[m][h] += mhc_x_parts<T>::split(wx[u][m][h][q], ah[h][q], al[h][q]);
      }
      #pragma unroll
      for (int s = 0; s < 2; ++s) {
        mhc_a_step(ah, s, af[m][s]);
        mhc_a_step(al, s, afl[m][s]);
      }
    }
    const int kofs = ((kb >> 5) + u) * NT * 32;
    #pragma unroll
    for (int j = 0; j < NT; ++j) {
      uint32_t b[PB][4];
      #pragma unroll
      for (int p = 0; p < PB; ++p) {
        const int w = p * pstride + kofs + j * 32;
        if (BVEC) {
          const uint4 v = pk4[w];
          b[p][0] = v.x; b[p][1] = v.y; b[p][2] = v.z; b[p][3] = v.w;
        } else {
          #pragma unroll
          for (int q = 0; q < 4; ++q) b[p][q] = (uint32_t)pk2[8 * w + 2 * q] | ((uint32_t)pk2[8 * w + 2 * q + 1] << 16);
        }
      }
      #pragma unroll
      for (int m = 0; m < MT; ++m) {
        #pragma unroll
        for (int s = 0; s < 2; ++s) {
          #pragma unroll
          for (int p = 0; p < PB; ++p) {
            mhc_mma_bf16(acc[m][j], af[m][s], b[p][2 * s], b[p][2 * s + 1]);
            if (AP == 2) mhc_mma_bf16(acc[m][j], afl[m][s], b[p][2 * s], b[p][2 * s + 1]);
          }
        }
      }
    }
  }
}

template <typename T, int MT, int NT, int PB, int KU, bool BVEC, typename PK>
__device__ __forceinline__ void mhc_mma_kloop(const T* xin, PK pk, int Ttok, int K, int KB, int k0, int k1,
                                              int t0, int lane, bool xvec, float (&acc)[MT][NT][4],
                                              float (&sq)[MT][2]) {
  for (int kb = k0; kb < k1; kb += 32 * KU) {
    uint32_t wx[KU][MT][2][4];
    mhc_mma_load_step<T, MT, KU>(xin, Ttok, K, kb, t0, lane, xvec, wx);
    mhc_mma_step<T, MT, NT, PB, KU, BVEC>(wx, pk, KB, kb, lane, acc, sq);
  }
}
"""

# Lane (g, c) = (lane / 4, lane % 4) of a warp; one step covers k in [kb, kb + 32 KU). For
# sub-block u < KU the lane loads x[t, kb + 8 KU c + 8 u .. + 8) for t = row g and row g + 8 of
# each token tile (its KU loads per row are contiguous): words u0..u3. mma step s in {0, 1}
# uses u[2s] as the A elements at k = 2c, 2c+1 and u[2s+1] as those at 2c+8, 2c+9; the packed
# phi (block kb / 32 + u) gives the lane the B elements of the same physical k. All of a
# step's x loads are issued before its first mma (KLOOP).
MMA = KernelSpec(
    name="mhc_coefficients_dynamic_mma",
    inputs=("xin", "pk", "iparam"),
    outputs=("part", "ssq"),
    helpers=PTX_MMA + X_PARTS + LOAD_X + KLOOP + PARTIALS_ROW,
    body=r"""
  const int Ttok = iparam[0];
  const int K = iparam[1];
  const int KS = iparam[2];   // k per split, a multiple of 32 KU
  const int S = iparam[3];
  const int KB = iparam[4];   // 32-wide k blocks in the packed phi (a multiple of KU)
  const int tiles = (Ttok + 16 * MT - 1) / (16 * MT);
  const int gw = (int)(blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5));
  if (gw >= tiles * S) return;  // whole warps only: mma.sync needs all 32 lanes
  const int split = gw / tiles;  // neighbouring warps share a k slice (phi stays in L1/L2)
  const int tile = gw - split * tiles;
  const int lane = (int)(threadIdx.x & 31u);
  const int g = lane >> 2;
  const int c = lane & 3;
  const int k0 = split * KS;
  const int k1 = min(K, k0 + KS);
  const int t0 = tile * 16 * MT;
  const bool xvec = (K % 8 == 0) && ((reinterpret_cast<unsigned long long>(xin) & 15ull) == 0ull);
  const bool bvec = (reinterpret_cast<unsigned long long>(pk) & 15ull) == 0ull;

  float acc[MT][NT][4];
  float sq[MT][2];
  #pragma unroll
  for (int m = 0; m < MT; ++m) {
    sq[m][0] = 0.0f;
    sq[m][1] = 0.0f;
    #pragma unroll
    for (int j = 0; j < NT; ++j) {
      #pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.0f;
    }
  }

  if (bvec) mhc_mma_kloop<T, MT, NT, PB, KU, true>(xin, pk, Ttok, K, KB, k0, k1, t0, lane, xvec, acc, sq);
  else mhc_mma_kloop<T, MT, NT, PB, KU, false>(xin, pk, Ttok, K, KB, k0, k1, t0, lane, xvec, acc, sq);

  // each row's sum of squares and accumulators (acc[m] as d[4 j + e])
  #pragma unroll
  for (int m = 0; m < MT; ++m) {
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int t = t0 + 16 * m + g + 8 * h;
      mhc_partials_row<NT>(part, ssq, (int64_t)split * Ttok + t, t < Ttok, c, h, sq[m][h], &acc[m][0][0]);
    }
  }
""",
)


# Warpgroup MMA (sm_90a), m64n24k16, A from registers (each warp's 16 rows as mma.sync's A
# fragment), B from shared memory by descriptor (no swizzle), f32 accumulators: warp w, lane
# 4 g + c holds d[4 j + e] at row 16 w + g + 8 (e / 2), column 8 j + 2 c + e % 2. The emulator
# substitutes this text.
PTX_WGMMA = r"""
__device__ __forceinline__ uint64_t mhc_wg_desc(const void* smem, int lbo, int sbo) {
  const uint64_t a = (uint64_t)(__cvta_generic_to_shared(smem) & 0x3FFFF);
  return (a >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) | ((uint64_t)((sbo >> 4) & 0x3FFF) << 32);
}
__device__ __forceinline__ void mhc_wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void mhc_wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void mhc_wg_wait() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void mhc_smem_to_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void mhc_wgmma_n24(float (&d)[12], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n24k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11}, {%12, %13, %14, %15}, %16, 1, 1, 1, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
      : "memory");
}
"""

# A warpgroup's copy of N 16-byte pieces from global to shared memory through registers: each of
# its 128 threads fetches its pieces (mhc_wg_fetch, early, so the loads fly while wgmma's run),
# later stores them and makes the writes visible to the async proxy wgmma reads by
# (mhc_wg_stage; a barrier follows before the wgmma's).
WG_STAGE = r"""
template <int N>
__device__ __forceinline__ void mhc_wg_fetch(const uint4* src, uint4 (&r)[(N + 127) / 128], int tid) {
  #pragma unroll
  for (int i = 0; i < (N + 127) / 128; ++i) {
    const int q = tid + 128 * i;
    if (q < N) r[i] = src[q];
  }
}
template <int N>
__device__ __forceinline__ void mhc_wg_stage(uint4* dst, const uint4 (&r)[(N + 127) / 128], int tid) {
  #pragma unroll
  for (int i = 0; i < (N + 127) / 128; ++i) {
    const int q = tid + 128 * i;
    if (q < N) dst[q] = r[i];
  }
  mhc_smem_to_async();
}
// a = b for the x words of a step, an array of any rank (unrolled to its words)
template <typename W>
__device__ __forceinline__ void mhc_wg_copy(W& a, const W& b) { a = b; }
template <typename W, int M>
__device__ __forceinline__ void mhc_wg_copy(W (&a)[M], const W (&b)[M]) {
  #pragma unroll
  for (int i = 0; i < M; ++i) mhc_wg_copy(a[i], b[i]);
}
// The double-buffered loop both warpgroup kernels run over `steps` steps. Step i's B pieces (N
// 16-byte pieces at src + i N) wait in smem[i & 1] and its x words in cur; the next step's x
// (load(i + 1, nxt)) and B pieces (registers) are loaded before step i's products
// (product(buf): its wgmma's, committed and waited on), and staged after them, as the buffer's
// last readers are then done.
template <int N, typename XW, typename Load, typename Product>
__device__ __forceinline__ void mhc_wg_steps(int steps, const uint4* src, uint4 (*smem)[N], int tid, XW& cur,
                                             XW& nxt, Load load, Product product) {
  uint4 pn[(N + 127) / 128];  // the next step's B pieces of this thread
  if (steps > 0) {
    load(0, cur);
    mhc_wg_fetch<N>(src, pn, tid);
    mhc_wg_stage<N>(smem[0], pn, tid);
  }
  KBARRIER();
  for (int i = 0; i < steps; ++i) {
    const int buf = i & 1;
    if (i + 1 < steps) {
      load(i + 1, nxt);
      mhc_wg_fetch<N>(src + (int64_t)(i + 1) * N, pn, tid);
    }
    product(buf);
    if (i + 1 < steps) {
      mhc_wg_stage<N>(smem[buf ^ 1], pn, tid);
      mhc_wg_copy(cur, nxt);
    }
    KBARRIER();
  }
}
"""

# The partials (MMA's outputs and parameters) by warpgroup MMA, bfloat16 x, n = 4 (24 columns).
# A block is one warpgroup (4 warps) owning 64 MW tokens and one k split. Per 64-k chunk each
# thread loads its x words as MMA does at X_UNROLL 2 (rows 64 mw + 16 w + g and + 8, 16 bytes at
# k + 16 c + 8 u), the next chunk's x and phi are loaded while this chunk's wgmma's run, and phi's
# chunk (pk in pack_phi_wg's order: [chunk][step][part][k half][column group][8][8]) goes to
# shared memory (two buffers) before them. Step st = 2 u + s of a chunk uses the A words MMA's
# step (u, s) uses; pack_phi_wg puts phi's rows at the same k.
MMA_WG = KernelSpec(
    name="mhc_coefficients_dynamic_mma_wg",
    inputs=("xin", "pk", "iparam"),
    outputs=("part", "ssq"),
    helpers=PTX_WGMMA + WG_STAGE + X_PARTS + LOAD_X + PARTIALS_ROW,
    body=r"""
  constexpr int NT = 3;                      // 24 columns (n = 4)
  constexpr int TB = 64 * MW;                // tokens per block
  constexpr int CH = 4 * PB * 2 * NT * 64;   // phi's bf16 elements per 64-k chunk
  constexpr int CH16 = CH / 8;               // ... in 16-byte pieces
  KSHARED uint4 mhc_phi[2][CH16];
  const int Ttok = iparam[0];
  const int K = iparam[1];
  const int KS = iparam[2];   // k per split, a multiple of 64
  const int S = iparam[3];
  const int tiles = (Ttok + TB - 1) / TB;
  const int bid = (int)blockIdx.x;
  if (bid >= tiles * S) return;  // whole blocks (warpgroup instructions and barriers below)
  const int split = bid / tiles;
  const int tile = bid - split * tiles;
  const int tid = (int)threadIdx.x;
  const int w = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int c = lane & 3;
  const int k0 = split * KS;
  const int k1 = min(K, k0 + KS);
  const int nch = (k1 - k0 + 63) / 64;
  const int tb0 = tile * TB;
  const bool xvec = (K % 8 == 0) && ((reinterpret_cast<unsigned long long>(xin) & 15ull) == 0ull);
  const uint4* pk4 = reinterpret_cast<const uint4*>(pk);
  // the descriptor's byte offsets between phi's 8x8 core matrices, as the PTX ISA's K-major
  // unswizzled B reads them: along k (LBO) 128 NT, along the columns (SBO) 128. On the H200 this
  // reading gave the MMA kernel's bits; the swapped one made an illegal memory access (row 74)
  constexpr int lbo = 128 * NT;
  constexpr int sbo = 128;

  float d[MW][12];
  float sq[MW][2];
  #pragma unroll
  for (int m = 0; m < MW; ++m) {
    sq[m][0] = 0.0f;
    sq[m][1] = 0.0f;
    #pragma unroll
    for (int e = 0; e < 12; ++e) d[m][e] = 0.0f;
  }
  uint32_t wx[MW][2][2][4];  // [m][u][h][word] of the chunk computed
  uint32_t wn[MW][2][2][4];  // ... of the next chunk
  auto load_x = [&](int chunk, uint32_t (&dst)[MW][2][2][4]) {
    const int kb = k0 + 64 * chunk;
    #pragma unroll
    for (int m = 0; m < MW; ++m) {
      #pragma unroll
      for (int u = 0; u < 2; ++u) {
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int t = tb0 + 64 * m + 16 * w + g + 8 * h;
          mhc_load_x8<T>(t < Ttok ? xin + (int64_t)t * K : nullptr, kb + 16 * c + 8 * u, K, xvec, dst[m][u][h]);
        }
      }
    }
  };
  auto products = [&](int buf) {
    // sums of squares of this chunk's x (MMA's split of each word)
    uint32_t af[MW][4][4];  // [m][step][A register]
    #pragma unroll
    for (int m = 0; m < MW; ++m) {
      #pragma unroll
      for (int u = 0; u < 2; ++u) {
        uint32_t ah[2][4], al[2][4];
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
          #pragma unroll
          for (int q = 0; q < 4; ++q) sq[m][h] += mhc_x_parts<T>::split(wx[m][u][h][q], ah[h][q], al[h][q]);
        }
        #pragma unroll
        for (int s = 0; s < 2; ++s) mhc_a_step(ah, s, af[m][2 * u + s]);
      }
    }
    mhc_wg_fence();
    #pragma unroll
    for (int st = 0; st < 4; ++st) {
      #pragma unroll
      for (int p = 0; p < PB; ++p) {
        const uint64_t desc = mhc_wg_desc(&mhc_phi[buf][(st * PB + p) * (2 * NT * 8)], lbo, sbo);
        #pragma unroll
        for (int m = 0; m < MW; ++m) mhc_wgmma_n24(d[m], af[m][st], desc);
      }
    }
    mhc_wg_commit();
    mhc_wg_wait();
  };
  // the split's first chunk (k0 a multiple of 64)
  mhc_wg_steps<CH16>(nch, pk4 + (int64_t)(k0 / 64) * CH16, mhc_phi, tid, wx, wn, load_x, products);

  #pragma unroll
  for (int m = 0; m < MW; ++m) {
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int t = tb0 + 64 * m + 16 * w + g + 8 * h;
      mhc_partials_row<NT>(part, ssq, (int64_t)split * Ttok + t, t < Ttok, c, h, sq[m][h], d[m]);
    }
  }
""",
)

WG_TOKENS = 128  # tokens per MMA_WG block (MW = 2)


# src [R, 24] float32 -> the bfloat16 parts of a warpgroup MMA's B, [steps][part][k half][column
# group][8 columns][8 k] (K-major, unswizzled; zeros past R), in one launch (one thread per
# element of a part, writing all its parts). PERM (phi for MMA_WG, R = K): step st holds step
# st % 4 of k chunk st / 4 at the k MMA's A words give it (pack_phi_wg_reference); else (gs for
# coefficients_mma_vjp.DPHI_WG, R = T): step st holds rows 16 st .. 16 st + 15 in order.
PACK_WG = KernelSpec(
    name="mhc_pack_wg_fragments",
    inputs=("src", "iparam"),
    outputs=("dst",),
    body=r"""
  const int R = iparam[0];
  const int steps = iparam[1];
  const int64_t idx = (int64_t)KBID * KNT + KTID;
  if (idx >= (int64_t)steps * 384) return;
  const int l8 = (int)(idx & 7);  // k in its half (PERM: 2 c + e)
  const int n8 = (int)((idx >> 3) & 7);
  int64_t r = idx >> 6;
  const int ng = (int)(r % 3);
  r /= 3;
  const int h = (int)(r & 1);
  const int64_t st = r >> 1;
  const int64_t row = PERM ? 64 * (st >> 2) + 16 * (l8 >> 1) + 8 * ((st & 3) >> 1) + 4 * (st & 1) + 2 * h + (l8 & 1)
                           : 16 * st + 8 * h + l8;
  float v = row < R ? src[row * 24 + 8 * ng + n8] : 0.0f;
  #pragma unroll
  for (int p = 0; p < PB; ++p) {
    const __nv_bfloat16 bf = __float2bfloat16_rn(v);  // round to nearest even, as MLX's astype
    dst[(((st * PB + p) * 2 + h) * 3 + ng) * 64 + n8 * 8 + l8] = bf;
    v -= __bfloat162float(bf);
  }
""",
)


def pack_wg(src: mx.array, parts: int, perm: bool) -> mx.array:
    """PACK_WG of src [R, 24] float32: perm (phi) [R / 64 chunks, 4 steps, parts, 2, 3, 8, 8],
    else (gs) [R / 16 steps, parts, 2, 3, 8, 8] bfloat16."""
    R, W = src.shape
    if W != 24:
        raise ValueError(f"the warpgroup MMA's B holds 24 columns (n = 4), got {W}")
    steps = 4 * -(-R // 64) if perm else -(-R // 16)
    shape = (steps // 4, 4, parts, 2, 3, 8, 8) if perm else (steps, parts, 2, 3, 8, 8)
    return launch(PACK_WG, [src.astype(F32), int_params(R, steps)], [(shape, mx.bfloat16)],
                  -(-steps * 384 // 256) * 256, 256, [("PB", parts), ("PERM", perm)])[0]


def bf16_parts(a: mx.array, parts: int) -> mx.array:
    """[parts, *a.shape] bfloat16 parts of float32 a, each the rounding of what the earlier ones
    left (they add up to a to float32's precision at 3 parts): the packs' MLX-op statements."""
    rest, out = a.astype(F32), []
    for _ in range(parts):
        part = rest.astype(mx.bfloat16)
        out.append(part)
        rest = rest - part.astype(F32)
    return mx.stack(out)


def pack_phi_wg(phi: mx.array, parts: int = PHI_PARTS) -> mx.array:
    """phi [K, 24] float32 -> MMA_WG's order (see pack_phi_wg_reference), in one launch."""
    return pack_wg(phi, parts, True)


def pack_phi_wg_reference(phi: mx.array, parts: int = PHI_PARTS) -> mx.array:
    """phi [K, 24] float32 -> MMA_WG's order: [K / 64 chunks, 4 steps, parts, 2 k halves, 3 column
    groups, 8 columns, 8 k] bfloat16 (zeros past K). Step st = 2 u + s of chunk b holds logical k
    l in [0, 16) at physical k = 64 b + 16 c + 8 u + 4 s + 2 (l // 8) + l % 2 with c = (l % 8) // 2,
    the k MMA's A words give that step (MLX ops: the statement PACK_WG is tested against)."""
    K, W = phi.shape
    if W != 24:
        raise ValueError(f"pack_phi_wg: 24 columns (n = 4), got {W}")
    chunks = -(-K // 64)
    split = bf16_parts(mx.pad(phi.astype(F32), [(0, 64 * chunks - K), (0, 0)]), parts)
    # physical k = 64 b + 16 c + 8 u + 4 s + 2 hi + e  ->  [p, b, c, u, s, hi, e, n]
    a = split.reshape(parts, chunks, 4, 2, 2, 2, 2, 3, 8)  # [p, b, c, u, s, hi, e, ng, n8]
    # -> [b, u, s, p, hi, ng, n8, c, e] (logical k in a half: l % 8 = 2 c + e)
    a = a.transpose(1, 3, 4, 0, 5, 7, 8, 2, 6)
    return a.reshape(chunks, 4, parts, 2, 3, 8, 8)


@lru_cache(maxsize=None)
def hopper() -> bool:
    """True on a compute capability 9.x GPU (sm_90a, which MLX compiles for there): the only
    architecture with wgmma (Blackwell's sm_100a has other MMA instructions)."""
    try:
        return int(mx.device_info().get("compute_capability_major", 0)) == 9
    except Exception:  # noqa: BLE001 -- unknown device: not Hopper
        return False


def warpgroup_fits(x2: mx.array, W: int) -> bool:
    """What both warpgroup-MMA kernels take: bfloat16 x, 24 columns (n = 4), a Hopper GPU."""
    return x2.dtype == mx.bfloat16 and W == 24 and hopper()


def wg_applies(x2: mx.array, W: int) -> bool:
    """MMA_WG takes the partials: WGMMA on (the default) and warpgroup_fits."""
    return WGMMA and warpgroup_fits(x2, W)


def wg_plan(T: int, K: int) -> tuple[int, int, int]:
    """(token tiles, splits, k per split) for MMA_WG: about TARGET_WARPS warps, k per split a
    multiple of 64 and at least 128."""
    tiles = -(-T // WG_TOKENS)
    chunks = -(-K // 64)
    splits = max(1, min(-(-TARGET_WARPS // (4 * tiles)), -(-chunks // 2)))
    ks = 64 * -(-chunks // splits)
    return tiles, -(-K // ks), ks


# phi [K, W] float32 -> its three bfloat16 parts in B-fragment order (see pack_phi), in one
# launch: the MLX-op form (pad, three casts, two subtractions, stack, transpose) took about ten.
PACK = KernelSpec(
    name="mhc_coefficients_pack_phi",
    inputs=("phi", "iparam"),
    outputs=("pk",),
    body=r"""
  const int K = iparam[0];
  const int W = iparam[1];
  const int KB = iparam[2];  // 32-wide k blocks, a multiple of KU
  const int64_t idx = (int64_t)KBID * KNT + KTID;
  if (idx >= (int64_t)KB * NT * 256) return;
  const int e = (int)(idx & 7);
  const int lane = (int)((idx >> 3) & 31);
  const int64_t rest = idx >> 8;
  const int j = (int)(rest % NT);
  const int kb = (int)(rest / NT);
  const int k = 32 * KU * (kb / KU) + 8 * KU * (lane & 3) + 8 * (kb % KU) + e;
  const int col = 8 * j + (lane >> 2);
  float v = (k < K && col < W) ? phi[(int64_t)k * W + col] : 0.0f;
  #pragma unroll
  for (int p = 0; p < PB; ++p) {
    const __nv_bfloat16 b = __float2bfloat16_rn(v);  // round to nearest even, as MLX's astype
    pk[((((int64_t)p * KB + kb) * NT + j) * 32 + lane) * 8 + e] = b;
    v -= __bfloat162float(b);
  }
""",
)

# The split-K partials -> the five outputs of the fused dynamic kernel for FINISH_TOKENS tokens
# per block: sum the splits, m = dot / r, h = m * alpha + bias, then the activations and
# Sinkhorn, one thread per token (ksinkhorn_thread, the arithmetic of coefficients.DYNAMIC's
# finish). One launch instead of about a dozen MLX ops. The first form ran one warp per token,
# every lane repeating the Sinkhorn: 38.9 µs for 4096 tokens at n = 4 on the H200 (ncu,
# 2026-11-29), issue-bound on that 32-fold repeat.
FINISH_TOKENS = 32
FINISH_THREADS = 256
FINISH = KernelSpec(
    name="mhc_coefficients_dynamic_finish",
    inputs=("part", "ssq", "alpha", "bias", "iparam", "fparam"),
    outputs=("hpre", "hpost", "hres", "mraw", "invr"),
    # sum of p[s * stride] over the S splits in four partial sums: four loads in flight per
    # chain, not one (the kernel is latency-bound: 128 blocks for 4096 tokens)
    helpers=r"""
KDEV float mhc_sum_splits(const float* p, int64_t stride, int S) {
  float s4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int s = 0;
  for (; s + 4 <= S; s += 4) {
    KUNROLL for (int u = 0; u < 4; ++u) s4[u] += p[(int64_t)(s + u) * stride];
  }
  for (; s < S; ++s) s4[0] += p[(int64_t)s * stride];
  return (s4[0] + s4[1]) + (s4[2] + s4[3]);
}
""",
    body=r"""
  constexpr int W = N * (N + 2);
  // TB: FINISH_TOKENS
  KSHARED float hbuf[TB * W];
  KSHARED float rbuf[TB];
  const int Ttok = iparam[0];
  const int K = iparam[1];
  const int S = iparam[2];
  const int iters = iparam[3];
  const int WP = iparam[4];
  const float eps = fparam[0];
  const int tid = KTID;
  const int t0 = KBID * TB;
  // r per token: thread q < TB sums its token's splits (coalesced over q for each split)
  if (tid < TB) {
    const int t = t0 + tid;
    const float ss = t < Ttok ? mhc_sum_splits(ssq + t, (int64_t)Ttok, S) : 0.0f;
    const float rr = KSQRT(ss / (float)K + eps);
    rbuf[tid] = rr;
    if (t < Ttok) invr[t] = 1.0f / rr;
  }
  KBARRIER();
  // the dot products: thread p takes (token q, column c) pairs p = q W + c, reads contiguous
  // over p for each split
  for (int p = tid; p < TB * W; p += KNT) {
    const int q = p / W;
    const int c = p - q * W;
    const int t = t0 + q;
    const float d = t < Ttok ? mhc_sum_splits(part + (int64_t)t * WP + c, (int64_t)Ttok * WP, S) : 0.0f;
    const float m = d / rbuf[q];
    if (t < Ttok) mraw[(int64_t)t * W + c] = m;
    hbuf[p] = m * alpha[c < N ? 0 : (c < 2 * N ? 1 : 2)] + bias[c];
  }
  KBARRIER();
  // activations and Sinkhorn: one thread per token
  if (tid < TB && t0 + tid < Ttok) {
    const int64_t t = t0 + tid;
    KSHPTR(float) h = hbuf + tid * W;
    KUNROLL for (int i = 0; i < N; ++i) {
      hpre[t * N + i] = ksigmoid(h[i]);
      hpost[t * N + i] = 2.0f * ksigmoid(h[N + i]);
    }
    float pm[N * N];
    KUNROLL for (int a = 0; a < N * N; ++a) pm[a] = h[2 * N + a];
    ksinkhorn_thread<N>(pm, iters);
    KUNROLL for (int a = 0; a < N * N; ++a) hres[t * N * N + a] = pm[a];
  }
""",
)


def n_tiles(W: int) -> int:
    return -(-W // 8)


def token_tiles_per_warp(NT: int) -> int:
    # H200 (2026-11-30, thirteenth session; gpu_experiments.py vendor-gemm, the kernel alone, phi
    # packed before): MT 2 KU 2 88.3 µs, MT 4 KU 1 129.7 (176 registers), MT 4 KU 2 102.8 (194),
    # MT 1 KU 2 129.3: fewer phi reads per byte of x did not pay for the registers (row 70).
    # ptxas (sm_90a, the current k loop, X_UNROLL 2): n = 4 (NT = 3) 136 registers at MT = 2
    # (bf16; 148 for fp16), 74 at MT = 1; n = 8 (NT = 10) 108 at MT = 1. One token tile per warp
    # at n = 4 (20-24 warps per SM) lost on the H200 all the same: the partials alone 145.7-228.9
    # µs against 108.1 over launch sizes (docs/kernel-notes.md row 37).
    return 2 if NT <= 3 else 1


def k_blocks(K: int, ku: int) -> int:
    """32-wide k blocks of the packed phi: K rounded up to whole steps of 32 * ku."""
    return ku * -(-K // (32 * ku))


def pack_phi(phi: mx.array, parts: int = PHI_PARTS, ku: int | None = None) -> mx.array:
    """phi [K, W] float32 -> [parts, KB, NT, 32, 8] bfloat16 in B-fragment order (KB = k_blocks).

    Element [p, kb, j, lane, e] is part p of phi[32 ku (kb // ku) + 8 ku (lane % 4) + 8 (kb % ku)
    + e, 8 j + lane // 4] (zero past K or W), ku = X_UNROLL: the k that lane's x loads hold
    (MMA). The parts add up to phi to float32 precision. One launch (PACK);
    `pack_phi_reference` is the same in MLX ops.
    """
    ku = ku or X_UNROLL
    K, W = phi.shape
    NT, KB = n_tiles(W), k_blocks(K, ku)
    total = KB * NT * 256
    return launch(
        PACK, [phi.astype(F32), int_params(K, W, KB)], [((parts, KB, NT, 32, 8), mx.bfloat16)],
        -(-total // 256) * 256, 256, [("NT", NT), ("PB", parts), ("KU", ku)],
    )[0]


def pack_phi_reference(phi: mx.array, parts: int = PHI_PARTS, ku: int | None = None) -> mx.array:
    """pack_phi in plain MLX ops (the statement the kernel is tested against)."""
    ku = ku or X_UNROLL
    K, W = phi.shape
    NT, KB = n_tiles(W), k_blocks(K, ku)
    split = bf16_parts(mx.pad(phi.astype(F32), [(0, 32 * KB - K), (0, 8 * NT - W)]), parts)
    # k = 32 ku b + 8 ku c + 8 u + e, column 8 j + g  ->  [p, b, u, j, lane = 4 g + c, e]
    packed = split.reshape(parts, KB // ku, 4, ku, 8, NT, 8)  # [p, b, c, u, e, j, g]
    return packed.transpose(0, 1, 3, 5, 6, 2, 4).reshape(parts, KB, NT, 32, 8)


def plan(T: int, K: int, NT: int, ku: int | None = None) -> tuple[int, int, int, int]:
    """(MT, splits, k per split, warps) for T tokens of width K; k per split is a multiple of
    32 * ku (ku = X_UNROLL)."""
    ku = ku or X_UNROLL
    MT = token_tiles_per_warp(NT)
    tiles = -(-T // (16 * MT))
    steps = -(-K // (32 * ku))
    splits = max(1, min(-(-TARGET_WARPS // tiles), -(-steps * ku // 4)))  # >= 4 k blocks of 32 a warp
    ks = 32 * ku * -(-steps // splits)
    splits = -(-K // ks)
    return MT, splits, ks, tiles * splits


def partial_products(x2: mx.array, phi: mx.array, pk: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Split-K partials (part [S, T, 8 NT] of xf @ phi, ssq [S, T] of Σ xf²) for 16-bit x2 [T, K]
    (pk: phi already packed by pack_phi at today's X_UNROLL, else packed here)."""
    T, K = x2.shape
    if wg_applies(x2, phi.shape[1]):
        tiles, splits, ks = wg_plan(T, K)
        return launch(
            MMA_WG, [x2, pack_phi_wg(phi) if pk is None else pk, int_params(T, K, ks, splits)],
            [((splits, T, 24), F32), ((splits, T), F32)], tiles * splits * 128, 128,
            [("T", x2.dtype), ("PB", PHI_PARTS), ("MW", WG_TOKENS // 64)],
        )
    NT, ku = n_tiles(phi.shape[1]), X_UNROLL
    MT, splits, ks, warps = plan(T, K, NT, ku)
    blocks = -(-warps // WARPS_PER_BLOCK)
    return launch(
        MMA, [x2, pack_phi(phi, ku=ku) if pk is None else pk, int_params(T, K, ks, splits, k_blocks(K, ku))],
        [((splits, T, 8 * NT), F32), ((splits, T), F32)],
        blocks * WARPS_PER_BLOCK * 32, WARPS_PER_BLOCK * 32,
        [("T", x2.dtype), ("NT", NT), ("MT", MT), ("PB", PHI_PARTS), ("KU", ku)],
    )


def dot_and_ssq(x2: mx.array, phi: mx.array) -> tuple[mx.array, mx.array]:
    """(xf @ phi [T, W] float32, Σ xf² [T] float32) for 16-bit x2 [T, K] on CUDA."""
    T, W = x2.shape[0], phi.shape[1]
    if T == 0:
        return mx.zeros((0, W), F32), mx.zeros((0,), F32)
    part, ssq = partial_products(x2, phi)
    return mx.sum(part, axis=0)[:, :W], mx.sum(ssq, axis=0)


def dynamic_forward(x2, phi, alpha, bias, n: int, iters: int, eps: float):
    """The dynamic coefficients' five outputs (as coefficients.DYNAMIC's) for 16-bit x2 [T, n*C]
    in three launches: pack phi, the tensor-core partials, the finish."""
    T, K = x2.shape
    W = n * (n + 2)
    if T == 0:
        return (mx.zeros((0, n), F32), mx.zeros((0, n), F32), mx.zeros((0, n, n), F32),
                mx.zeros((0, W), F32), mx.zeros((0,), F32))
    part, ssq = partial_products(x2, phi)
    return launch(
        FINISH,
        [part, ssq, alpha.astype(F32), bias.astype(F32),
         int_params(T, K, part.shape[0], iters, part.shape[2]), float_params(eps)],
        [((T, n), F32), ((T, n), F32), ((T, n, n), F32), ((T, W), F32), ((T,), F32)],
        -(-T // FINISH_TOKENS) * FINISH_THREADS, FINISH_THREADS, [("N", n), ("TB", FINISH_TOKENS)],
    )


watch(__name__)  # settings assigned later bump build.settings_epoch
