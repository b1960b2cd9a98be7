"""The site's read (pre) and write (post) kernels and their fused backwards.

Forward kernels are flat: one thread per (token, V consecutive channels), all n streams.
Backward kernels give each threadgroup whole tokens (a persistent loop over tokens), because
the coefficient gradients are sums over the channels of a token (per-token coefficients) or
over all tokens (shared coefficients: summed in registers, one partial per threadgroup).
Coefficients are float32; `SHARED` means one set for all tokens, else one per token.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..compiled import matmul
from . import build
from .build import KernelSpec, edited, int_params, launch, standin, watch

F32 = mx.float32
MAX_N = 32
MAX_N_REDUCE = 8  # coefficient gradients summed in registers up to n*n + n = 72 values
FLAT_THREADS = 256
TOKEN_THREADS = 256
MAX_GROUPS = 1056  # persistent backward grids: about 8 groups per SM on a 132-SM GPU

PRE = KernelSpec(
    name="mhc_pre",
    inputs=("xin", "hpre", "iparam"),
    outputs=("hout",),
    body=r"""
  const int Ttok = iparam[0];
  const int C = iparam[1];
  const int nv = C / V;
  const int64_t gid = (int64_t)KBID * KNT + KTID;
  const int64_t t = gid / nv;
  const int cv = (int)(gid - t * nv);
  if (t < Ttok) {
    const bool vec = KALIGNED16(xin) && KALIGNED16(hout);
    float acc[V];
    KUNROLL for (int e = 0; e < V; ++e) acc[e] = 0.0f;
    KUNROLL for (int i = 0; i < N; ++i) {
      float xv[V];
      kload<T, V>(xv, xin, (t * N + i) * C + (int64_t)cv * V, vec);
      const float h = SHARED ? hpre[i] : hpre[t * N + i];
      KUNROLL for (int e = 0; e < V; ++e) acc[e] += h * xv[e];
    }
    kstore<T, V>(hout, t * C + (int64_t)cv * V, acc, vec);
  }
""",
)

# DX = false: dH_pre alone (gx untouched, a one-element stand-in): the fused read step
# (pre_step.py) folds pre's dx into the coefficient backward's single write of x's cotangent.
PRE_VJP = KernelSpec(
    name="mhc_pre_vjp",
    inputs=("xin", "hpre", "gout", "iparam"),
    outputs=("gx", "gh"),
    body=r"""
  KSHARED float scratch[8 * N];
  const int Ttok = iparam[0];
  const int C = iparam[1];
  const int nv = C / V;
  const int tid = KTID;
  const int lane = KLANE;
  const int warp = KWARP;
  const int nwarps = KNT / 32;
  const bool vec = KALIGNED16(xin) && KALIGNED16(gout) && (!DX || KALIGNED16(gx));
  float acc[N];
  KUNROLL for (int i = 0; i < N; ++i) acc[i] = 0.0f;
  for (int64_t t = KBID; t < Ttok; t += KNB) {
    for (int cv = tid; cv < nv; cv += KNT) {
      float g[V];
      kload<T, V>(g, gout, t * C + (int64_t)cv * V, vec);
      KUNROLL for (int i = 0; i < N; ++i) {
        const float h = SHARED ? hpre[i] : hpre[t * N + i];
        const int64_t off = (t * N + i) * C + (int64_t)cv * V;
        float xv[V];
        float o[V];
        kload<T, V>(xv, xin, off, vec);
        float d = 0.0f;
        KUNROLL for (int e = 0; e < V; ++e) {
          o[e] = h * g[e];
          d += g[e] * xv[e];
        }
        if (DX) kstore<T, V>(gx, off, o, vec);
        acc[i] += d;
      }
    }
    if (!SHARED) {
      const float total = kblock_reduce<N>(acc, scratch, lane, warp, nwarps, tid);
      if (tid < N) gh[t * N + tid] = total;
      KUNROLL for (int i = 0; i < N; ++i) acc[i] = 0.0f;
    }
  }
  if (SHARED) {
    const float total = kblock_reduce<N>(acc, scratch, lane, warp, nwarps, tid);
    if (tid < N) gh[(int64_t)KBID * N + tid] = total;
  }
