"""`mhc-mlx train`: baseline, hc and mhc side by side, with a stability dashboard."""

from .config import TrainConfig
from .data import ByteTokenizer, SyntheticLanguage, TextFile
from .metrics import amax_gains, composite_products, residual_gains
from .runner import RunOptions, resolve, train

__all__ = [
    "TrainConfig",
    "RunOptions",
    "resolve",
    "train",
    "SyntheticLanguage",
    "TextFile",
    "ByteTokenizer",
    "amax_gains",
    "composite_products",
    "residual_gains",
]
