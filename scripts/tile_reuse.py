#!/usr/bin/env python3
"""Can one launch read a token tile from DRAM once for per-row sums and still write an output
that needs those sums, at copy speed? The question behind a one-pass dynamic backward
(docs/kernel-notes.md, "Where each target stands", tenth session): there, x's cotangent needs
per-token sums over the whole row (the coefficient cotangents) before any of it can be written,
so today x is read twice from DRAM (pre's backward, then DX).

The stand-in problem: y = x * rsqrt(mean(x^2 over the row) + eps) for x [T, K] bfloat16 (the
sum over a row, then a pass that needs it), in these forms:

- two launches (SUMSQ, then SCALE): x read twice from DRAM, as the backward does today;
- LAST: a tile of TT rows split over S threadgroups by columns; each writes its slice's
  partial sums and counts itself in (an atomic counter per tile); the tile's last threadgroup
  sums the partials and writes the whole tile's y, re-reading x from L2 (it was read moments
  before by the tile's other threadgroups);
- WAIT: as LAST, but every threadgroup keeps its slice of x in registers, waits for the tile's
  count to reach S, and writes its own slice: x read once, nothing re-read. It relies on a
  tile's S threadgroups being resident together (consecutive block indices, S far below the
  GPU's resident threadgroups); a bounded spin writes NaN rather than hang if they are not;
- CLUSTER and PERSISTENT (sixteenth session): as WAIT, but a tile's threadgroups are one
  thread-block cluster exchanging their sums through distributed shared memory (PERSISTENT:
  fewer clusters looping over the tiles, the next tile's loads in flight across each exchange);
- the same in MLX ops, for scale.

    python scripts/gpu_experiments.py tile-reuse      # on a CUDA GPU: checks, then timings

The counters are a scratch input the kernels write (KernelSpec.scratch), zeroed per call by
mx.zeros. CUDA only (atomics and a device-wide fence); tests/kernels/test_tile_reuse_emulated.py
runs SUMSQ, SCALE and LAST on the CPU emulator (one threadgroup at a time, so WAIT cannot run
there: its first threadgroup would wait for ones that never start).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from mhc_mlx.kernels.build import KernelSpec, int_params, launch

EPS = 1e-6
THREADS = 256
SPIN_LIMIT = 1 << 20  # polls (each an L2 round trip, ~1 µs) before WAIT gives up (NaN out) instead of hanging

HELPERS = r"""
#ifdef MHC_BACKEND_CPU_EMULATION
KDEV int opv_atomic_add(int* p, int v) { int o = *p; *p = o + v; return o; }
KDEV void opv_fence() {}
KDEV int opv_load(const int* p) { return *p; }
KDEV float opv_ldcg(const float* p) { return *p; }
#else
KDEV int opv_atomic_add(int* p, int v) { return atomicAdd(p, v); }
KDEV void opv_fence() { __threadfence(); }
KDEV int opv_load(const int* p) { return *(volatile const int*)p; }
// past L1 but not volatile: several such loads stay in flight together
KDEV float opv_ldcg(const float* p) { return __ldcg(p); }
#endif
// the sum of v over the 64 threads of a row group (two warps): warp sums, then the pair
KDEV float tr_pair_sum(float v, KSHPTR(float) red) {
  v = kwarp_sum(v);
  if (KLANE == 0) red[KWARP] = v;
  KBARRIER();
  const float s = red[KWARP & ~1] + red[KWARP | 1];
  KBARRIER();
  return s;
}
"""

# inv[t] = rsqrt(mean(x[t]^2) + eps): one threadgroup per row
SUMSQ = KernelSpec(
    name="mhc_tile_reuse_sumsq",
    inputs=("x", "iparam"),
    outputs=("inv",),
    helpers=HELPERS,
    body=r"""
  const int K = iparam[1];
  KSHARED float red[32];
  const int64_t row = (int64_t)KBID * K;
  float s = 0.0f;
  for (int k = 8 * KTID; k < K; k += 8 * KNT) {
    float v[8];
    kload<T, 8>(v, x, row + k, true);
    KUNROLL for (int e = 0; e < 8; ++e) s += v[e] * v[e];
  }
  s = kwarp_sum(s);
  if (KLANE == 0) red[KWARP] = s;
  KBARRIER();
  if (KTID == 0) {
    float t = 0.0f;
    for (int w = 0; w < KNT / 32; ++w) t += red[w];
    inv[KBID] = 1.0f / KSQRT(t / (float)K + 1e-6f);
  }
