#!/usr/bin/env python3
"""The memory side of a one-read dynamic backward, measured without its product and glue.

docs/kernel-notes.md ("What the one-read dynamic backward would need at 4096 x 4 x 4096") puts
the dynamic fwd+bwd target within reach only if pre's backward and DX become one kernel that
reads x, g and dh once, exchanges each token's row sums inside a thread-block cluster, and
writes dx: 13 units of [T, C] bf16 a token-channel where today's two kernels move 25. That
kernel would have to run at >= ~80 % of the copy's rate with gs phi^T and the glue inside.
scripts/tile_reuse.py's PERSISTENT form measured such an exchange on a one-read, one-write
stand-in (65-71 %). This script measures it on the backward's own byte pattern:

    dH_pre[t, i]    = sum_c dh[t, c] x[t, i, c]           (n sums a token)
    dH_res[t, i, j] = sum_c g[t, i, c] x[t, j, c]          (n^2 sums a token)
    s[t]            = 1 / (1 + sum |dH| / C)               (a stand-in for the glue)
    dx[t, i, c]     = H_pre[t, i] dh[t, c] + sum_j H_res[t, j, i] g[t, j, c] + s[t] x[t, i, c]

(dx is pre's and post's shares, as PRE_VJP_RES writes them, plus a term that needs the token's
whole-row sums, as DX's x term does; DX's gs phi^T is left out.) Forms:

- TWO: SHARE (a threadgroup a token: x, g, dh read; the share and the sums written), then FINISH
  (x, the share and the sums read; dx written): 25 units, today's two kernels' traffic;
- FUSED: persistent clusters of S threadgroups, a tile of TT tokens a cluster at a time, each
  threadgroup KS = C / S channels of every stream; the sums exchanged through distributed shared
  memory (tile_reuse's cluster helpers), the next tile's loads in flight across the exchange;
  13 units;
- FUSED_ASYNC: FUSED with the loads staged two tiles deep in shared memory by asynchronous copies
  (no registers hold a tile in flight), smaller threadgroups, several an SM.

    python scripts/gpu_experiments.py backward-tile     # on a CUDA GPU (sm_90): checks, timings

H200, 2026-12-01 (docs/kernel-notes.md row 91): TWO 233-242 µs; FUSED 302-354 (41-47 % of the
copy's rate); FUSED_ASYNC 233-260 in clusters of 8; with REREAD 224-251 in clusters of 8 and
213-223 in clusters of 4 (65-67 %), the first one-read form faster than two launches. Row 92
(eighteenth session): staged 3-4 tiles deep or in 256-thread threadgroups, 242-277 µs (51-59 %):
each slower than the two-stage, 128-thread form.

tests/kernels/test_backward_tile_emulated.py runs every form on the CPU emulator (the fused ones
with clusters of one threadgroup) against float64.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache

import mlx.core as mx

from mhc_mlx.kernels.build import KernelSpec, int_params, launch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tile_reuse import CLUSTER_HELPERS  # noqa: E402

THREADS = 256
N = 4
NV = N + N * N  # dH_pre, then dH_res row-major

# One token's share of dx for this thread's 8 channels c0 .. c0 + 7 and its partial sums.
_COMMON = r"""
template <typename T, int N>
KDEV void bt_load(float (&xv)[N][8], float (&gv)[N][8], float (&dv)[8], const T* x, const T* g, const T* dh,
                  int64_t t, int C, int c0) {
  kload<T, 8>(dv, dh, t * C + c0, true);
  KUNROLL for (int i = 0; i < N; ++i) {
    kload<T, 8>(xv[i], x, (t * N + i) * C + c0, true);
    kload<T, 8>(gv[i], g, (t * N + i) * C + c0, true);
  }
}
// part += this thread's terms of dH_pre (n) and dH_res (n^2, row-major); share = H_pre dh + H_res^T g
template <int N>
KDEV void bt_share(const float (&xv)[N][8], const float (&gv)[N][8], const float (&dv)[8], const float* hpre,
                   const float* hres, int64_t t, float (&part)[N + N * N], float (&share)[N][8]) {
  float hp[N], hr[N][N];
  KUNROLL for (int i = 0; i < N; ++i) {
    hp[i] = hpre[t * N + i];
    KUNROLL for (int j = 0; j < N; ++j) hr[i][j] = hres[(t * N + i) * N + j];
  }
  KUNROLL for (int i = 0; i < N; ++i) {
    float a = 0.0f;
    KUNROLL for (int e = 0; e < 8; ++e) a += dv[e] * xv[i][e];
    part[i] += a;
    KUNROLL for (int j = 0; j < N; ++j) {
      float b = 0.0f;
      KUNROLL for (int e = 0; e < 8; ++e) b += gv[i][e] * xv[j][e];
      part[N + i * N + j] += b;
    }
    KUNROLL for (int e = 0; e < 8; ++e) {
      float v = hp[i] * dv[e];
      KUNROLL for (int j = 0; j < N; ++j) v += hr[j][i] * gv[j][e];
      share[i][e] = v;
    }
  }
}
KDEV float bt_scale(const float* sums, int C) {
  float a = 0.0f;
  for (int k = 0; k < N_SUMS; ++k) a += fabsf(sums[k]);
  return 1.0f / (1.0f + a / (float)C);
}
"""

_HEADER = f"#define N_SUMS {NV}\n" + _COMMON

# SHARE: threadgroup t = token t; its threads step over the token's C / 8 vectors of channels
SHARE = KernelSpec(
    name="mhc_backward_tile_share",
    inputs=("x", "g", "dh", "hpre", "hres", "iparam"),
    outputs=("share", "sums"),
    helpers=_HEADER,
    body=r"""
  constexpr int NV = N + N * N;
  const int C = iparam[1];
  const int64_t t = KBID;
  KSHARED float red[32 * NV];
  float part[NV];
  KUNROLL for (int k = 0; k < NV; ++k) part[k] = 0.0f;
  for (int c0 = 8 * KTID; c0 < C; c0 += 8 * KNT) {
    float xv[N][8], gv[N][8], dv[8], sh[N][8];
    bt_load<T, N>(xv, gv, dv, x, g, dh, t, C, c0);
    bt_share<N>(xv, gv, dv, hpre, hres, t, part, sh);
    KUNROLL for (int i = 0; i < N; ++i) kstore<T, 8>(share, (t * N + i) * C + c0, sh[i], true);
  }
  KUNROLL for (int k = 0; k < NV; ++k) {
    const float v = kwarp_sum(part[k]);
    if (KLANE == 0) red[KWARP * NV + k] = v;
  }
  KBARRIER();
  if (KTID < NV) {
    float s = 0.0f;
    for (int w = 0; w < KNT / 32; ++w) s += red[w * NV + KTID];
    sums[t * NV + KTID] = s;
  }
