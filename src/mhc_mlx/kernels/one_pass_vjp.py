"""CUDA only, a candidate (kernels.ONE_PASS_VJP, off: slower than the defaults on the H200): the
dynamic site's backward from pre's backward to x's cotangent without pre's share of dx written
and read back (docs/kernel-notes.md, the tenth session's section and rows 64-68).

Today, at tensor-core sizes, pre's backward (site.PRE_VJP_RES) reads x, dh and g and writes its
share of x's cotangent; the glue (coefficients.DYNAMIC_VJP_SINKHORN_APPLY, then
DYNAMIC_VJP_GLUE_AFTER_SINKHORN) turns the token's row sums into the coefficient cotangents gs;
and DX reads x and that share again to write dx = share + gs phi^T - x c2: ~50C bytes a token at
n = 4, because no element of dx can be written before its token's whole-row sums exist.

Here, in three launches: PARTIALS (threadgroup b: tile b / S of TT tokens, channel slice b % S of
every stream; x, g, dh read for the slice's row sums dH_pre = x . dh and dH_res = g x^T per
token), GLUE (a threadgroup a tile: the partials summed with the other uses' cotangents, then
the res logits' Sinkhorn backward as the Jacobian's transpose, the activations' backward and the
scaling, as the glue kernels), then dx from x, g, dh, gs and c2:
FORM "split": an FP32 DX here (gs phi^T by multiply-adds from phi's rows staged in shared memory
from phi^T); FORM "mma": the tensor-core DX (coefficients_mma_vjp.DX) adding pre's share
H_pre (x) dh and post's H_res^T g itself (PRE, RES). ~44C a token; dphi = x^T gs stays the
caller's launch. On the H200 (rows 66-67) the FP32 product was slower than tensor cores (DX
416-450 µs against 175-182), and the tensor-core lane reading g in all n streams slower than
reading pre's share (322.5 µs against 174.9). A third form with phi's rows packed
stream-interleaved, so each tensor-core lane read x, g and dh at 16 / n channels of every stream
once, was slower still (twelfth session, row 68: that DX 372.1 µs, the whole 475.1 against today's
351.5) and was removed; it is in commit e2eed4a.

One-launch forms (a tile's threadgroups waiting on a per-tile counter for its glue, or its last
threadgroup writing the whole tile) ran 876-1118 µs against today's 372 and were removed; they
are in commit 9b1003a (row 65).
n <= 4; CS a multiple of 64 (a thread's channels are whole float4s of phi's staged rows).
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx

from .build import KernelSpec, int_params, launch, standin, watch

F32 = mx.float32
# The launch's shape, template values (gpu_experiments.py one-pass-split times them): TT tokens
# per tile, 16 threads per token (16 TT threads a group), CS channels of every stream per slice
# (CS / 16 per thread: their x and g in registers, 2 n CS / 16 values). n = 4: TT 16, CS 64:
# phi's staged rows 24 KB of shared memory in the FP32 DX.
TT = 16
CS = 64
MAX_N = 4
# PARTIALS at PARTIAL_CS channels a slice (a multiple of 64 that divides C, else CS): wider
# slices, fewer shuffle reductions and partials (PARTIAL_CS / 16 channels a thread). H200: 64
# 122.6 µs, 128 109.9, 256 116.0 (row 66).
PARTIAL_CS = 64
# The FP32 DX in about DX_BLOCKS threadgroups, each staging its slice of phi once and looping
# over the tiles (0: a threadgroup a (tile, slice), phi staged by each). H200: 0 449.8 µs, 1056
# 415.9 (row 66).
DX_BLOCKS = 0
# "split" or "mma" (the docstring). H200, 4096 x 4 x 4096 bf16, these steps alone (rows 66-67):
# split 580.7 µs (541.4 tuned), mma 423.0 (PARTIALS 128), against today's pre backward + glue +
# DX 355.3-371.8.
FORM = "mma"
FORMS = ("split", "mma")

# Loads past L1 (ld.global.cg), as the kernels were timed on the H200 (rows 66-67); several stay in
# flight together. Plain loads instead changed the FP32 DX from 99 to 134 registers (nvcc sm_90a).
HELPERS = r"""
#ifdef MHC_BACKEND_CPU_EMULATION
KDEV float opv_ldcg(const float* p) { return *p; }
#else
KDEV float opv_ldcg(const float* p) { return __ldcg(p); }
#endif
"""

_DECL = r"""
  constexpr int W = N * (N + 2);
  constexpr int NN = N * N;
  constexpr int NV = N + NN;  // dH_pre, then dH_res row-major
  constexpr int TPT = 16;     // threads per token
  constexpr int CPT = CS / TPT;
  const int Ttok = iparam[0];
  const int C = iparam[1];
  const int S = iparam[2];
  const int K = N * C;
