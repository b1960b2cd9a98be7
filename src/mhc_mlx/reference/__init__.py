"""The readable reference: SPEC section 1 in plain MLX ops, float32 math.

This is the source of truth for every faster path (compiled, CUDA and Metal kernels). It is
written to be checked by eye against the paper, not to be fast, and it is never removed.
"""

from .sinkhorn import sinkhorn_knopp
from .site import coefficient_scale, mhc_coefficients, mhc_layer, mhc_post, mhc_pre, rms_norm

__all__ = [
    "sinkhorn_knopp",
    "coefficient_scale",
    "mhc_coefficients",
    "mhc_pre",
    "mhc_post",
    "rms_norm",
    "mhc_layer",
]
