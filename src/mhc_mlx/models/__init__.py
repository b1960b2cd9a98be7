"""Models with mHC residual streams, in mlx-lm style."""

from .mhc_transformer import MHCTransformer, ModelArgs
from .residual import RESIDUAL_MODES, make_site, record_residual_matrices, residual_step

__all__ = [
    "MHCTransformer",
    "ModelArgs",
    "RESIDUAL_MODES",
    "make_site",
    "record_residual_matrices",
    "residual_step",
]
