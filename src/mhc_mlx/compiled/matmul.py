"""Float32 matmuls that stay float32-exact where MLX runs them as TF32, forward and backward.

MLX's CUDA backend (and Apple M5) runs float32 matmuls in TF32 unless MLX_ENABLE_TF32=0: each
factor keeps 10 mantissa bits, ~1e-3 relative error, against SPEC's float32 coefficient
math. A float32 factor is split into a bfloat16-exact high part (exact in TF32) and the rest;
the products of the parts bring the error back to ~1e-6. A factor that was cast up from
bfloat16 or float16 is already exact in TF32 (at most 10 mantissa bits, and TF32 has float32's
exponent range), so it is not split: x @ phi for 16-bit x is one GEMM over [phi_hi | phi_lo],
reading x once. The backward splits the same way: autodiff through the split would run the
cotangent products in plain TF32.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

import mlx.core as mx

F32 = mx.float32
EXACT_IN_TF32 = (mx.bfloat16, mx.float16)
_mm = mx.matmul  # the product of the parts; tests put an emulated TF32 matmul here


@lru_cache(maxsize=None)
def _gpu_rounds_fp32_matmul() -> bool:
    """Whether this machine's GPU runs float32 matmuls with TF32-like inputs when MLX may.

    CUDA: yes (cuBLAS TF32 on Ampere and later). Metal: only with the neural accelerators of
    Apple GPU generation 17+ (18+ for the 'p' variants; mlx/backend/metal/device.cpp
    is_nax_available); earlier Macs multiply in full float32 and need no split. An
    architecture string we cannot read counts as yes: splitting is always exact, only slower.
    """
    from ..kernels.build import gpu_backend

    backend = gpu_backend()
    if backend == "cuda":
        return True
    if backend != "metal":
        return False
    try:
        arch = str(mx.device_info().get("architecture", ""))
    except Exception:  # noqa: BLE001 -- unknown: be exact
        return True
    found = re.search(r"g(\d+)([a-z]?)$", arch)
    if not found:
        return True
    return int(found.group(1)) >= (18 if found.group(2) == "p" else 17)


def needs_split() -> bool:
    """True when float32 matmuls on the current device must be split to stay float32-exact."""
    if mx.default_device() != mx.gpu or os.environ.get("MLX_ENABLE_TF32", "1").strip() == "0":
        return False
    return _gpu_rounds_fp32_matmul()


def _parts(a: mx.array) -> tuple[mx.array, mx.array]:
    hi = a.astype(mx.bfloat16).astype(F32)
    return hi, a - hi


def split_product(a: mx.array, b: mx.array, a_exact: bool = False, b_exact: bool = False) -> mx.array:
    """a @ b (float32, broadcast batch dims) to ~1e-6 relative under TF32.

    a_exact / b_exact: that factor's values are representable in TF32 (cast from 16 bits).
    """
    if a_exact and b_exact:
        return _mm(a, b)
    if a_exact:
        n = b.shape[-1]
        both = _mm(a, mx.concatenate(_parts(b), axis=-1))
        return both[..., :n] + both[..., n:]
    if b_exact:
        m = a.shape[-2]
        both = _mm(mx.concatenate(_parts(a), axis=-2), b)
        return both[..., :m, :] + both[..., m:, :]
    a_hi, a_lo = _parts(a)
    b_hi, b_lo = _parts(b)
    return _mm(a_hi, b_hi) + (_mm(a_hi, b_lo) + _mm(a_lo, b_hi)) + _mm(a_lo, b_lo)


def _unbroadcast(g: mx.array, shape: tuple[int, ...]) -> mx.array:
    """Sum g over the dims that were broadcast to reach g's shape from `shape`."""
    if g.ndim > len(shape):
        g = mx.sum(g, axis=tuple(range(g.ndim - len(shape))))
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and g.shape[i] != 1)
    if axes:
        g = mx.sum(g, axis=axes, keepdims=True)
    return g


def product(a: mx.array, b: mx.array) -> mx.array:
    """float32 a @ b of a and b in their own dtypes, split only where this device needs it.

    No backward of its own: for use inside a function that defines its vjp (kernel wrappers).
    """
    af, bf = a.astype(F32), b.astype(F32)
    if not needs_split():
        return af @ bf
    return split_product(af, bf, a.dtype in EXACT_IN_TF32, b.dtype in EXACT_IN_TF32)


@lru_cache(maxsize=None)
def exact_matmul(a_exact: bool, b_exact: bool):
    """A float32 matmul (a [..., M, K] @ b [..., K, N]) exact under TF32, with a split backward."""

    @mx.custom_function
    def matmul(a, b):
        return split_product(a, b, a_exact, b_exact)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        a, b = primals
        g = cotangent.astype(F32)
        ga = split_product(g, mx.swapaxes(b, -1, -2), False, b_exact)
        gb = split_product(mx.swapaxes(a, -1, -2), g, a_exact, False)
        return _unbroadcast(ga, a.shape).astype(a.dtype), _unbroadcast(gb, b.shape).astype(b.dtype)

    return matmul