""",
)

# y = x * inv[row], eight elements a thread
SCALE = KernelSpec(
    name="mhc_tile_reuse_scale",
    inputs=("x", "inv", "iparam"),
    outputs=("y",),
    body=r"""
  const int rows = iparam[0];
  const int K = iparam[1];
  const int64_t i = 8 * ((int64_t)KBID * KNT + KTID);
  if (i >= (int64_t)rows * K) return;
  const float s = inv[i / K];
  float v[8];
  kload<T, 8>(v, x, i, true);
  KUNROLL for (int e = 0; e < 8; ++e) v[e] *= s;
  kstore<T, 8>(y, i, v, true);
""",
)

# LAST and WAIT: threadgroup b owns tile b / S (rows TT * (b / S) ..) and columns (b % S) * KS ..
# (KS = K / S = 512, so a row of the slice is 64 vectors: two warps); its 256 threads hold the
# slice's TT * 64 vectors, VPT = TT / 4 each, four rows apart.
_TILE_BODY = r"""
  const int K = iparam[1];
  const int S = iparam[2];
  const int KS = K / S;
  const int VR = KS / 8;  // vectors per row of the slice
  const int tile = KBID / S, slice = KBID % S;
  KSHARED float red[32];
  KSHARED float inv_s[TT];
  KSHARED int last_s;
  const int64_t base = (int64_t)tile * TT * K + (int64_t)slice * KS;
  float v[VPT][8];
  float sums[VPT];
  KUNROLL for (int j = 0; j < VPT; ++j) {
    const int q = KTID + j * KNT, r = q / VR, c = 8 * (q % VR);
    kload<T, 8>(v[j], x, base + (int64_t)r * K + c, true);
    float s = 0.0f;
    KUNROLL for (int e = 0; e < 8; ++e) s += v[j][e] * v[j][e];
    sums[j] = s;
  }
  // each row of the slice is VR = 64 consecutive threads (two warps) in every j
  KUNROLL for (int j = 0; j < VPT; ++j) {
    const float s = tr_pair_sum(sums[j], red);
    const int r = (KTID + j * KNT) / VR;
    if (KTID % VR == 0) partial[((int64_t)tile * S + slice) * TT + r] = s;
  }
  opv_fence();  // the partials reach every SM before the count does
  KBARRIER();
"""

_INV = r"""
  if (KTID < TT) {
    float t = 0.0f;
    // past L1 (ld.global.cg), not volatile: the S loads in flight together
    for (int s2 = 0; s2 < S; ++s2) t += opv_ldcg((const float*)partial + ((int64_t)tile * S + s2) * TT + KTID);
    inv_s[KTID] = 1.0f / KSQRT(t / (float)K + 1e-6f);
  }
  KBARRIER();
"""

def _tile_spec(name: str, tail: str) -> KernelSpec:
    """A one-launch form: the tile's shared first part (_TILE_BODY), then `tail`."""
    return KernelSpec(name=name, inputs=("x", "counters", "iparam"), outputs=("y", "partial"), helpers=HELPERS,
                      scratch=("counters",), body=_TILE_BODY + tail)


LAST = _tile_spec("mhc_tile_reuse_last", r"""
  if (KTID == 0) last_s = opv_atomic_add((int*)counters + tile, 1) == S - 1;
  KBARRIER();
  if (!last_s) return;
  opv_fence();
""" + _INV + r"""
  // the whole tile, re-read (from L2: the other slices were read moments before)
  const int64_t t0 = (int64_t)tile * TT * K;
  for (int64_t i = 8 * (int64_t)KTID; i < (int64_t)TT * K; i += 8 * KNT) {
    float w[8];
    kload<T, 8>(w, x, t0 + i, true);
    const float s = inv_s[i / K];
    KUNROLL for (int e = 0; e < 8; ++e) w[e] *= s;
    kstore<T, 8>(y, t0 + i, w, true);
  }
""")