"""

# A (tile, slice) threadgroup's thread: token row r of the tile, CPT channels (from q CPT) of the
# slice in every stream.
_SLICE = r"""
  const int tile = KBID / S, slice = KBID % S;
  const int r = KTID / TPT, q = KTID % TPT;
  const int64_t t = (int64_t)tile * TT + r;
  const bool live = t < Ttok;
"""

_SHARED_GLUE = r"""
  KSHARED float rows[TT * (W + 3)];
  KSHARED float sums_s[TT * NV];
  KSHARED float gl_s[TT * NN];
"""

_SHARED_DX = r"""
  // phi's rows of a slice as [w][i][c] (from phi^T): a thread's CPT channels are CPT / 4 float4s
  // beside its neighbours', so 16 threads read 256 contiguous bytes with no bank conflicts (phi's
  // own [c][w] rows put the 16 threads' reads in one bank: 16-way conflicts, the first GPU run's
  // 2.2-2.8 ms)
  KSHARED float4 phis4[W * N * CS / 4];
  KSHARED float gs_s[TT * W];
  KSHARED float c2_s[TT];
  KSHARED float hp_s[TT * N];
  KSHARED float hr_s[TT * NN];
"""


# x, g and dh of this thread's channels of its slice into registers
_LOAD = r"""
  {
    const int c3 = slice * CS + q * CPT;
    if (live) {
      kload<T, CPT>(dv, dh, t * C + c3, vec);
      KUNROLL for (int i = 0; i < N; ++i) {
        kload<T, CPT>(xv[i], xin, (t * N + i) * C + c3, vec);
        kload<T, CPT>(gv[i], gout, (t * N + i) * C + c3, vec);
      }
    }
  }
"""


def _registers(writes_dx: bool) -> str:
    """x, g and dh's registers; vec: every array the thread reads or writes 16-byte aligned."""
    return r"""
  const bool vec = KALIGNED16(xin) && KALIGNED16(gout) && KALIGNED16(dh)GX;
  float xv[N][CPT], gv[N][CPT], dv[CPT];
  KUNROLL for (int e = 0; e < CPT; ++e) dv[e] = 0.0f;
  KUNROLL for (int i = 0; i < N; ++i) KUNROLL for (int e = 0; e < CPT; ++e) xv[i][e] = gv[i][e] = 0.0f;
""".replace("GX", " && KALIGNED16(gx)" if writes_dx else "")


# phi's rows of this threadgroup's slice into phis4, read from phi^T [W, n C] in order
_STAGE_PHI = r"""
  for (int e = KTID; e < W * N * (CS / 4); e += KNT) {
    const int c4 = e % (CS / 4), wi = e / (CS / 4);  // wi = w N + i
    const float* src = phit + (int64_t)(wi / N) * K + (int64_t)(wi % N) * C + slice * CS + 4 * c4;
    phis4[e] = KFLOAT4(src[0], src[1], src[2], src[3]);
  }
"""


# The slice's row sums of this token over its 16 threads (half a warp), written by thread 0.
_PARTIALS = r"""
  {
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
      KUNROLL for (int a = 0; a < NV; ++a) partial[(((int64_t)tile * S + slice) * TT + r) * NV + a] = acc[a];
    }
  }
"""