""",
)


def _with_accumulated_dx(body: str) -> str:
    """PRE_VJP's text (DX = true) plus x's cotangent from later in the site (`gacc`: what
    post's backward wrote, passed down the chain of the `chained` functions below), added as
    the kernel writes pre's share: x's cotangent written once, without an MLX add."""
    edits = (
        ("(!DX || KALIGNED16(gx));", "(!DX || (KALIGNED16(gx) && KALIGNED16(gacc)));"),
        ("        if (DX) kstore<T, V>(gx, off, o, vec);\n",
         "        if (DX) {\n"
         "          float a[V];\n"
         "          kload<T, V>(a, gacc, off, vec);\n"
         "          KUNROLL for (int e = 0; e < V; ++e) o[e] += a[e];\n"
         "          kstore<T, V>(gx, off, o, vec);\n"
         "        }\n"),
    )
    return edited(body, edits)


PRE_VJP_ACC = KernelSpec(
    name="mhc_pre_vjp_acc",
    inputs=("xin", "hpre", "gout", "gacc", "iparam"),
    outputs=("gx", "gh"),
    body=_with_accumulated_dx(PRE_VJP.body),
)

# The deferred chain (kernels.DEFER_POST_X): post's backward hands its output cotangent g
# [T, n, C] down untouched in place of x's (H_res^T g), and H_res's cotangent is left to this
# kernel, which reads x, dh and g once: dx = H_pre (x) dh + H_res^T g, dH_pre = x . dh and
# dH_res = g x^T per token (summed over tokens where the coefficients are SHARED). Post's
# backward then reads g and f and writes f's cotangent (12C bytes per token at n = 4, bf16)
# instead of also reading x and writing x's cotangent (28C); this kernel moves 26C, as pre's
# accumulating backward does.
PRE_VJP_RES = KernelSpec(
    name="mhc_pre_vjp_res",
    inputs=("xin", "hpre", "hres", "gout", "gpost", "iparam"),
    outputs=("gx", "gh", "gres"),
    body=r"""
  constexpr int NV = N + N * N;  // dH_pre, then dH_res row-major
  KSHARED float scratch[8 * NV];
  const int Ttok = iparam[0];
  const int C = iparam[1];
  const int nv = C / V;
  const int tid = KTID;
  const int lane = KLANE;
  const int warp = KWARP;
  const int nwarps = KNT / 32;
  const bool vec = KALIGNED16(xin) && KALIGNED16(gout) && KALIGNED16(gpost) && KALIGNED16(gx);
  float acc[NV];
  KUNROLL for (int a = 0; a < NV; ++a) acc[a] = 0.0f;
  for (int64_t t = KBID; t < Ttok; t += KNB) {
    const int64_t hb = SHARED ? 0 : t;
    for (int cv = tid; cv < nv; cv += KNT) {
      float dv[V];
      kload<T, V>(dv, gout, t * C + (int64_t)cv * V, vec);
      float g[N][V];
      KUNROLL for (int i = 0; i < N; ++i) kload<T, V>(g[i], gpost, (t * N + i) * C + (int64_t)cv * V, vec);
      KUNROLL for (int j = 0; j < N; ++j) {
        const int64_t off = (t * N + j) * C + (int64_t)cv * V;
        float xv[V];
        float o[V];
        kload<T, V>(xv, xin, off, vec);
        const float hp = hpre[hb * N + j];
        float d = 0.0f;
        KUNROLL for (int e = 0; e < V; ++e) {
          o[e] = hp * dv[e];
          d += dv[e] * xv[e];
        }
        acc[j] += d;
        KUNROLL for (int i = 0; i < N; ++i) {
          const float a = hres[(hb * N + i) * N + j];
          float r = 0.0f;
          KUNROLL for (int e = 0; e < V; ++e) {
            o[e] += a * g[i][e];
            r += g[i][e] * xv[e];
          }
          acc[N + i * N + j] += r;
        }
        kstore<T, V>(gx, off, o, vec);
      }
    }
    if (!SHARED) {
      const float total = kblock_reduce<NV>(acc, scratch, lane, warp, nwarps, tid);
      if (tid < N) gh[t * N + tid] = total;
      else if (tid < NV) gres[t * N * N + (tid - N)] = total;
      KUNROLL for (int a = 0; a < NV; ++a) acc[a] = 0.0f;
    }
  }
  if (SHARED) {
    const float total = kblock_reduce<NV>(acc, scratch, lane, warp, nwarps, tid);
    if (tid < N) gh[(int64_t)KBID * N + tid] = total;
    else if (tid < NV) gres[(int64_t)KBID * N * N + (tid - N)] = total;
  }
""",
)

POST = KernelSpec(
    name="mhc_post",
    inputs=("xin", "fin", "hpost", "hres", "iparam"),
    outputs=("xout",),
    body=r"""
  const int Ttok = iparam[0];
  const int C = iparam[1];
  const int nv = C / V;
  const int64_t gid = (int64_t)KBID * KNT + KTID;
  const int64_t t = gid / nv;
  const int cv = (int)(gid - t * nv);
  if (t < Ttok) {
    const bool vec = KALIGNED16(xin) && KALIGNED16(fin) && KALIGNED16(xout);
    const int64_t hb = SHARED ? 0 : t;
    float xv[N][V];
    float fv[V];
    KUNROLL for (int j = 0; j < N; ++j) kload<T, V>(xv[j], xin, (t * N + j) * C + (int64_t)cv * V, vec);
    kload<T, V>(fv, fin, t * C + (int64_t)cv * V, vec);
    KUNROLL for (int i = 0; i < N; ++i) {
      float o[V];
      const float hp = hpost[hb * N + i];
      KUNROLL for (int e = 0; e < V; ++e) o[e] = 0.0f;
      KUNROLL for (int j = 0; j < N; ++j) {
        const float a = hres[(hb * N + i) * N + j];
        KUNROLL for (int e = 0; e < V; ++e) o[e] += a * xv[j][e];
      }
      KUNROLL for (int e = 0; e < V; ++e) o[e] += hp * fv[e];
      kstore<T, V>(xout, (t * N + i) * C + (int64_t)cv * V, o, vec);
    }
  }
""",
)

POST_VJP = KernelSpec(
    name="mhc_post_vjp",
    inputs=("xin", "fin", "hpost", "hres", "gout", "iparam"),
    outputs=("gx", "gf", "gpost", "gres"),
    body=r"""
  constexpr int NV = HGRAD ? N * N + N : 1;
  KSHARED float scratch[8 * NV];
  const int Ttok = iparam[0];
  const int C = iparam[1];
  const int nv = C / V;
  const int tid = KTID;
  const int lane = KLANE;
  const int warp = KWARP;
  const int nwarps = KNT / 32;
  const bool vec = KALIGNED16(xin) && KALIGNED16(fin) && KALIGNED16(gout) && (DEFER || KALIGNED16(gx)) &&
                   KALIGNED16(gf);
  float acc[NV];
  KUNROLL for (int a = 0; a < NV; ++a) acc[a] = 0.0f;
  for (int64_t t = KBID; t < Ttok; t += KNB) {
    const int64_t hb = SHARED ? 0 : t;
    for (int cv = tid; cv < nv; cv += KNT) {
      float g[N][V];
      KUNROLL for (int i = 0; i < N; ++i) kload<T, V>(g[i], gout, (t * N + i) * C + (int64_t)cv * V, vec);
      float o[V];
      KUNROLL for (int e = 0; e < V; ++e) o[e] = 0.0f;
      KUNROLL for (int i = 0; i < N; ++i) {
        const float hp = hpost[hb * N + i];
        KUNROLL for (int e = 0; e < V; ++e) o[e] += hp * g[i][e];
      }
      kstore<T, V>(gf, t * C + (int64_t)cv * V, o, vec);
      if (HGRAD) {
        float fv[V];
        kload<T, V>(fv, fin, t * C + (int64_t)cv * V, vec);
        KUNROLL for (int i = 0; i < N; ++i) {
          float d = 0.0f;
          KUNROLL for (int e = 0; e < V; ++e) d += g[i][e] * fv[e];
          acc[(N * N + i) % NV] += d;
        }
      }
      if (!DEFER) KUNROLL for (int j = 0; j < N; ++j) {
        const int64_t off = (t * N + j) * C + (int64_t)cv * V;
        KUNROLL for (int e = 0; e < V; ++e) o[e] = 0.0f;
        KUNROLL for (int i = 0; i < N; ++i) {
          const float a = hres[(hb * N + i) * N + j];
          KUNROLL for (int e = 0; e < V; ++e) o[e] += a * g[i][e];
        }
        kstore<T, V>(gx, off, o, vec);
        if (HGRAD) {
          float xv[V];
          kload<T, V>(xv, xin, off, vec);
          KUNROLL for (int i = 0; i < N; ++i) {
            float d = 0.0f;
            KUNROLL for (int e = 0; e < V; ++e) d += g[i][e] * xv[e];
            acc[(i * N + j) % NV] += d;
          }
        }
      }
    }
    if (HGRAD && !SHARED) {
      const float total = kblock_reduce<NV>(acc, scratch, lane, warp, nwarps, tid);
      if (tid < N * N) gres[t * N * N + tid] = total;
      else if (tid < NV) gpost[t * N + (tid - N * N)] = total;
      KUNROLL for (int a = 0; a < NV; ++a) acc[a] = 0.0f;
    }
  }
  if (HGRAD && SHARED) {
    const float total = kblock_reduce<NV>(acc, scratch, lane, warp, nwarps, tid);
    if (tid < N * N) gres[(int64_t)KBID * N * N + tid] = total;
    else if (tid < NV) gpost[(int64_t)KBID * N + (tid - N * N)] = total;
  }
""",
)


def vector_width(C: int, itemsize: int, n: int, budget: int = 64) -> int:
    """Channels per thread: a 16-byte vector when C allows it, fewer when n*V registers would
    exceed `budget`, 1 for odd C (the scalar path, always correct)."""
    v = 16 // itemsize
    while v > 1 and (C % v or n * v > budget):
        v //= 2
    return v


def _flat_grid(T: int, C: int, V: int) -> int:
    work = T * (C // V)
    return -(-work // FLAT_THREADS) * FLAT_THREADS


def _coefficient_rows(h, lead, trailing):
    """(array [rows, *trailing] float32, shared) for a coefficient that broadcasts over `lead`."""
    size = 1
    for d in trailing:
        size *= d
    if h.size == size:
        return h.astype(F32).reshape(trailing), True
    full = mx.broadcast_to(h.astype(F32), (*lead, *trailing))
    return full.reshape(-1, *trailing), False


def _paired_rows(H_vec, H_res, lead, n: int):
    """(H_vec rows [rows, n], H_res rows [rows, n, n], shared) for a kernel that reads both:
    one set each when both are shared, else both one row per token (a mixed pair broadcast)."""
    hv, shared_v = _coefficient_rows(H_vec, lead, (n,))
    hr, shared_r = _coefficient_rows(H_res, lead, (n, n))
    if shared_v != shared_r:
        hv = mx.broadcast_to(H_vec.astype(F32), (*lead, n)).reshape(-1, n)
        hr = mx.broadcast_to(H_res.astype(F32), (*lead, n, n)).reshape(-1, n, n)
    return hv, hr, shared_v and shared_r


def pre_forward(x, H_pre):
    *lead, n, C = x.shape
    T = math.prod(lead)
    h, shared = _coefficient_rows(H_pre, tuple(lead), (n,))
    V = vector_width(C, x.dtype.size, n, budget=256)
    out = launch(
        PRE, [x, h, int_params(T, C)], [((*lead, C), x.dtype)], _flat_grid(T, C, V), FLAT_THREADS,
        [("T", x.dtype), ("N", n), ("V", V), ("SHARED", shared)],
    )[0]
    return out


def _groups(T: int) -> int:
    return max(1, min(T, MAX_GROUPS))


def pre_vjp(x, H_pre, g, gacc=None):
    """(dx, dH_pre) of pre; gacc: x's cotangent from later in the site, added to dx in the
    same pass (PRE_VJP_ACC)."""
    *lead, n, C = x.shape
    T = math.prod(lead)
    h, shared = _coefficient_rows(H_pre, tuple(lead), (n,))
    V = vector_width(C, x.dtype.size, n, budget=64)
    groups = _groups(T)
    rows = groups if shared else T
    spec, inputs = PRE_VJP, [x, h, g.astype(x.dtype)]
    if gacc is not None:
        spec, inputs = PRE_VJP_ACC, inputs + [gacc.astype(x.dtype)]
    gx, gh = launch(
        spec, inputs + [int_params(T, C)],
        [(x.shape, x.dtype), ((rows, n), F32)], groups * TOKEN_THREADS, TOKEN_THREADS,
        [("T", x.dtype), ("N", n), ("V", V), ("SHARED", shared), ("DX", True)],
    )
    gh = mx.sum(gh, axis=0) if shared else gh.reshape(*lead, n)
    return gx, _reduce_to(gh, H_pre)


def pre_vjp_res(x, H_pre, H_res, dh, g):
    """(dx, dH_pre, dH_res) of pre together with post's deferred share (PRE_VJP_RES): dh is h's
    cotangent [..., C], g post's output cotangent [..., n, C] (n <= MAX_N_REDUCE)."""
    *lead, n, C = x.shape
    T = math.prod(lead)
    hp, hr, shared = _paired_rows(H_pre, H_res, tuple(lead), n)
    # x's rows loaded with dh and g before the chunk's stores (the token's coefficients in
    # registers) lost on the H200: 200.3 / 229.4 µs alone at 8- / 16-byte vectors against 176.4
    # (docs/kernel-notes.md row 36; 166 registers at 16 bytes)
    V = vector_width(C, x.dtype.size, n, budget=32)
    groups = _groups(T)
    rows = groups if shared else T
    gx, gp, gr = launch(
        PRE_VJP_RES, [x, hp, hr, dh.astype(x.dtype), g.astype(x.dtype), int_params(T, C)],
        [(x.shape, x.dtype), ((rows, n), F32), ((rows, n, n), F32)], groups * TOKEN_THREADS, TOKEN_THREADS,
        [("T", x.dtype), ("N", n), ("V", V), ("SHARED", shared)],
    )
    if shared:
        gp, gr = mx.sum(gp, axis=0), mx.sum(gr, axis=0)
    else:
        gp, gr = gp.reshape(*lead, n), gr.reshape(*lead, n, n)
    return gx, _reduce_to(gp, H_pre), _reduce_to(gr, H_res)


def pre_vjp_coefficients(x, g):
    """dH_pre [T, n] float32 (T = all leading dims) for x [..., n, C] and h's cotangent g [..., C]:
    pre's backward without its dx (per-token coefficients)."""
    *lead, n, C = x.shape
    T = math.prod(lead)
    V = vector_width(C, x.dtype.size, n, budget=64)
    return launch(
        PRE_VJP, [x, standin(F32), g.astype(x.dtype), int_params(T, C)], [((1,), x.dtype), ((T, n), F32)],
        _groups(T) * TOKEN_THREADS, TOKEN_THREADS, [("T", x.dtype), ("N", n), ("V", V), ("SHARED", False), ("DX", False)],
    )[1]


def _reduce_to(g, like):
    """Sum a gradient over the dims `like` was broadcast along; return it in like's dtype/shape."""
    if g.size != like.size:
        if g.ndim < like.ndim:
            g = g.reshape((1,) * (like.ndim - g.ndim) + tuple(g.shape))
        if g.ndim > like.ndim:
            g = mx.sum(g, axis=tuple(range(g.ndim - like.ndim)))
        axes = tuple(i for i, d in enumerate(like.shape) if d == 1 and g.shape[i] != 1)
        if axes:
            g = mx.sum(g, axis=axes, keepdims=True)
    return g.reshape(like.shape).astype(like.dtype)


def post_forward(x, f, H_post, H_res):
    *lead, n, C = x.shape
    T = math.prod(lead)
    hp, hr, shared = _paired_rows(H_post, H_res, tuple(lead), n)
    V = vector_width(C, x.dtype.size, n, budget=64)
    return launch(
        POST, [x, f.astype(x.dtype), hp, hr, int_params(T, C)], [(x.shape, x.dtype)],
        _flat_grid(T, C, V), FLAT_THREADS, [("T", x.dtype), ("N", n), ("V", V), ("SHARED", shared)],
    )[0]


def post_vjp(x, f, H_post, H_res, g, defer: bool = False):
    """(dx, df, dH_post, dH_res) of post; defer (the deferred chain, n <= MAX_N_REDUCE): x's and
    H_res's cotangents left to pre_vjp_res, so dx is g itself and dH_res zeros (PRE_VJP_RES
    computes both from g)."""
    *lead, n, C = x.shape
    T = math.prod(lead)
    hp, hr, shared = _paired_rows(H_post, H_res, tuple(lead), n)
    hgrad = n <= MAX_N_REDUCE
    defer = bool(defer)
    if defer and not hgrad:
        raise ValueError(f"post's deferred backward needs n <= {MAX_N_REDUCE}, got n={n}")
    V = vector_width(C, x.dtype.size, n, budget=32)
    groups = _groups(T)
    rows = (groups if shared else T) if hgrad else 1
    g = g.astype(x.dtype)
    gx, gf, gp, gr = launch(
        POST_VJP, [x, f.astype(x.dtype), hp, hr, g, int_params(T, C)],
        [((1,) if defer else x.shape, x.dtype), (f.shape, x.dtype), ((rows, n), F32), ((rows, n, n), F32)],
        groups * TOKEN_THREADS, TOKEN_THREADS,
        [("T", x.dtype), ("N", n), ("V", V), ("SHARED", shared), ("HGRAD", hgrad), ("DEFER", defer)],
    )
    if defer:
        gx = g  # (gr: zeros, the kernel's sums over the skipped products)
    if hgrad:
        if shared:
            gp, gr = mx.sum(gp, axis=0), mx.sum(gr, axis=0)
        else:
            gp, gr = gp.reshape(*lead, n), gr.reshape(*lead, n, n)
    else:
        # n > 8: the per-token sums over channels as batched matmuls (f32 accumulation).
        # float32-accurate where the GPU would round the matmul to TF32 (compiled/matmul.py)
        gr = matmul.product(g, mx.swapaxes(x, -1, -2))
        gp = mx.sum(g.astype(F32) * f.astype(F32)[..., None, :], axis=-1)
    return gx, gf.astype(f.dtype), _reduce_to(gp, H_post), _reduce_to(gr, H_res)


@mx.custom_function
def _pre(x, H_pre):
    return pre_forward(x, H_pre)


@_pre.vjp
def _pre_vjp(primals, cotangent, output):
    x, H_pre = primals
    return pre_vjp(x, H_pre, cotangent)


@mx.custom_function
def _post(x, f, H_post, H_res):
    return post_forward(x, f, H_post, H_res)


@_post.vjp
def _post_vjp(primals, cotangent, output):
    x, f, H_post, H_res = primals
    return post_vjp(x, f, H_post, H_res, cotangent)


# The chained forms (kernels.CHAIN_X_COTANGENT; HyperConnection takes them): an op
# also outputs its x unchanged (MLX shares the buffer: no copy) and the site's next op reads
# that output instead of x. Autodiff then hands the next op's x cotangent to this op's
# backward as the cotangent of that output, and this op's kernel adds it as it writes its
# own share, instead of MLX adding [T, n, C] arrays (two reads and a write each).
@mx.custom_function
def _pre_chained(x, H_pre):
    return pre_forward(x, H_pre), x


@_pre_chained.vjp
def _pre_chained_vjp(primals, cotangents, outputs):
    x, H_pre = primals
    return pre_vjp(x, H_pre, cotangents[0], gacc=cotangents[1])


# The deferred chain (kernels.DEFER_POST_X; n <= MAX_N_REDUCE): pre also passes H_res through,
# and post reads that H_res' and x'. Post's backward returns its output cotangent g as x''s
# cotangent and zeros as H_res''s; this backward reads g once more and computes both
# (PRE_VJP_RES). By linearity that stays right however often post reads x' and H_res', and a
# post given other arrays (or a caller's own use of H_res') returns true cotangents, which add.
@mx.custom_function
def _pre_chained_res(x, H_pre, H_res):
    return pre_forward(x, H_pre), x, H_res


@_pre_chained_res.vjp
def _pre_chained_res_vjp(primals, cotangents, outputs):
    x, H_pre, H_res = primals
    dh, g, g_res = cotangents
    gx, gp, gr = pre_vjp_res(x, H_pre, H_res, dh, g)
    return gx, gp, gr + g_res.astype(gr.dtype)


@mx.custom_function
def _post_deferred(x, f, H_post, H_res):
    return post_forward(x, f, H_post, H_res)


@_post_deferred.vjp
def _post_deferred_vjp(primals, cotangent, output):
    x, f, H_post, H_res = primals
    return post_vjp(x, f, H_post, H_res, cotangent, defer=True)


def mhc_pre(x, H_pre):
    return _pre(x, H_pre)


def mhc_pre_chained_res(x, H_pre, H_res):
    """(h, x', H_res'): pre's output, and x and H_res passed through for mhc_post_deferred."""
    return _pre_chained_res(x, H_pre, H_res)


def mhc_post_deferred(x_next, f, H_post, H_res_next):
    """Post on the x' and H_res' of mhc_pre_chained_res, its x and H_res cotangents deferred to
    that pre's backward."""
    return _post_deferred(x_next, f, H_post, H_res_next)


def mhc_pre_chained(x, H_pre):
    """(h, x'): pre's output and x passed through, for post to read in place of x."""
    return _pre_chained(x, H_pre)


def _post_call(x, f, H_post, H_res):
    return _post(x, f, H_post, H_res)


def mhc_post(x, f, H_post, H_res):
    if build.compiles_latency(x):
        return build.compiled(_post_call)(x, f, H_post, H_res)
    return _post(x, f, H_post, H_res)


watch(__name__)  # settings assigned later bump build.settings_epoch