WAIT = _tile_spec("mhc_tile_reuse_wait", r"""
  if (KTID == 0) {
    opv_atomic_add((int*)counters + tile, 1);
    int polls = 0;
    while (opv_load(counters + tile) < S && ++polls < SPIN) {}
    last_s = polls < SPIN;
  }
  KBARRIER();
  opv_fence();
""" + _INV + r"""
  const float nan = KBITS_FLOAT(0x7fc00000);
  KUNROLL for (int j = 0; j < VPT; ++j) {
    const int q = KTID + j * KNT, r = q / VR, c = 8 * (q % VR);
    const float s = last_s ? inv_s[r] : nan;
    KUNROLL for (int e = 0; e < 8; ++e) v[j][e] *= s;
    kstore<T, 8>(y, base + (int64_t)r * K + c, v[j], true);
  }
""")


# CLUSTER: as WAIT (each threadgroup keeps its slice of x in registers and writes it), but a
# tile's S threadgroups are one thread-block cluster (sm_90): they exchange their slices' row
# sums through distributed shared memory and wait at the cluster's hardware barrier instead of
# a global counter. MLX 0.32.4 launches custom kernels without a cluster dimension and writes
# the kernel's declaration itself; a cluster size given at compile time (__cluster_dims__) is
# honoured by a plain launch, so the header redefines __global__ to carry it. Threadgroup b:
# tile b / S, columns (b % S) * KS .. (its rank in the cluster); a row of the slice is VR = KS / 8
# vectors, A = VR / KNT per thread, VPT = TT * A in all. On the CPU emulator S must be 1 (one
# threadgroup at a time): its cluster calls are then a threadgroup barrier and a local pointer.
CLUSTER_HELPERS = r"""
#ifdef MHC_BACKEND_CPU_EMULATION
KDEV void tr_cluster_sync() { KBARRIER(); }
KDEV const float* tr_cluster_peer(const float* p, int rank) { return p; }
#else
#undef __global__
#define __global__ __attribute__((global)) __cluster_dims__(TR_CLUSTER_S, 1, 1)
// barrier.cluster.arrive.release + wait.acquire: this threadgroup's shared writes are seen by
// the cluster's other threadgroups after it, and every thread of the cluster waits at it
KDEV void tr_cluster_sync() { cooperative_groups::this_cluster().sync(); }
KDEV const float* tr_cluster_peer(const float* p, int rank) {
  return cooperative_groups::this_cluster().map_shared_rank(const_cast<float*>(p), rank);
}
#endif
// A threadgroup's slice of a tile: vector j of this thread is row (KTID + j KNT) / VR of the
// slice at 8 ((KTID + j KNT) % VR) (VR = A KNT vectors a row, so row r is j = r A .. r A + A - 1)
template <typename T, int VPT>
KDEV void tr_load_slice(float (&v)[VPT][8], const T* x, int64_t base, int K, int VR) {
  KUNROLL for (int j = 0; j < VPT; ++j) {
    const int q = KTID + j * KNT;
    kload<T, 8>(v[j], x, base + (int64_t)(q / VR) * K + 8 * (q % VR), true);
  }
}
// rows[r] = the slice's sum of squares of row r (r < TT), through red [VPT][32]
template <int VPT, int TT>
KDEV void tr_slice_row_sums(const float (&v)[VPT][8], KSHPTR(float) red, KSHPTR(float) rows) {
  KUNROLL for (int j = 0; j < VPT; ++j) {
    float s = 0.0f;
    KUNROLL for (int e = 0; e < 8; ++e) s += v[j][e] * v[j][e];
    s = kwarp_sum(s);
    if (KLANE == 0) red[32 * j + KWARP] = s;
  }
  KBARRIER();
  if (KTID < TT) {
    const int A = VPT / TT;
    float t = 0.0f;
    for (int j = KTID * A; j < (KTID + 1) * A; ++j)
      for (int w = 0; w < KNT / 32; ++w) t += red[32 * j + w];
    rows[KTID] = t;
  }
}
// y's slice = v scaled by its row's inv
template <typename T, int VPT>
KDEV void tr_store_scaled(float (&v)[VPT][8], T* y, int64_t base, int K, int VR, KSHPTR(float) inv) {
  KUNROLL for (int j = 0; j < VPT; ++j) {
    const int q = KTID + j * KNT, r = q / VR;
    const float sc = inv[r];
    KUNROLL for (int e = 0; e < 8; ++e) v[j][e] *= sc;
    kstore<T, 8>(y, base + (int64_t)r * K + 8 * (q % VR), v[j], true);
  }
}
"""


