"""The fast path for machines without custom kernels: the reference written for speed.

Matmuls instead of broadcast-and-sum (no temporaries of size [..., n, n, C]), Sinkhorn with an
exact hand-written backward, and every op wrapped in mx.compile (on CPU that JIT-builds C++).
"""

from .sinkhorn import sinkhorn_knopp
from .site import mhc_coefficients, mhc_layer, mhc_post, mhc_pre, rms_norm

__all__ = ["sinkhorn_knopp", "mhc_coefficients", "mhc_pre", "mhc_post", "rms_norm", "mhc_layer"]