# The glue for tile `tile`'s tokens (as DYNAMIC_VJP_SINKHORN_APPLY, then
# DYNAMIC_VJP_GLUE_AFTER_SINKHORN), spread over the threadgroup: gs and c2 into gsc and ctwo; the
# tile's partials of g_bias and g_alpha into part. First each (token, value) pair summed over the
# S slices' partials.
_GLUE = r"""
  for (int e = KTID; e < TT * NV; e += KNT) {
    const int ul = e / NV, a = e % NV;
    const int64_t u = (int64_t)tile * TT + ul;
    float s = 0.0f;
    if (u < Ttok) {
      if (EXT) s = a < N ? extp[u * N + a] : extr[u * NN + a - N] + extr2[u * NN + a - N];  // other uses
      // four independent sums, so the S loads stay in flight together
      const float* pp = partial + ((int64_t)tile * S * TT + ul) * NV + a;
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
      const float ghm = gh[c] * mv;
      if (c < N) seg0 += ghm;
      else if (c < 2 * N) seg1 += ghm;
      else seg2 += ghm;
      rows[KTID * (W + 3) + c] = gh[c];
      if (ulive) gsc[u * W + c] = gm * ir;
    }
    rows[KTID * (W + 3) + W] = seg0;
    rows[KTID * (W + 3) + W + 1] = seg1;
    rows[KTID * (W + 3) + W + 2] = seg2;
    if (ulive) ctwo[u] = ir * ir / (float)K * s;
  }
  KBARRIER();
  if (KTID < W + 3) {
    float total = 0.0f;
    for (int u = 0; u < TT; ++u) total += rows[u * (W + 3) + KTID];
    part[(int64_t)tile * (W + 3) + KTID] = total;
  }
"""


# gs and c2 of the tile's tokens, from GLUE's outputs
_READ_GLUE = r"""
  for (int e = KTID; e < TT * W; e += KNT) {
    const int64_t u = (int64_t)tile * TT + e / W;
    gs_s[e] = u < Ttok ? opv_ldcg(gsc + u * W + e % W) : 0.0f;
  }
  if (KTID < TT) {
    const int64_t u = (int64_t)tile * TT + KTID;
    c2_s[KTID] = u < Ttok ? opv_ldcg(ctwo + u) : 0.0f;
  }
"""


_STAGE_H = r"""
  if (KTID < TT * N) {
    const int64_t u = (int64_t)tile * TT + KTID / N;
    hp_s[KTID] = u < Ttok ? hpre[u * N + KTID % N] : 0.0f;
  }
  for (int e = KTID; e < TT * NN; e += KNT) {
    const int64_t u = (int64_t)tile * TT + e / NN;
    hr_s[e] = u < Ttok ? hres[u * NN + e % NN] : 0.0f;
  }
"""


# dx = H_pre (x) dh + H_res^T g + gs phi^T - x c2 over this thread's CPT channels of each stream
# of its slice (its x, g, dh in registers, phi's rows in phis4): the x, g and dh terms first, so
# their registers are free before the w loop (which reads each gs once)
_DX = r"""
  if (live) {
    const int c3 = slice * CS + q * CPT;
    const float c2 = c2_s[r];
    float o[N][CPT];
    KUNROLL for (int i = 0; i < N; ++i) {
      const float hp = hp_s[r * N + i];
      KUNROLL for (int e = 0; e < CPT; ++e) o[i][e] = hp * dv[e] - xv[i][e] * c2;
      KUNROLL for (int j = 0; j < N; ++j) {
        const float a = hr_s[r * NN + j * N + i];
        KUNROLL for (int e = 0; e < CPT; ++e) o[i][e] += a * gv[j][e];
      }
    }
    KUNROLL for (int w = 0; w < W; ++w) {
      const float gw = gs_s[r * W + w];
      KUNROLL for (int i = 0; i < N; ++i) {
        KUNROLL for (int e4 = 0; e4 < CPT / 4; ++e4) {
          const float4 p = phis4[(w * N + i) * (CS / 4) + q * (CPT / 4) + e4];
          o[i][4 * e4] += gw * p.x;
          o[i][4 * e4 + 1] += gw * p.y;
          o[i][4 * e4 + 2] += gw * p.z;
          o[i][4 * e4 + 3] += gw * p.w;
        }
      }
    }
    KUNROLL for (int i = 0; i < N; ++i) kstore<T, CPT>(gx, (t * N + i) * C + c3, o[i], vec);
  }
"""


_TENSORS = ("xin", "dh", "gout")
_GLUE_INPUTS = ("hpre", "jac", "mraw", "invr", "alpha", "hpost", "dhpost", "extp", "extr", "extr2")