@lru_cache(maxsize=None)
def cluster_spec(S: int) -> KernelSpec:
    """The CLUSTER form for clusters of S threadgroups (S is part of the header, not a template
    value: the declaration's attribute needs it before the body's constants exist)."""
    return KernelSpec(
        name=f"mhc_tile_reuse_cluster{S}", inputs=("x", "iparam"), outputs=("y",),
        helpers=f"#define TR_CLUSTER_S {S}\n" + CLUSTER_HELPERS, body=r"""
  const int K = iparam[1];
  const int KS = K / S;
  const int VR = KS / 8;
  const int tile = KBID / S, slice = KBID % S;
  KSHARED float red[VPT * 32];
  KSHARED float rows_s[TT];  // this slice's sums of squares per row, read by the whole cluster
  KSHARED float inv_s[TT];
  const int64_t base = (int64_t)tile * TT * K + (int64_t)slice * KS;
  float v[VPT][8];
  tr_load_slice<T, VPT>(v, x, base, K, VR);
  tr_slice_row_sums<VPT, TT>(v, red, rows_s);
  tr_cluster_sync();
  if (KTID < TT) {
    float t = 0.0f;
    for (int s2 = 0; s2 < S; ++s2) t += tr_cluster_peer(rows_s, s2)[KTID];
    inv_s[KTID] = 1.0f / KSQRT(t / (float)K + 1e-6f);
  }
  // every peer's reads of rows_s done before any threadgroup of the cluster leaves, and inv_s
  // seen by the whole threadgroup
  tr_cluster_sync();
  tr_store_scaled<T, VPT>(v, y, base, K, VR, inv_s);
""")


# PERSISTENT: the CLUSTER form with fewer clusters than tiles, each looping over tiles, and the
# next tile's slice loaded into a second set of registers before this tile's exchange, so a
# threadgroup keeps loads in flight while it waits at the cluster barrier (the CLUSTER form sits
# idle there). rows_s is double-buffered: a peer may still read one tile's sums while this
# threadgroup writes the next's; the one after that reuses the buffer only past another cluster
# barrier, which every peer reaches after its reads.
@lru_cache(maxsize=None)
def persistent_spec(S: int) -> KernelSpec:
    return KernelSpec(
        name=f"mhc_tile_reuse_persistent{S}", inputs=("x", "iparam"), outputs=("y",),
        helpers=f"#define TR_CLUSTER_S {S}\n" + CLUSTER_HELPERS, body=r"""
  const int rows = iparam[0];
  const int K = iparam[1];
  const int KS = K / S;
  const int VR = KS / 8;
  const int tiles = rows / TT;
  const int slice = KBID % S, clusters = KNB / S;
  KSHARED float red[VPT * 32];
  KSHARED float rows_s[2][TT];
  KSHARED float inv_s[TT];
  float v[VPT][8], vn[VPT][8];
  int tile = KBID / S;
  int buf = 0;
  if (tile < tiles) tr_load_slice<T, VPT>(v, x, (int64_t)tile * TT * K + (int64_t)slice * KS, K, VR);
  for (; tile < tiles; tile += clusters, buf ^= 1) {
    const int64_t base = (int64_t)tile * TT * K + (int64_t)slice * KS;
    tr_slice_row_sums<VPT, TT>(v, red, &rows_s[buf][0]);
    const int next = tile + clusters;
    if (next < tiles)  // in flight across the exchange
      tr_load_slice<T, VPT>(vn, x, (int64_t)next * TT * K + (int64_t)slice * KS, K, VR);
    tr_cluster_sync();
    if (KTID < TT) {
      float t = 0.0f;
      for (int s2 = 0; s2 < S; ++s2) t += tr_cluster_peer(&rows_s[buf][0], s2)[KTID];
      inv_s[KTID] = 1.0f / KSQRT(t / (float)K + 1e-6f);
    }
    KBARRIER();
    tr_store_scaled<T, VPT>(v, y, base, K, VR, inv_s);
    KUNROLL for (int j = 0; j < VPT; ++j)
      KUNROLL for (int e = 0; e < 8; ++e) v[j][e] = vn[j][e];
    // red and inv_s are rewritten next tile: every thread past its reads of both
    KBARRIER();
  }
  tr_cluster_sync();  // no threadgroup leaves while a peer may still read its rows_s
""")


