"""`import mlx_mhc`: everything in mhc_mlx, plus the mlx-mhc 0.4.1 API.

mlx_mhc.sinkhorn_knopp is mlx-mhc's (max_iterations=100, epsilon=1e-6, log_space=True);
mhc_mlx.sinkhorn_knopp(logits, iters=20) is the fixed-iteration form of SPEC section 1.
"""

from mhc_mlx import *  # noqa: F401,F403
from mhc_mlx import __all__ as _core_all
from mhc_mlx import __version__
from mhc_mlx.compat.mlx_mhc import ManifoldHyperConnection, sinkhorn_knopp

__all__ = sorted(set(_core_all) | {"ManifoldHyperConnection", "sinkhorn_knopp"})
