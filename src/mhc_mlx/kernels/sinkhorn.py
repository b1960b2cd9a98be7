"""Sinkhorn–Knopp kernels: all iterations in one launch, one warp (simdgroup) per matrix.

Batched over any leading dims ([..., n, n], n <= 32). The backward is one launch too: each
warp replays the forward keeping only the sums and scalings, then walks back (prelude.py).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from ..compiled.sinkhorn import _backward as compiled_backward
from .build import KernelSpec, int_params, launch, watch

MAX_N = 32
# The fused backward unrolls n x iters steps with per-step registers; past this it would
# spill heavily, so the backward falls back to the compiled one (the forward stays fused).
MAX_BACKWARD_WORK = 1024
WARPS_PER_GROUP = 4
FORWARD = KernelSpec(
    name="mhc_sinkhorn",
    inputs=("logit", "iparam"),
    outputs=("proj",),
    body=r"""
  const int M = iparam[0];
  const int iters = iparam[1];
  const int lane = KLANE;
  const int mat = KBID * (KNT / 32) + KWARP;
  const bool live = (mat < M) && (lane < N);
  const int64_t base = (int64_t)mat * N * N;
  float col[N];
  KUNROLL for (int i = 0; i < N; ++i) col[i] = live ? logit[base + i * N + lane] : 0.0f;
  ksinkhorn_warp<N>(col, live, iters);
  if (live) {
    KUNROLL for (int i = 0; i < N; ++i) proj[base + i * N + lane] = col[i];
  }
""",
)

BACKWARD = KernelSpec(
    name="mhc_sinkhorn_vjp",
    inputs=("logit", "cot", "iparam"),
    outputs=("glogit",),
    body=r"""
  const int M = iparam[0];
  const int lane = KLANE;
  const int mat = KBID * (KNT / 32) + KWARP;
  const bool live = (mat < M) && (lane < N);
  const int64_t base = (int64_t)mat * N * N;
  float lc[N];
  float g[N];
  KUNROLL for (int i = 0; i < N; ++i) {
    lc[i] = live ? logit[base + i * N + lane] : 0.0f;
    g[i] = live ? cot[base + i * N + lane] : 0.0f;
  }
  ksinkhorn_warp_vjp<N, ITERS>(lc, g, live, lane);
  if (live) {
    KUNROLL for (int i = 0; i < N; ++i) glogit[base + i * N + lane] = g[i];
  }
""",
)


# One thread per matrix (prelude.ksinkhorn_thread_vjp): no warp exchange in the replay or the
# walk back. Used for n <= 4 and n * iters <= THREAD_VJP_MAX_WORK: it keeps 2 * n * iters
# scalings in registers (ptxas, sm_90a: 248 registers at n = 4 and 20 iterations, no spills;
# n = 8 at 10 iterations spills 1.3 KB); 0 keeps the warp form everywhere. Default since it
# passed scripts/gpu_check.py on the H200 (2026-11-29), where 4096 matrices took 38.6 µs
# against the warp form's 129.5 µs (one matrix: 19.0 against 20.3; scripts/gpu_experiments.py).
THREAD_VJP_DEFAULT_WORK = 80  # n = 4 at 20 iterations
THREAD_VJP_MAX_WORK = THREAD_VJP_DEFAULT_WORK
THREADS_PER_GROUP = 32  # one warp per group: 4096 matrices spread over 128 SMs, not 64

BACKWARD_THREAD = KernelSpec(
    name="mhc_sinkhorn_vjp_thread",
    inputs=("logit", "cot", "iparam"),
    outputs=("glogit",),
    body=r"""
  const int M = iparam[0];
  const int mat = KBID * KNT + KTID;
  if (mat >= M) return;
  const int64_t base = (int64_t)mat * N * N;
  float lp[N * N];
  float g[N * N];
  KUNROLL for (int a = 0; a < N * N; ++a) {
    lp[a] = logit[base + a];
    g[a] = cot[base + a];
  }
  ksinkhorn_thread_vjp<N, ITERS>(lp, g);
  KUNROLL for (int a = 0; a < N * N; ++a) glogit[base + a] = g[a];
