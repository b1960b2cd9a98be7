"""Amax gains of the residual stream (the paper's stability measure, section 5.3 / Fig. 3).

For a residual matrix H ([n, n], or one per token), the forward gain is the largest
absolute row sum (how much a stream can be amplified going up: max_i sum_j |H_ij|) and the
backward gain the largest absolute column sum (the same for gradients coming down). Their
minima show attenuation. The composite gain is that of the product over depth,
H_K ... H_2 H_1 (K sites in network order), per token; doubly stochastic H keep every row
and column sum of the product at 1, unconstrained ones (hc) can drift far from it.
All in float64.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..models.residual import record_residual_matrices

GAIN_KEYS = ("forward_max", "forward_min", "backward_max", "backward_min")


def amax_gains(matrices: np.ndarray) -> dict[str, float]:
    """Max/min absolute row sums (forward) and column sums (backward) over [..., n, n]."""
    a = np.abs(np.asarray(matrices, dtype=np.float64))
    rows, cols = a.sum(axis=-1), a.sum(axis=-2)
    return {
        "forward_max": float(rows.max()),
        "forward_min": float(rows.min()),
        "backward_max": float(cols.max()),
        "backward_min": float(cols.min()),
    }


def composite_products(matrices: list[np.ndarray]) -> list[np.ndarray]:
    """[H_1, H_2 H_1, ..., H_K ... H_1]: the residual map from the input to after each site."""
    products, current = [], None
    for m in matrices:
        m = np.asarray(m, dtype=np.float64)
        current = m if current is None else m @ current
        products.append(current)
    return products


def residual_matrices(model, tokens: mx.array) -> list[np.ndarray]:
    """Every site's H_res on `tokens` (float64, [B, L, n, n] or [n, n] for static sites)."""
    with record_residual_matrices() as recorded:
        mx.eval(model(tokens))
    return [np.array(m.astype(mx.float32), dtype=np.float64) for m in recorded]


def residual_gains(model, tokens: mx.array) -> dict | None:
    """Gains per site, composite over depth, and the composite after each site; None without sites."""
    matrices = residual_matrices(model, tokens)
    if not matrices:
        return None
    products = composite_products(matrices)
    return {
        "sites": [amax_gains(m) for m in matrices],
        "composite": amax_gains(products[-1]),
        "composite_by_depth": [amax_gains(p)["forward_max"] for p in products],
    }