def persistent_launch(x, TT: int = 4, S: int = 8, groups: int = 264):
    """PERSISTENT: as cluster_launch, in about `groups` threadgroups (a multiple of S) looping over
    the tiles with the next tile's loads in flight across each exchange."""
    template = _cluster_template(x, TT, S)
    T, K = x.shape
    nb = S * max(1, min(T // TT, groups // S))
    return launch(persistent_spec(S), [x, int_params(T, K)], [((T, K), x.dtype)], nb * THREADS, THREADS,
                  template)[0]


def cluster_launch(x, TT: int = 4, S: int = 8):
    """CLUSTER: y in one launch, x read once, a tile's sums exchanged inside its cluster."""
    template = _cluster_template(x, TT, S)
    T, K = x.shape
    return launch(cluster_spec(S), [x, int_params(T, K)], [((T, K), x.dtype)], T // TT * S * THREADS, THREADS,
                  template)[0]


def _cluster_template(x, TT, S):
    """The cluster forms' template for x, after its checks: VPT = TT A vectors a thread (A = K / (8 S KNT))."""
    T, K = x.shape if x.ndim == 2 else (0, 0)
    if (x.ndim != 2 or x.dtype not in (mx.bfloat16, mx.float16) or S not in (1, 2, 4, 8) or T % TT
            or K % (8 * THREADS * S)):
        raise ValueError(f"the cluster form needs 16-bit x [T, K] with T a multiple of TT = {TT}, S in 1, 2, 4, 8 "
                         f"and K a multiple of 8 * {THREADS} * S = {8 * THREADS * S}; got {x.dtype} {tuple(x.shape)}")
    return [("T", x.dtype), ("TT", TT), ("VPT", TT * (K // S // 8 // THREADS)), ("S", S)]


def _check(x, TT, S):
    T, K = x.shape if x.ndim == 2 else (0, 0)
    if x.ndim != 2 or x.dtype not in (mx.bfloat16, mx.float16) or T % TT or K != 512 * S or TT % 4:
        raise ValueError(f"tile_reuse needs 16-bit x [T, K] with T a multiple of TT = {TT} (itself of 4) "
                         f"and K = 512 S = {512 * S}; got {x.dtype} {tuple(x.shape)}")


def two_launches(x):
    """SUMSQ then SCALE: y with x read twice."""
    T, K = x.shape
    inv = launch(SUMSQ, [x, int_params(T, K)], [((T,), mx.float32)], T * THREADS, THREADS,
                 [("T", x.dtype)])[0]
    n = T * K // 8
    return launch(SCALE, [x, inv, int_params(T, K)], [((T, K), x.dtype)], -(-n // THREADS) * THREADS, THREADS,
                  [("T", x.dtype)])[0]


def one_launch(x, form: str = "last", TT: int = 16, S: int = 32):
    """LAST or WAIT: y in one launch (x read once from DRAM; LAST re-reads each tile from L2)."""
    _check(x, TT, S)
    T, K = x.shape
    spec = {"last": LAST, "wait": WAIT}[form]
    tiles = T // TT
    counters = mx.zeros((tiles,), mx.int32)  # fresh per call: the kernel counts into it
    template = [("T", x.dtype), ("TT", TT), ("VPT", TT // 4)]
    if form == "wait":
        template.append(("SPIN", SPIN_LIMIT))
    return launch(spec, [x, counters, int_params(T, K, S)], [((T, K), x.dtype), ((tiles, S, TT), mx.float32)],
                  tiles * S * THREADS, THREADS, template)[0]


def reference(x):
    """The same y in MLX ops (float32 sums)."""
    xf = x.astype(mx.float32)
    return (xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + EPS)).astype(x.dtype)