# The partials, then the glue (a threadgroup a tile), then dx (FORM "split"; "mma" takes
# coefficients_mma_vjp.DX).
PARTIALS = KernelSpec(
    name="mhc_one_pass_partials",
    inputs=(*_TENSORS, "iparam"),
    outputs=("partial",),
    body=_DECL + _SLICE + _registers(False) + _LOAD + _PARTIALS,
)
GLUE = KernelSpec(
    name="mhc_one_pass_glue",
    inputs=("partial", *_GLUE_INPUTS, "iparam"),
    outputs=("gsc", "ctwo", "part"),
    body=_DECL + _SHARED_GLUE + "\n  const int tile = KBID;\n" + _GLUE,
    helpers=HELPERS,
)
# The split's dx: threadgroup b stages slice b % S of phi once, then writes that slice of tiles
# b / S, b / S + P, ... (P = iparam[3]).
_DX_BODY = (_DECL + _SHARED_DX + r"""
  const int slice = KBID % S;
  const int P = iparam[3];
  const int tiles = (Ttok + TT - 1) / TT;
  const int r = KTID / TPT, q = KTID % TPT;
""" + _registers(True) + _STAGE_PHI + r"""
  _Pragma("unroll 1") for (int tile = KBID / S; tile < tiles; tile += P) {
    const int64_t t = (int64_t)tile * TT + r;
    const bool live = t < Ttok;
""" + _LOAD + _READ_GLUE + _STAGE_H + r"""
    KBARRIER();
""" + _DX + r"""
    KBARRIER();  // the tile's gs_s, c2_s, hp_s and hr_s are read: the next tile's may go in
  }
""")
DX = KernelSpec(
    name="mhc_one_pass_dx",
    inputs=(*_TENSORS, "hpre", "hres", "phit", "gsc", "ctwo", "iparam"),
    outputs=("gx",),
    body=_DX_BODY,
    helpers=HELPERS,
)
SPECS = (PARTIALS, GLUE, DX)


def shared_bytes(n: int, tt: int, cs: int) -> int:
    """The FP32 DX's static shared memory: phi's slice rows and the tile's per-token values."""
    W, NN = n * (n + 2), n * n
    return 4 * (n * cs * W + tt * (W + 1 + n + NN))


def applies(x) -> bool:
    """Whether this form covers x [..., n, C]: n <= 4, C a multiple of CS, 16-bit x."""
    n, C = x.shape[-2], x.shape[-1]
    return n <= MAX_N and C % CS == 0 and CS % 64 == 0 and x.dtype in (mx.bfloat16, mx.float16)


def partials(x, dh, g) -> tuple[mx.array, int]:
    """The first launch: (partial [tiles, S', TT, n + n^2], S') of x [T, n, C], dh [T, C],
    g [T, n, C]: each (tile, slice)'s row sums, S' slices of PARTIAL_CS channels (CS where that
    does not divide C)."""
    T, n, C = x.shape
    cs = PARTIAL_CS if PARTIAL_CS % 64 == 0 and C % PARTIAL_CS == 0 else CS
    sp, tiles = C // cs, -(-T // TT)
    out = launch(PARTIALS, [x, dh, g, int_params(T, C, sp)], [((tiles, sp, TT, n + n * n), F32)],
                 tiles * sp * 16 * TT, 16 * TT, [("T", x.dtype), ("N", n), ("TT", TT), ("CS", cs)])[0]
    return out, sp


