"""Truncated normal initialisation with a true standard deviation (JAX / flax semantics).

The original (models/common.py) notes that torch's trunc_normal_ does not give the requested
std; like JAX it draws a standard normal truncated to [lower, upper] and rescales it so the
*result* has standard deviation `std`.
"""

from __future__ import annotations

import math

import mlx.core as mx


def truncated_normal_std(lower: float = -2.0, upper: float = 2.0) -> float:
    """Standard deviation of a standard normal truncated to [lower, upper]."""
    z = 0.5 * (math.erf(upper / math.sqrt(2)) - math.erf(lower / math.sqrt(2)))
    c = 1.0 / math.sqrt(2 * math.pi)
    pdf_lower = c * math.exp(-0.5 * lower**2)
    pdf_upper = c * math.exp(-0.5 * upper**2)
    variance = 1 - (upper * pdf_upper - lower * pdf_lower) / z - ((pdf_lower - pdf_upper) / z) ** 2
    return math.sqrt(variance)


def trunc_normal(
    shape: tuple[int, ...],
    std: float = 1.0,
    lower: float = -2.0,
    upper: float = 2.0,
    dtype: mx.Dtype = mx.float32,
) -> mx.array:
    """Samples with mean 0 and standard deviation `std`, cut at lower/upper *underlying* sigmas.

    std == 0 gives zeros (the original's puzzle embedding starts at zero).
    """
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    if std == 0:
        return mx.zeros(shape, dtype=dtype)
    scale = std / truncated_normal_std(lower, upper)
    return (scale * mx.random.truncated_normal(lower, upper, shape)).astype(dtype)