""",
)


# Where the one-thread backward applies, n^2 lanes per matrix instead, lane a taking column a of
# the Jacobian by forward mode (prelude.ksinkhorn_thread_jvp: no exp inside the iterations, where
# the one-thread walk back takes 2 n^2 per step) and its dot with the cotangent; 56 registers
# against 255. This is the Sinkhorn op's own backward (static sites' coefficients,
# `sinkhorn_knopp`). H200 (2026-11-30, sixth session; scripts/gpu_check.py's sinkhorn checks
# passed with it; gpu_experiments.py sinkhorn-forms, n = 4, 20 iterations): M = 4096 matrices
# 28.8 µs against the one-thread form's 33.6 (warp form 129.9), M = 1 15.5 against 15.2 (launch
# bound). False: the one-thread form.
JACOBIAN_VJP = True
BACKWARD_JACOBIAN = KernelSpec(
    name="mhc_sinkhorn_vjp_jacobian",
    inputs=("logit", "cot", "iparam"),
    outputs=("glogit",),
    body=r"""
  constexpr int NN = N * N;
  const int M = iparam[0];
  const int iters = iparam[1];
  const int64_t gid = (int64_t)KBID * KNT + KTID;
  const int64_t mat = gid / NN;
  const int a = (int)(gid % NN);  // this lane's logit: column a of the Jacobian
  if (mat >= M) return;
  const int64_t base = mat * NN;
  float p[NN];
  float tg[NN];
  KUNROLL for (int b = 0; b < NN; ++b) p[b] = logit[base + b];
  ksinkhorn_jacobian_column<N>(p, tg, a, iters);
  float d = 0.0f;
  KUNROLL for (int b = 0; b < NN; ++b) d += tg[b] * cot[base + b];
  glogit[base + a] = d;
""",
)


def uses_thread_vjp(n: int, iters: int) -> bool:
    return n <= 4 and n * iters <= THREAD_VJP_MAX_WORK


def _grid(M: int) -> tuple[int, int]:
    tg = 32 * WARPS_PER_GROUP
    return -(-M // WARPS_PER_GROUP) * tg, tg


def project(L: mx.array, iters: int) -> mx.array:
    """Forward on float32 logits [M, n, n] -> [M, n, n]."""
    M, n = L.shape[0], L.shape[-1]
    grid, tg = _grid(M)
    return launch(FORWARD, [L, int_params(M, iters)], [(L.shape, mx.float32)], grid, tg, [("N", n)])[0]


def project_vjp(L: mx.array, cot: mx.array, iters: int) -> mx.array:
    """dL for float32 logits [M, n, n] and cotangent [M, n, n] (fused when small enough)."""
    M, n = L.shape[0], L.shape[-1]
    if n * iters > MAX_BACKWARD_WORK:
        return compiled_backward(L, cot, iters)
    if JACOBIAN_VJP and uses_thread_vjp(n, iters):
        tg = THREADS_PER_GROUP * 4
        return launch(BACKWARD_JACOBIAN, [L, cot, int_params(M, iters)], [(L.shape, mx.float32)],
                      -(-M * n * n // tg) * tg, tg, [("N", n)])[0]
    if uses_thread_vjp(n, iters):
        tg = THREADS_PER_GROUP
        return launch(
            BACKWARD_THREAD, [L, cot, int_params(M, iters)], [(L.shape, mx.float32)], -(-M // tg) * tg, tg,
            [("N", n), ("ITERS", iters)],
        )[0]
    grid, tg = _grid(M)
    return launch(
        BACKWARD, [L, cot, int_params(M, iters)], [(L.shape, mx.float32)], grid, tg,
        [("N", n), ("ITERS", iters)],
    )[0]


@lru_cache(maxsize=None)
def _function(iters: int):
    @mx.custom_function
    def sinkhorn(logits):
        n = logits.shape[-1]
        flat = logits.astype(mx.float32).reshape(-1, n, n)
        return project(flat, iters).reshape(logits.shape)

    @sinkhorn.vjp
    def sinkhorn_vjp(logits, cotangent, output):
        n = logits.shape[-1]
        flat = logits.astype(mx.float32).reshape(-1, n, n)
        cot = cotangent.astype(mx.float32).reshape(-1, n, n)
        return project_vjp(flat, cot, iters).reshape(logits.shape).astype(logits.dtype)

    return sinkhorn


def sinkhorn_knopp(logits: mx.array, iters: int = 20) -> mx.array:
    return _function(iters)(logits)


watch(__name__)  # settings assigned later bump build.settings_epoch