""",
)

# FINISH: dx = share + s[t] x, a vector of 8 channels of one (token, stream) a thread
FINISH = KernelSpec(
    name="mhc_backward_tile_finish",
    inputs=("x", "share", "sums", "iparam"),
    outputs=("dx",),
    helpers=_HEADER,
    body=r"""
  constexpr int NV = N + N * N;
  const int Ttok = iparam[0];
  const int C = iparam[1];
  const int64_t i = 8 * ((int64_t)KBID * KNT + KTID);
  if (i >= (int64_t)Ttok * N * C) return;
  const float s = bt_scale(sums + (i / ((int64_t)N * C)) * NV, C);
  float xv[8], sh[8];
  kload<T, 8>(xv, x, i, true);
  kload<T, 8>(sh, share, i, true);
  KUNROLL for (int e = 0; e < 8; ++e) sh[e] += s * xv[e];
  kstore<T, 8>(dx, i, sh, true);
""",
)


# The fused forms' shared steps (after tile_reuse's cluster helpers): a slice's row sums, the
# cluster's exchange into each token's scale, dx's store.
_TILE_HELPERS = r"""
// part summed over each token's VR threads (VR / 32 whole warps) into rows [TT * NV]
template <int TT, int NV>
KDEV void bt_slice_sums(const float (&part)[NV], KSHPTR(float) red, KSHPTR(float) rows, int VR) {
  KUNROLL for (int k = 0; k < NV; ++k) {
    const float v = kwarp_sum(part[k]);
    if (KLANE == 0) red[KWARP * NV + k] = v;
  }
  KBARRIER();
  if (KTID < TT * NV) {
    const int rr = KTID / NV, k = KTID % NV;
    float s = 0.0f;
    for (int w = rr * (VR / 32); w < (rr + 1) * (VR / 32); ++w) s += red[w * NV + k];
    rows[KTID] = s;
  }
}
// at the cluster's barrier: the tile's sums over its S slices, then each token's scale into s_s
template <int TT, int NV, int S>
KDEV void bt_tile_scales(const float* rows, KSHPTR(float) tot, KSHPTR(float) s_s, int C) {
  tr_cluster_sync();
  if (KTID < TT * NV) {
    float s = 0.0f;
    for (int p = 0; p < S; ++p) s += tr_cluster_peer(rows, p)[KTID];
    tot[KTID] = s;
  }
  KBARRIER();
  if (KTID < TT) s_s[KTID] = bt_scale(tot + KTID * NV, C);
  KBARRIER();
}
// dx = share + sc x for this thread's 8 channels of every stream
template <typename T, int N>
KDEV void bt_store(float (&sh)[N][8], const float (&xv)[N][8], float sc, T* dx, int64_t t, int C, int c0) {
  KUNROLL for (int i = 0; i < N; ++i) {
    KUNROLL for (int e = 0; e < 8; ++e) sh[i][e] += sc * xv[i][e];
    kstore<T, 8>(dx, (t * N + i) * C + c0, sh[i], true);
  }
}
"""

# threadgroup b: rank b % S of cluster b / S, channels rank KS .. of every stream; thread: token
# r = KTID / VR of the tile, channels 8 (KTID % VR) .. of the slice (VR = KS / 8 a token)
_PROLOGUE = r"""
  constexpr int NV = N + N * N;
  const int Ttok = iparam[0];
  const int C = iparam[1];
  const int KS = C / S;
  const int VR = KS / 8;
  const int tiles = Ttok / TT;
  const int rank = KBID % S, clusters = KNB / S;
  const int r = KTID / VR;
  const int c0 = rank * KS + 8 * (KTID % VR);
  KSHARED float rows_s[2][TT * NV];  // this slice's sums, read by the whole cluster
  KSHARED float tot_s[TT * NV];
  KSHARED float s_s[TT];
  int tile = KBID / S;
  int buf = 0;
