"""mhc-mlx: Manifold-Constrained Hyper-Connections (mHC, arXiv 2512.24880) for MLX.

    import mhc_mlx as mhc
    x = mhc.expand_streams(h, n=4)                 # [..., C] -> [..., 4, C]
    site = mhc.HyperConnection(dims=C, n=4)
    x = site(x, mlp)                               # x_next = H_res x + H_post (x) mlp(H_pre x)
    h = mhc.reduce_streams(x)                      # [..., 4, C] -> [..., C]
"""

from ._version import __version__
from .dispatch import use_backend
from .modules import HyperConnection, MHCLayer, MHCRewire, SiteCoefficients
from .patch import AutoPatcher
from .ops import (
    expand_streams,
    mhc_coefficients,
    mhc_post,
    mhc_pre,
    reduce_streams,
    rms_norm,
    sinkhorn_knopp,
)

__all__ = [
    "__version__",
    "sinkhorn_knopp",
    "mhc_coefficients",
    "mhc_pre",
    "mhc_post",
    "expand_streams",
    "reduce_streams",
    "rms_norm",
    "HyperConnection",
    "SiteCoefficients",
    "MHCLayer",
    "MHCRewire",
    "AutoPatcher",
    "use_backend",
]
