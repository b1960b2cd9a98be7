"""Fused CUDA / Metal kernels (one source per op, shared through a macro layer).

The dispatcher asks `kernel_for(op, ...)` for a kernel that can run the given arrays on the
current device; None means "use the compiled path", and `why_not(op)` says why.
"""

from __future__ import annotations

OPS = ("sinkhorn_knopp", "mhc_coefficients", "mhc_pre", "mhc_post", "rms_norm", "mhc_layer")


def kernel_for(op: str, *arrays, **params):
    """A callable with the op's signature, or None when no kernel can run these arrays here."""
    return None


def why_not(op: str) -> str:
    return "no fused kernels in this build"


def status() -> dict:
    """What `mhc-mlx info` prints about kernels: op -> availability and reason."""
    return {op: {"available": False, "reason": why_not(op)} for op in OPS}