def glue_from_partials(partial, glue, T: int, C: int, sp: int, ext: bool):
    """The second launch, a threadgroup a tile: (gs [T, W], c2 [T], part [tiles, W + 3])
    from the partials and the glue's inputs (H_pre, jac, m, 1/r, alpha, H_post, dH_post and the
    three other uses' cotangents, as one_pass_vjp lists them)."""
    n = glue[0].shape[-1]
    W, tiles = n * (n + 2), -(-T // TT)
    return launch(GLUE, [partial, *glue, int_params(T, C, sp)], [((T, W), F32), ((T,), F32), ((tiles, W + 3), F32)],
                  tiles * 16 * TT, 16 * TT, [("N", n), ("TT", TT), ("CS", CS), ("EXT", ext)])


def split_dx(x, dh, g, H_pre, h_res, phit, gs, c2) -> mx.array:
    """FORM "split"'s third launch: dx [T, n, C] (x's dtype) of x [T, n, C], dh [T, C], g [T, n, C],
    H_pre [T, n], H_res [T, n^2], phi^T [W, n C], gs [T, W] and c2 [T]."""
    T, n, C = x.shape
    S, tiles = C // CS, -(-T // TT)
    groups = tiles if DX_BLOCKS <= 0 else max(1, min(tiles, -(-DX_BLOCKS // S)))
    return launch(DX, [x, dh, g, H_pre, h_res, phit, gs, c2, int_params(T, C, S, groups)], [((T, n, C), x.dtype)],
                  groups * S * 16 * TT, 16 * TT, [("T", x.dtype), ("N", n), ("TT", TT), ("CS", CS)])[0]


def one_pass_vjp(x, dh, g, H_pre, H_res, jac, m, invr, alpha, bias, H_post, dH_post, phi,
                 ext=None):  # noqa: PLR0913 -- the kernels' inputs, named
    """(dx [..., n, C] in x's dtype, gs [T, W], c2 [T], g_bias [W], g_alpha [3]) for a dynamic site's
    x [..., n, C], h's cotangent dh [..., C], post's output cotangent g [..., n, C] (the deferred
    chain's: post leaves x's and H_res's cotangents to pre), the per-token coefficients H_pre
    [T, n], H_res [T, n, n], H_post [T, n] and H_post's cotangent dH_post [T, n], the res logits'
    Sinkhorn Jacobian jac [T, n^2, n^2] (coefficients.DYNAMIC_SINKHORN_JACOBIAN), the forward's
    saved m [T, W] and 1/r [T], alpha [3], bias [W] (its cotangent needs only the activations'
    outputs: unread), phi [n C, W]; ext: (H_pre's [.., n], H_res's [.., n, n], H_res's again
    [.., n, n]) cotangents from other uses, added to the row sums (None: none). dphi = x^T gs is
    the caller's. FORM picks the dx launch."""
    del bias
    *lead, n, C = x.shape
    if FORM not in FORMS:
        raise ValueError(f"one_pass_vjp.FORM must be one of {FORMS}, got {FORM!r}")
    if not applies(x):
        raise ValueError(f"one_pass_vjp covers 16-bit x with n <= {MAX_N} and C a multiple of {CS} (itself a "
                         f"multiple of 64); got {x.dtype} {tuple(x.shape)}")
    if FORM == "split" and shared_bytes(n, TT, CS) > 48 * 1024:
        raise ValueError(f"one_pass_vjp's FP32 DX at TT = {TT}, CS = {CS}, n = {n} needs {shared_bytes(n, TT, CS)} "
                         "bytes of static shared memory; CUDA allows 48 KB")
    T = math.prod(lead)
    W = n * (n + 2)
    tensors = [x.reshape(T, n, C), dh.astype(x.dtype).reshape(T, C), g.astype(x.dtype).reshape(T, n, C)]
    glue = [H_pre.astype(F32).reshape(T, n), jac.astype(F32), m.astype(F32), invr.astype(F32), alpha.astype(F32),
            H_post.astype(F32).reshape(T, n), dH_post.astype(F32).reshape(T, n)]
    if ext is None:
        glue += [standin(F32)] * 3
    else:
        glue += [ext[0].astype(F32).reshape(T, n), ext[1].astype(F32).reshape(T, n * n),
                 ext[2].astype(F32).reshape(T, n * n)]
    h_res = H_res.astype(F32).reshape(T, n * n)
    partial, sp = partials(*tensors)
    gs, c2, part = glue_from_partials(partial, glue, T, C, sp, ext is not None)
    if FORM == "mma":
        from . import coefficients_mma_vjp

        gx = coefficients_mma_vjp.dx(tensors[0].reshape(T, n * C), phi, gs, c2, pre=(glue[0], tensors[1]),
                                     res=(h_res, tensors[2]))
    else:  # phi^T: the FP32 DX stages rows of it
        gx = split_dx(*tensors, glue[0], h_res, phi.astype(F32).T, gs, c2)
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