"""


@lru_cache(maxsize=None)
def fused_spec(S: int) -> KernelSpec:
    """FUSED for clusters of S threadgroups (S in the header: the declaration's attribute needs it)."""
    return KernelSpec(
        name=f"mhc_backward_tile_fused{S}",
        inputs=("x", "g", "dh", "hpre", "hres", "iparam"),
        outputs=("dx",),
        helpers=f"#define TR_CLUSTER_S {S}\n" + CLUSTER_HELPERS + _HEADER + _TILE_HELPERS,
        body=_PROLOGUE + r"""
  KSHARED float red[32 * NV];
  float xv[N][8], gv[N][8], dv[8];
  if (tile < tiles) bt_load<T, N>(xv, gv, dv, x, g, dh, (int64_t)tile * TT + r, C, c0);
  for (; tile < tiles; tile += clusters, buf ^= 1) {
    const int64_t t = (int64_t)tile * TT + r;
    float part[NV], sh[N][8];
    KUNROLL for (int k = 0; k < NV; ++k) part[k] = 0.0f;
    bt_share<N>(xv, gv, dv, hpre, hres, t, part, sh);
    bt_slice_sums<TT, NV>(part, red, &rows_s[buf][0], VR);
    // the next tile's loads in flight across the exchange: its g and dh in place of this tile's
    // (their share is in sh), its x beside this tile's (still needed for s x)
    const int next = tile + clusters;
    float xn[N][8];
    if (next < tiles) bt_load<T, N>(xn, gv, dv, x, g, dh, (int64_t)next * TT + r, C, c0);
    bt_tile_scales<TT, NV, S>(&rows_s[buf][0], tot_s, s_s, C);
    bt_store<T, N>(sh, xv, s_s[r], dx, t, C, c0);
    if (next < tiles)
      KUNROLL for (int i = 0; i < N; ++i) KUNROLL for (int e = 0; e < 8; ++e) xv[i][e] = xn[i][e];
    // red, tot_s and s_s are rewritten next tile: every thread past its reads of them
    KBARRIER();
  }
  tr_cluster_sync();  // no threadgroup leaves while a peer may still read its rows_s
""")


# FUSED_ASYNC: FUSED with each thread's loads issued as asynchronous copies into shared memory
# (cp.async, 16 bytes each) two tiles deep, so no registers hold a tile in flight: 2 tokens a tile,
# 128 threads a threadgroup (both buffers 36.9 KB of static shared memory), several threadgroups
# an SM, one's exchange overlapping another's loads. Each thread reads back only its own copies,
# which cp.async.wait_group makes visible to it.
ASYNC_THREADS = 128
# the largest stage kept in static shared memory (48 KB a threadgroup, less the forms' other arrays)
STATIC_STAGE_BYTES = 40 * 1024
ASYNC_HELPERS = r"""
#ifdef MHC_BACKEND_CPU_EMULATION
KDEV void bt_cp16(void* dst, const void* src) { memcpy(dst, src, 16); }
KDEV void bt_cp_commit() {}
template <int P> KDEV void bt_cp_wait() {}
#else
KDEV void bt_cp16(void* dst, const void* src) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src));
}
KDEV void bt_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int P> KDEV void bt_cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(P)); }
#endif
// x, g and dh of this thread's staged vectors, as floats
template <typename T, int N>
KDEV void bt_unstage(float (&xv)[N][8], float (&gv)[N][8], float (&dv)[8], const T* mine) {
  KUNROLL for (int i = 0; i < N; ++i) {
    kload<T, 8>(xv[i], mine, 8 * i, true);
    kload<T, 8>(gv[i], mine, 8 * (N + i), true);
  }
  kload<T, 8>(dv, mine, 8 * 2 * N, true);
}
// this thread's 2 N + 1 vectors of 8 channels (x's N, g's N, dh) of token t into dst
template <typename T, int N>
KDEV void bt_stage(float4* dst, const T* x, const T* g, const T* dh, int64_t t, int C, int c0) {
  KUNROLL for (int i = 0; i < N; ++i) {
    bt_cp16(dst + i, x + (t * N + i) * C + c0);
    bt_cp16(dst + N + i, g + (t * N + i) * C + c0);
  }
  bt_cp16(dst + 2 * N, dh + t * C + c0);
}
"""


@lru_cache(maxsize=None)
def fused_async_spec(S: int, shared_memory: int = 0) -> KernelSpec:
    """FUSED_ASYNC for clusters of S threadgroups; shared_memory: the stage's bytes as dynamic
    shared memory (past the 48 KB a threadgroup's static shared memory may hold), 0: static."""
    # the emulator has no dynamic shared memory: there the stage is a static array of its size
    stage = ("#ifdef MHC_BACKEND_CPU_EMULATION\n  KSHARED float4 stage[STAGES * TG * NVEC];\n#else\n"
             "  extern __shared__ float4 stage[];\n#endif\n" if shared_memory
             else "  KSHARED float4 stage[STAGES * TG * NVEC];\n")
    return KernelSpec(
        name=f"mhc_backward_tile_fused_async{S}" + ("_dyn" if shared_memory else ""),
        inputs=("x", "g", "dh", "hpre", "hres", "iparam"),
        outputs=("dx",),
        helpers=f"#define TR_CLUSTER_S {S}\n" + CLUSTER_HELPERS + _HEADER + ASYNC_HELPERS + _TILE_HELPERS,
        shared_memory=shared_memory,
        body=_PROLOGUE + r"""
  constexpr int NVEC = 2 * N + 1;  // a thread's staged vectors a tile
""" + stage + r"""  KSHARED float red[(TG / 32) * NV];
  // STAGES - 1 tiles in flight ahead of the one being summed: slot (it % STAGES) is this tile's,
  // and each thread stages and reads back only its own vectors of a slot
  KUNROLL for (int p = 0; p < STAGES - 1; ++p) {
    const int tp = tile + p * clusters;
    if (tp < tiles) bt_stage<T, N>(stage + (p * TG + KTID) * NVEC, x, g, dh, (int64_t)tp * TT + r, C, c0);
    bt_cp_commit();
  }
  for (int it = 0; tile < tiles; tile += clusters, buf ^= 1, ++it) {
    const int64_t t = (int64_t)tile * TT + r;
    // two stages: the slots are rows_s's buf (the form the H200 timed, 94 registers at clusters
    // of 4; counting it modulo 2 instead took 113 in nvcc)
    const int slot = STAGES == 2 ? buf : it % STAGES;
    const int ahead_slot = STAGES == 2 ? (buf ^ 1) : (it + STAGES - 1) % STAGES;
    const int ahead = tile + (STAGES - 1) * clusters;
    if (ahead < tiles)
      bt_stage<T, N>(stage + (ahead_slot * TG + KTID) * NVEC, x, g, dh, (int64_t)ahead * TT + r, C, c0);
    bt_cp_commit();
    bt_cp_wait<STAGES - 1>();  // this tile's copies (all but the groups issued after them) have landed
    const T* mine = reinterpret_cast<const T*>(stage + (slot * TG + KTID) * NVEC);
    float part[NV];
    KUNROLL for (int k = 0; k < NV; ++k) part[k] = 0.0f;
    if (REREAD) {
      // the sums only: x, g and dh are read from the stage again for dx after the exchange (this
      // tile's slot is rewritten only STAGES - 1 tiles later), so nothing of the tile stays in
      // registers across it
      float xv[N][8], gv[N][8], dv[8], sh[N][8];
      bt_unstage<T, N>(xv, gv, dv, mine);
      bt_share<N>(xv, gv, dv, hpre, hres, t, part, sh);
    }
    float xv[N][8], sh[N][8];
    if (!REREAD) {
      float gv[N][8], dv[8];
      bt_unstage<T, N>(xv, gv, dv, mine);
      bt_share<N>(xv, gv, dv, hpre, hres, t, part, sh);
    }
    bt_slice_sums<TT, NV>(part, red, &rows_s[buf][0], VR);
    bt_tile_scales<TT, NV, S>(&rows_s[buf][0], tot_s, s_s, C);
    if (REREAD) {
      float gv[N][8], dv[8], unused[NV];
      bt_unstage<T, N>(xv, gv, dv, mine);
      bt_share<N>(xv, gv, dv, hpre, hres, t, unused, sh);
    }
    bt_store<T, N>(sh, xv, s_s[r], dx, t, C, c0);
    // red, tot_s and s_s are rewritten next tile (this tile's slot STAGES - 1 tiles later)
    KBARRIER();
  }
  bt_cp_wait<0>();
  tr_cluster_sync();  // no threadgroup leaves while a peer may still read its rows_s
""")


def _check(x, g, dh, hpre, hres):
    if (x.ndim != 3 or x.shape[1] != N or x.dtype not in (mx.bfloat16, mx.float16) or g.shape != x.shape
            or g.dtype != x.dtype or dh.shape != (x.shape[0], x.shape[2]) or dh.dtype != x.dtype
            or hpre.shape != x.shape[:2] or hres.shape != (x.shape[0], N, N)):
        raise ValueError(f"backward_tile needs 16-bit x, g [T, {N}, C], dh [T, C] of x's dtype, H_pre [T, {N}] and "
                         f"H_res [T, {N}, {N}]; got x {x.dtype} {tuple(x.shape)}, g {g.dtype} {tuple(g.shape)}, "
                         f"dh {dh.dtype} {tuple(dh.shape)}, H_pre {tuple(hpre.shape)}, H_res {tuple(hres.shape)}")
    if x.shape[2] % 8:
        raise ValueError(f"backward_tile needs C a multiple of 8; got C = {x.shape[2]}")


def two(x, g, dh, hpre, hres):
    """SHARE then FINISH: dx with x read twice and the share written and read back (25 units)."""
    _check(x, g, dh, hpre, hres)
    T, _, C = x.shape
    f32 = mx.float32
    share, sums = launch(SHARE, [x, g, dh, hpre.astype(f32), hres.astype(f32), int_params(T, C)],
                         [(x.shape, x.dtype), ((T, NV), f32)], T * THREADS, THREADS, [("T", x.dtype), ("N", N)])
    vectors = T * N * C // 8
    return launch(FINISH, [x, share, sums, int_params(T, C)], [(x.shape, x.dtype)],
                  -(-vectors // THREADS) * THREADS, THREADS, [("T", x.dtype), ("N", N)])[0]


def _persistent(spec, what: str, threads: int, args, S: int, groups: int, template):
    """A fused form's launch: its shape checks, then about `groups` threadgroups (a multiple of S)
    of `threads`, a tile of TT = threads / (C / 8 S) tokens a cluster at a time."""
    x = args[0]
    _check(*args)
    T, _, C = x.shape
    if S not in (1, 2, 4, 8) or C % (8 * S) or threads % (C // S // 8) or (C // S // 8) % 32:
        raise ValueError(f"the {what} form needs S in 1, 2, 4, 8 with C / (8 S) a multiple of 32 dividing "
                         f"{threads}; got C = {C}, S = {S}")
    TT = threads // (C // S // 8)
    if T % TT:
        raise ValueError(f"the {what} form needs T a multiple of its tile, {TT} tokens; got T = {T}")
    nb = S * max(1, min(T // TT, groups // S))
    x, g, dh, hpre, hres = args
    f32 = mx.float32
    return launch(spec, [x, g, dh, hpre.astype(f32), hres.astype(f32), int_params(T, C)], [(x.shape, x.dtype)],
                  nb * threads, threads, [("T", x.dtype), ("N", N), ("TT", TT), ("S", S), *template])[0]


def fused(x, g, dh, hpre, hres, S: int = 8, groups: int = 264):
    """FUSED: dx in one launch, x, g and dh read once (13 units), in about `groups` threadgroups
    (a multiple of S) of THREADS: a tile of TT = THREADS / (C / 8 S) tokens a cluster at a time."""
    return _persistent(fused_spec(S), "fused", THREADS, (x, g, dh, hpre, hres), S, groups, ())


def reference(x, g, dh, hpre, hres):
    """The same dx in MLX ops (float32)."""
    f32 = mx.float32
    xf, gf, df = x.astype(f32), g.astype(f32), dh.astype(f32)
    dpre = mx.sum(df[:, None, :] * xf, axis=-1)                       # [T, n]
    dres = mx.einsum("tic,tjc->tij", gf, xf).reshape(x.shape[0], -1)  # [T, n n]
    s = 1.0 / (1.0 + (mx.sum(mx.abs(dpre), -1) + mx.sum(mx.abs(dres), -1)) / x.shape[2])
    share = hpre.astype(f32)[:, :, None] * df[:, None, :] + mx.einsum("tji,tjc->tic", hres.astype(f32), gf)
    return (share + s[:, None, None] * xf).astype(x.dtype)


def fused_async(x, g, dh, hpre, hres, S: int = 8, groups: int = 512, reread: bool = False,
                threads: int = ASYNC_THREADS, stages: int = 2):
    """FUSED_ASYNC: as fused, the loads staged `stages` tiles deep by asynchronous copies, in about
    `groups` threadgroups of `threads` (a tile of TT = threads / (C / 8 S) tokens); a stage past
    STATIC_STAGE_BYTES is dynamic shared memory. reread: x, g and dh read from the stage again
    after the exchange instead of the tile's x and share held in registers across it (fewer
    registers, more threadgroups an SM)."""
    if stages < 2 or threads % 32 or not 32 <= threads <= 1024:
        raise ValueError(f"the async form needs stages >= 2 and threads a multiple of 32 up to 1024; "
                         f"got stages = {stages}, threads = {threads}")
    stage_bytes = stages * threads * (2 * N + 1) * 16
    spec = fused_async_spec(S, stage_bytes if stage_bytes > STATIC_STAGE_BYTES else 0)
    return _persistent(spec, "async", threads, (x, g, dh, hpre, hres), S, groups,
                       (("TG", threads), ("REREAD", reread), ("STAGES", stages)))
