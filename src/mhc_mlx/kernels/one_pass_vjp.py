"""CUDA only, a candidate not yet wired into any path: the dynamic site's backward from pre's
backward to x's cotangent in one pass over x (docs/kernel-notes.md, tenth session).

Today, at tensor-core sizes, pre's backward (site.PRE_VJP_RES) reads x, dh and g and writes its
share of x's cotangent; the glue (coefficients.DYNAMIC_VJP_SINKHORN_APPLY, then
DYNAMIC_VJP_GLUE_AFTER_SINKHORN) turns the token's row sums into the coefficient cotangents gs;
and DX reads x and that share again to write dx = share + gs phi^T - x c2: x comes from DRAM
twice (~50C bytes a token at n = 4 for what ~26C can do), because no element of dx can be
written before its token's whole-row sums exist.

Here threadgroup b owns tile b / S (TT tokens) and channel slice b % S (CS channels of every
stream): it loads its slice of x, g and dh once and keeps them in registers; writes the slice's
row sums (dH_pre = x . dh, dH_res = g x^T per token) as partials and counts itself into the
tile's counter; the tile's last threadgroup to arrive sums the partials, runs the glue for the
tile's tokens (the res logits' Sinkhorn backward as the Jacobian's transpose, the activations'
backward, the scaling: as the glue kernels) and publishes gs and c2; every threadgroup then
writes its slice of dx = H_pre (x) dh + H_res^T g + gs phi^T - x c2 from its registers and its
rows of phi (staged in shared memory). dphi = x^T gs stays a launch of its own.

The waits need a tile's S threadgroups resident together: consecutive block indices, S far
below the GPU's resident threadgroups; a bounded spin writes NaN rather than hang. Whether the
waits cost less than the second read is what scripts/tile_reuse.py's WAIT form measures first.

FORM "last" (template LASTW): no waits; the tile's last threadgroup writes the whole tile's dx,
re-reading each slice (L2) after the glue, and the others leave once counted.

PHASE (template): 0 the one launch above (GPU); the CPU emulator runs one threadgroup at a time,
so its tests run PHASE 1 (the partials alone) and then PHASE 3 (SPLIT: the partials as an input,
every threadgroup running its tile's glue itself, then writing its slice): the same text but the
count, the wait and the publishing. n <= 4.
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx

from .build import KernelSpec, int_params, launch, standin, watch

F32 = mx.float32
# The launch's shape, template values (a GPU run tunes them: gpu_experiments.py one-pass-vjp):
# TT tokens per tile, 16 threads per token (16 TT threads a group), CS channels of every stream
# per slice (CS / 16 per thread: their x and g in registers, 2 n CS / 16 values). n = 4: TT 16,
# CS 64 took 118 registers, 31.5 KB of shared memory (nvcc sm_90a).
TT = 16
CS = 64
MAX_N = 4
SPIN_LIMIT = 1 << 20  # polls (each an L2 round trip, ~1 µs) before a wait gives up: NaN, not a hang
# The split form (PHASE 1, then PHASE 3: two launches, no waits) in place of the one launch: what
# the CPU emulator runs (it cannot run a threadgroup that waits for another), and a fallback.
SPLIT = False
# "wait": every threadgroup waits for its tile's glue and writes its own slice from registers;
# "last": no waits, the tile's last threadgroup writes the whole tile's dx, re-reading x, g and dh
# (from L2: the tile's other threadgroups read them moments before) and phi slice by slice.
# scripts/tile_reuse.py measures the two patterns on a simpler problem.
FORM = "wait"

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
KDEV float opv_ldcg(const float* p) { return __ldcg(p); }
#endif
"""

_BODY = r"""
  constexpr int W = N * (N + 2);
  constexpr int NN = N * N;
  constexpr int NV = N + NN;  // dH_pre, then dH_res row-major
  constexpr int TPT = 16;     // threads per token
  constexpr int CPT = CS / TPT;
  KSHARED float phis[N * CS * W];
  KSHARED float gs_s[TT * W];
  KSHARED float c2_s[TT];
  KSHARED float hp_s[TT * N];
  KSHARED float hr_s[TT * NN];
  KSHARED float rows[TT * (W + 3)];
  KSHARED float sums_s[TT * NV];
  KSHARED float gl_s[TT * NN];
  KSHARED int flag_s;  // this threadgroup publishes the tile's glue (read by all after a barrier)
  KSHARED int ok_s;    // the wait ended in time (its own variable: thread 0 writes it while others
                       // may still be reading flag_s to pick their branch)
  const int Ttok = iparam[0];
  const int C = iparam[1];
  const int S = iparam[2];
  const int K = N * C;
  const int tile = KBID / S, slice = KBID % S;
  const int r = KTID / TPT, q = KTID % TPT;
  const int64_t t = (int64_t)tile * TT + r;
  const bool live = t < Ttok;
  const int c0 = slice * CS + q * CPT;
  // phi's rows of this slice (k = i C + c), staged while x, g and dh arrive
  for (int e = KTID; e < N * CS * W; e += KNT) {
    const int w = e % W, row = e / W, i = row / CS, c = row % CS;
    phis[e] = phi[((int64_t)i * C + slice * CS + c) * W + w];
  }
  const bool vec = KALIGNED16(xin) && KALIGNED16(gout) && KALIGNED16(dh) && KALIGNED16(gx);
  float xv[N][CPT], gv[N][CPT], dv[CPT];
  KUNROLL for (int e = 0; e < CPT; ++e) dv[e] = 0.0f;
  KUNROLL for (int i = 0; i < N; ++i) KUNROLL for (int e = 0; e < CPT; ++e) xv[i][e] = gv[i][e] = 0.0f;
  if (live) {
    kload<T, CPT>(dv, dh, t * C + c0, vec);
    KUNROLL for (int i = 0; i < N; ++i) {
      kload<T, CPT>(xv[i], xin, (t * N + i) * C + c0, vec);
      kload<T, CPT>(gv[i], gout, (t * N + i) * C + c0, vec);
    }
  }
  if (PHASE != 3) {
    // the slice's row sums of this token, over its 16 threads (half a warp), written by thread 0
    float acc[NV];
    KUNROLL for (int j = 0; j < N; ++j) {
      float d = 0.0f;
      KUNROLL for (int e = 0; e < CPT; ++e) d += dv[e] * xv[j][e];
      acc[j] = d;
      KUNROLL for (int i = 0; i < N; ++i) {
        float s = 0.0f;
        KUNROLL for (int e = 0; e < CPT; ++e) s += gv[i][e] * xv[j][e];
        acc[N + i * N + j] = s;
      }
    }
    KUNROLL for (int a = 0; a < NV; ++a) {
      KUNROLL for (int o = 8; o > 0; o >>= 1) acc[a] += kshfl_xor(acc[a], o);
    }
    if (q == 0) {
      KUNROLL for (int a = 0; a < NV; ++a) ((float*)partial)[(((int64_t)tile * S + slice) * TT + r) * NV + a] = acc[a];
    }
    if (PHASE == 1) return;
    opv_fence();
    KBARRIER();
    if (KTID == 0) flag_s = opv_atomic_add((int*)counters + tile, 1) == S - 1;
    KBARRIER();
    if (LASTW && !flag_s) return;  // the tile's last threadgroup writes all of its dx
    opv_fence();
  } else {
    flag_s = 1;  // SPLIT: every threadgroup runs its tile's glue from the partials
    KBARRIER();
  }
  if (flag_s) {
    // the glue for the tile's tokens (as DYNAMIC_VJP_SINKHORN_APPLY, then
    // DYNAMIC_VJP_GLUE_AFTER_SINKHORN; the tile's partials of g_bias and g_alpha in `part`), its
    // sums and the Jacobian's product spread over the threadgroup: every other threadgroup of
    // the tile waits for it. First each (token, value) pair summed over the S slices
    for (int e = KTID; e < TT * NV; e += KNT) {
      const int ul = e / NV, a = e % NV;
      const int64_t u = (int64_t)tile * TT + ul;
      float s = 0.0f;
      if (u < Ttok) {
        if (EXT) s = a < N ? extp[u * N + a] : extr[u * NN + a - N] + extr2[u * NN + a - N];  // other uses
        // past L1 (ld.global.cg: L2 holds the other threadgroups' partials) but not volatile, so
        // the S loads stay in flight together instead of one L2 round trip each
        const float* pp = (const float*)partial + ((int64_t)tile * S * TT + ul) * NV + a;
        float s1 = 0.0f, s2v = 0.0f, s3v = 0.0f;
        int s2 = 0;
        for (; s2 + 4 <= S; s2 += 4) {
          s += opv_ldcg(pp + (int64_t)s2 * TT * NV);
          s1 += opv_ldcg(pp + (int64_t)(s2 + 1) * TT * NV);
          s2v += opv_ldcg(pp + (int64_t)(s2 + 2) * TT * NV);
          s3v += opv_ldcg(pp + (int64_t)(s2 + 3) * TT * NV);
        }
        for (; s2 < S; ++s2) s += opv_ldcg(pp + (int64_t)s2 * TT * NV);
        s += (s1 + s2v) + s3v;
      }
      sums_s[e] = s;
    }
    KBARRIER();
    // the res logits' cotangent: the Sinkhorn Jacobian's transpose times dH_res, per (token, entry)
    for (int e = KTID; e < TT * NN; e += KNT) {
      const int ul = e / NN, a = e % NN;
      const int64_t u = (int64_t)tile * TT + ul;
      float s = 0.0f;
      if (u < Ttok) {
        KUNROLL for (int b = 0; b < NN; ++b) s += jac[(u * NN + b) * NN + a] * sums_s[ul * NV + N + b];
      }
      gl_s[e] = s;
    }
    KBARRIER();
    if (KTID < TT) {
      const int64_t u = (int64_t)tile * TT + KTID;
      const bool ulive = u < Ttok;
      const float a0 = alpha[0], a1 = alpha[1], a2 = alpha[2];
      float gh[W];
      KUNROLL for (int i = 0; i < N; ++i) {
        const float hp = ulive ? hpre[u * N + i] : 0.0f;
        const float hq = ulive ? hpost[u * N + i] : 0.0f;
        gh[i] = ulive ? sums_s[KTID * NV + i] * hp * (1.0f - hp) : 0.0f;
        gh[N + i] = ulive ? dhpost[u * N + i] * hq * (1.0f - 0.5f * hq) : 0.0f;
      }
      KUNROLL for (int a = 0; a < NN; ++a) gh[2 * N + a] = gl_s[KTID * NN + a];
      const float ir = ulive ? invr[u] : 0.0f;
      float s = 0.0f, seg0 = 0.0f, seg1 = 0.0f, seg2 = 0.0f;
      KUNROLL for (int c = 0; c < W; ++c) {
        const float mv = ulive ? mraw[u * W + c] : 0.0f;
        const float sc = c < N ? a0 : (c < 2 * N ? a1 : a2);
        const float gm = gh[c] * sc;
        s += gm * mv;
        gs_s[KTID * W + c] = gm * ir;
        const float ghm = gh[c] * mv;
        if (c < N) seg0 += ghm;
        else if (c < 2 * N) seg1 += ghm;
        else seg2 += ghm;
        rows[KTID * (W + 3) + c] = gh[c];
      }
      rows[KTID * (W + 3) + W] = seg0;
      rows[KTID * (W + 3) + W + 1] = seg1;
      rows[KTID * (W + 3) + W + 2] = seg2;
      c2_s[KTID] = ir * ir / (float)K * s;
      if (ulive && (PHASE == 0 || slice == 0)) {
        KUNROLL for (int c = 0; c < W; ++c) gsc[u * W + c] = gs_s[KTID * W + c];
        ctwo[u] = c2_s[KTID];
      }
    }
    KBARRIER();
    if ((PHASE == 0 || slice == 0) && KTID < W + 3) {
      float total = 0.0f;
      for (int u = 0; u < TT; ++u) total += rows[u * (W + 3) + KTID];
      part[(int64_t)tile * (W + 3) + KTID] = total;
    }
    if (PHASE == 0 && !LASTW) {
      opv_fence();
      KBARRIER();
      if (KTID == 0) opv_atomic_add((int*)counters + tile, 1);  // S + 1: published
    }
  } else {
    // wait for the tile's glue (bounded: NaN out rather than a hung device), then read it
    if (KTID == 0) {
      int polls = 0;
      while (opv_load(counters + tile) <= S && ++polls < SPIN) {}
      ok_s = polls < SPIN;
    }
    KBARRIER();
    opv_fence();
    const float bad = ok_s ? 0.0f : KBITS_FLOAT(0x7fc00000);
    for (int e = KTID; e < TT * W; e += KNT) {
      const int64_t u = (int64_t)tile * TT + e / W;
      gs_s[e] = (u < Ttok ? opv_ldcg(gsc + u * W + e % W) : 0.0f) + bad;
    }
    if (KTID < TT) {
      const int64_t u = (int64_t)tile * TT + KTID;
      c2_s[KTID] = (u < Ttok ? opv_ldcg(ctwo + u) : 0.0f) + bad;
    }
  }
  if (KTID < TT * N) {
    const int64_t u = (int64_t)tile * TT + KTID / N;
    hp_s[KTID] = u < Ttok ? hpre[u * N + KTID % N] : 0.0f;
  }
  for (int e = KTID; e < TT * NN; e += KNT) {
    const int64_t u = (int64_t)tile * TT + e / NN;
    hr_s[e] = u < Ttok ? hres[u * NN + e % NN] : 0.0f;
  }
  KBARRIER();
  // dx = H_pre (x) dh + H_res^T g + gs phi^T - x c2 over this thread's CPT channels of each stream:
  // of its own slice, or (LASTW) of every slice of the tile, each re-read (from L2) with its phi rows
  const float c2 = c2_s[r];
  for (int s3 = LASTW ? 0 : slice; s3 < (LASTW ? S : slice + 1); ++s3) {
    const int c3 = s3 * CS + q * CPT;
    if (LASTW) {
      KBARRIER();  // the slice before's phi rows are read
      for (int e = KTID; e < N * CS * W; e += KNT) {
        const int w = e % W, row = e / W, i = row / CS, c = row % CS;
        phis[e] = phi[((int64_t)i * C + s3 * CS + c) * W + w];
      }
      if (live) {
        kload<T, CPT>(dv, dh, t * C + c3, vec);
        KUNROLL for (int i = 0; i < N; ++i) {
          kload<T, CPT>(xv[i], xin, (t * N + i) * C + c3, vec);
          kload<T, CPT>(gv[i], gout, (t * N + i) * C + c3, vec);
        }
      }
      KBARRIER();
    }
    if (live) {
      KUNROLL for (int i = 0; i < N; ++i) {
        float o[CPT];
        const float hp = hp_s[r * N + i];
        KUNROLL for (int e = 0; e < CPT; ++e) o[e] = hp * dv[e] - xv[i][e] * c2;
        KUNROLL for (int j = 0; j < N; ++j) {
          const float a = hr_s[r * NN + j * N + i];
          KUNROLL for (int e = 0; e < CPT; ++e) o[e] += a * gv[j][e];
        }
        KUNROLL for (int e = 0; e < CPT; ++e) {
          const float* ph = phis + ((i * CS) + q * CPT + e) * W;
          float acc = 0.0f;
          KUNROLL for (int w = 0; w < W; ++w) acc += gs_s[r * W + w] * ph[w];
          o[e] += acc;
        }
        kstore<T, CPT>(gx, (t * N + i) * C + c3, o, vec);
      }
    }
  }
"""

# The tiles' counters, zeroed by a launch of their own that reads the site's own `dep` (an
# array of the call's): an `mx.zeros` would be a Full node that mx.compile's simplification merges
# with every other equal one in the trace (same primitive, same scalar input), so two sites of one
# compiled step would count into one buffer, the second finding it already past S.
ZERO_COUNTERS = KernelSpec(
    name="mhc_one_pass_counters",
    inputs=("dep", "iparam"),
    outputs=("z",),
    body=r"""
  const int64_t i = (int64_t)KBID * KNT + KTID;
  if (i < iparam[0]) z[i] = 0;
""",
)


def fresh_counters(tiles: int, dep: mx.array) -> mx.array:
    """[tiles] int32 zeros of this call's own (see ZERO_COUNTERS); dep: any array of the call."""
    return launch(ZERO_COUNTERS, [dep, int_params(tiles)], [((tiles,), mx.int32)], -(-tiles // 128) * 128, 128, [])[0]


_INPUTS = ("xin", "dh", "gout", "hpre", "hres", "jac", "mraw", "invr", "alpha", "bias", "hpost", "dhpost", "phi",
           "extp", "extr", "extr2")

# One launch on the GPU (PHASE 0), or PHASE 1 of the emulator's split: the partials are an output.
ONE_PASS = KernelSpec(
    name="mhc_one_pass_vjp",
    inputs=(*_INPUTS, "counters", "iparam"),
    outputs=("gx", "gsc", "ctwo", "part", "partial"),
    body=_BODY,
    helpers=HELPERS,
    scratch=("counters",),
)
# The emulator's second launch (PHASE 3): the partials are its input.
ONE_PASS_FROM_PARTIALS = KernelSpec(
    name="mhc_one_pass_vjp_from_partials",
    inputs=(*_INPUTS, "partial", "counters", "iparam"),
    outputs=("gx", "gsc", "ctwo", "part"),
    body=_BODY,
    helpers=HELPERS,
)


def shared_bytes(n: int, tt: int, cs: int) -> int:
    """The kernel's static shared memory (phi's slice rows and the tile's per-token values)."""
    W, NN = n * (n + 2), n * n
    return 4 * (n * cs * W + tt * (W + 1 + n + NN + (W + 3) + (n + NN) + NN)) + 4


def applies(x) -> bool:
    """Whether this form covers x [..., n, C]: n <= 4, C a multiple of CS, 16-bit x."""
    n, C = x.shape[-2], x.shape[-1]
    return n <= MAX_N and C % CS == 0 and CS % 16 == 0 and x.dtype in (mx.bfloat16, mx.float16)


def one_pass_vjp(x, dh, g, H_pre, H_res, jac, m, invr, alpha, bias, H_post, dH_post, phi, ext=None,
                 split: bool | None = None):  # noqa: PLR0913 -- the kernel's inputs, named
    """(dx [..., n, C] in x's dtype, gs [T, W], c2 [T], g_bias [W], g_alpha [3]) for a dynamic site's
    x [..., n, C], h's cotangent dh [..., C], post's output cotangent g [..., n, C] (the deferred
    chain's: post leaves x's and H_res's cotangents to pre), the per-token coefficients H_pre
    [T, n], H_res [T, n, n], H_post [T, n] and H_post's cotangent dH_post [T, n], the res logits'
    Sinkhorn Jacobian jac [T, n^2, n^2] (coefficients.DYNAMIC_SINKHORN_JACOBIAN), the forward's
    saved m [T, W] and 1/r [T], alpha [3], bias [W], phi [n C, W]; ext: (H_pre's [.., n], H_res's
    [.., n, n], H_res's again [.., n, n]) cotangents from other uses, added to the row sums (None:
    none). dphi = x^T gs is the caller's. split: PHASE 1 then PHASE 3 (two launches, no waits: the
    CPU emulator's form of FORM "wait"; None: SPLIT; FORM "last" has no waits and ignores it)."""
    *lead, n, C = x.shape
    if not applies(x):
        raise ValueError(f"one_pass_vjp covers 16-bit x with n <= {MAX_N} and C a multiple of {CS}; got "
                         f"{x.dtype} {tuple(x.shape)}")
    if shared_bytes(n, TT, CS) > 48 * 1024:
        raise ValueError(f"one_pass_vjp at TT = {TT}, CS = {CS}, n = {n} needs {shared_bytes(n, TT, CS)} bytes "
                         "of static shared memory; CUDA allows 48 KB")
    T = math.prod(lead)
    W = n * (n + 2)
    S = C // CS
    tiles = -(-T // TT)
    arrays = [x.reshape(T, n, C), dh.astype(x.dtype).reshape(T, C), g.astype(x.dtype).reshape(T, n, C),
              H_pre.astype(F32).reshape(T, n), H_res.astype(F32).reshape(T, n * n), jac.astype(F32),
              m.astype(F32), invr.astype(F32), alpha.astype(F32), bias.astype(F32), H_post.astype(F32).reshape(T, n),
              dH_post.astype(F32).reshape(T, n), phi.astype(F32)]
    if ext is None:
        arrays += [standin(F32)] * 3
    else:
        arrays += [ext[0].astype(F32).reshape(T, n), ext[1].astype(F32).reshape(T, n * n),
                   ext[2].astype(F32).reshape(T, n * n)]
    split = SPLIT if split is None else split
    params = int_params(T, C, S)
    outs = [((T, n, C), x.dtype), ((T, W), F32), ((T,), F32), ((tiles, W + 3), F32)]
    threads = 16 * TT
    grid = tiles * S * threads
    if FORM not in ("wait", "last"):
        raise ValueError(f"one_pass_vjp.FORM must be 'wait' or 'last', got {FORM!r}")
    last = FORM == "last"
    split = split and not last  # the last form has no waits: the emulator runs it as it is
    base = [("T", x.dtype), ("N", n), ("TT", TT), ("CS", CS), ("SPIN", SPIN_LIMIT), ("EXT", ext is not None),
            ("LASTW", last)]
    if split:
        partial = launch(ONE_PASS, [*arrays, standin(mx.int32), params], [*outs, ((tiles, S, TT, n + n * n), F32)],
                         grid, threads, [*base, ("PHASE", 1)])[4]
        gx, gs, c2, part = launch(ONE_PASS_FROM_PARTIALS, [*arrays, partial, standin(mx.int32), params], outs,
                                  grid, threads, [*base, ("PHASE", 3)])
    else:
        counters = fresh_counters(tiles, arrays[7])  # this call's own zeros (its 1/r the dependency)
        gx, gs, c2, part, _ = launch(ONE_PASS, [*arrays, counters, params],
                                     [*outs, ((tiles, S, TT, n + n * n), F32)], grid, threads, [*base, ("PHASE", 0)])
    sums = mx.sum(part, axis=0)
    return gx.reshape(x.shape), gs, c2, sums[:W], sums[W:]


@lru_cache(maxsize=None)
def _read_function(n: int, iters: int, eps: float):
    """A dynamic site's read (coefficients + pre) as one custom function for the deferred chain:
    (h, H_pre, H_post, H_res, x', H_res', m, 1/r), x' and H_res' passed through for
    site.mhc_post_deferred, whose backward hands its output cotangent g down as x''s and leaves
    H_res''s to this one; the backward is one_pass_vjp, then dphi on tensor cores."""
    from . import coefficients, coefficients_mma_vjp, site

    @mx.custom_function
    def read(x, phi, alpha, bias):
        H_pre, H_post, H_res, m, invr = coefficients.dynamic_coefficients_forward(x, phi, alpha, bias, n, iters, eps)
        return site.pre_forward(x, H_pre), H_pre, H_post, H_res, x, H_res, m, invr

    @read.vjp
    def read_vjp(primals, cotangents, outputs):
        x, phi, alpha, bias = primals
        dh, g_pre, g_post, g_res, g, g_res_next = cotangents[:6]
        _, H_pre, H_post, H_res, _, _, m, invr = outputs
        jac = coefficients.sinkhorn_jacobian(m, alpha, bias, n, iters)
        dx, gs, _, g_bias, g_alpha = one_pass_vjp(x, dh, g, H_pre, H_res, jac, m, invr, alpha, bias, H_post, g_post,
                                                  phi, ext=(g_pre, g_res, g_res_next))
        g_phi = coefficients_mma_vjp.dphi(x.reshape(m.shape[0], -1), gs)
        return dx, g_phi.astype(phi.dtype), g_alpha.astype(alpha.dtype), g_bias.astype(bias.dtype)

    return read


def mhc_read_one_pass(x, phi, alpha, bias, iters: int = 20, eps: float = 1e-6):
    """(h, H_pre, H_post, H_res, x', H_res') of a dynamic site whose backward is the one pass:
    post must be site.mhc_post_deferred(x', f, H_post, H_res')."""
    return _read_function(x.shape[-2], iters, float(eps))(x, phi, alpha, bias)[:6]


watch(__name__)  # settings assigned later bump build.settings_epoch
