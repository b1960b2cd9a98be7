"""The mlx-mhc 0.4.1 API (`import mlx_mhc`), with mHC's semantics.

mlx-mhc 0.4.1 split the hidden vector into `expansion` chunks and mixed those; SPEC section 1
keeps n full-width streams instead. What stays is the call shape, documented per function.
"""

from __future__ import annotations

import mlx.core as mx

from .. import _checks, ops
from ..modules.hyper_connection import HyperConnection


def _sinkhorn_log(L, max_iterations, epsilon):
    # Row then column normalisation in log space (as mlx-mhc did). Instead of its host-synced
    # early exit, a converged matrix is frozen by a mask, so the result is the same and
    # nothing waits on the device; logits in the thousands stay finite because nothing is
    # exponentiated before normalisation.
    done = mx.zeros(L.shape[:-2] + (1, 1), dtype=mx.bool_)
    for _ in range(max_iterations):
        step = L - mx.logsumexp(L, axis=-1, keepdims=True)
        step = step - mx.logsumexp(step, axis=-2, keepdims=True)
        L = mx.where(done, L, step)
        P = mx.exp(L)
        err = mx.maximum(
            mx.max(mx.abs(mx.sum(P, axis=-1) - 1.0), axis=-1),
            mx.max(mx.abs(mx.sum(P, axis=-2) - 1.0), axis=-1),
        )
        done = mx.logical_or(done, (err < epsilon)[..., None, None])
    return mx.exp(L)


def _sinkhorn_direct(L, max_iterations, epsilon):
    P = mx.exp(L - mx.max(L, axis=(-2, -1), keepdims=True))
    done = mx.zeros(L.shape[:-2] + (1, 1), dtype=mx.bool_)
    for _ in range(max_iterations):
        step = P / mx.maximum(mx.sum(P, axis=-1, keepdims=True), 1e-30)
        step = step / mx.maximum(mx.sum(step, axis=-2, keepdims=True), 1e-30)
        P = mx.where(done, P, step)
        err = mx.maximum(
            mx.max(mx.abs(mx.sum(P, axis=-1) - 1.0), axis=-1),
            mx.max(mx.abs(mx.sum(P, axis=-2) - 1.0), axis=-1),
        )
        done = mx.logical_or(done, (err < epsilon)[..., None, None])
    return P


def sinkhorn_knopp(
    matrix: mx.array, max_iterations: int = 100, epsilon: float = 1e-6, log_space: bool = True
) -> mx.array:
    """mlx-mhc's Sinkhorn–Knopp: [..., n, n] scores -> doubly stochastic, float32.

    Alternates row then column normalisation of exp(matrix) until both row and column sums
    are within `epsilon` of 1, at most `max_iterations` times (columns exact at the end).
    log_space=True works on log-probabilities throughout (finite for scores of any finite
    size); False scales exp(matrix - max) directly, clamping sums at 1e-30.
    """
    _checks.check_float(matrix, "matrix")
    if matrix.ndim < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"matrix must be square [..., n, n], got {tuple(matrix.shape)}")
    max_iterations = _checks.check_positive_int(max_iterations, "max_iterations")
    epsilon = _checks.check_eps(epsilon, "epsilon")
    L = matrix.astype(mx.float32)
    return (_sinkhorn_log if log_space else _sinkhorn_direct)(L, max_iterations, epsilon)


class ManifoldHyperConnection(HyperConnection):
    """mlx-mhc's module: a static mHC site with n = `expansion` full-width streams.

    `mhc(x, layer_output)` computes, with H_pre, H_post, H_res from the site's `bias`:

    - x a hidden state [..., dims] and layer_output [..., dims] (mlx-mhc's usage, the layer
      already applied to x): the site's single-stream form,
      reduce_streams(H_res expand_streams(x) + H_post (x) layer_output)
      = x + mean(H_post) * layer_output, because H_res's rows sum to 1. At init that is exactly
      x + layer_output, the plain residual it replaces.
    - x stream state [..., expansion, dims] and layer_output [..., dims]: the full site write,
      H_res x + H_post (x) layer_output -> [..., expansion, dims], where the layer should have
      been applied to `pre_scale(x)`.

    The two are told apart by layer_output's rank, never guessed. Parameters start at the
    function-preserving identity init (mlx-mhc drew H_res at random).
    """

    def __init__(self, dims: int, expansion: int = 2, sinkhorn_iterations: int = 10):
        # checked here so the errors use this API's argument names, not HyperConnection's
        expansion = _checks.check_positive_int(expansion, "expansion")
        sinkhorn_iterations = _checks.check_positive_int(sinkhorn_iterations, "sinkhorn_iterations")
        super().__init__(dims, n=expansion, dynamic=False, sinkhorn_iters=sinkhorn_iterations)
        self.expansion = expansion

    def pre_scale(self, x: mx.array) -> mx.array:
        """Stream state [..., expansion, dims] -> the layer input [..., dims] (H_pre x)."""
        return self.pre(x)[0]

    def post_combine(self, x: mx.array, layer_output: mx.array) -> mx.array:
        return self(x, layer_output)

    def __call__(self, x: mx.array, layer_output: mx.array) -> mx.array:
        _checks.check_float(x, "x")
        _checks.check_float(layer_output, "layer_output")
        if tuple(layer_output.shape) == tuple(x.shape):
            if x.shape[-1] != self.dims:
                raise ValueError(f"x must be [..., {self.dims}], got {tuple(x.shape)}")
            streams = ops.expand_streams(x, self.n)
            return ops.reduce_streams(self.post(streams, layer_output, self.coefficients(streams)))
        if tuple(x.shape) == tuple(layer_output.shape[:-1]) + (self.n, self.dims):
            return self.post(x, layer_output, self.coefficients(x))
        raise ValueError(
            f"layer_output {tuple(layer_output.shape)} fits neither a hidden state x of the same "
            f"shape nor stream state [..., {self.n}, {self.dims}]; got x {tuple(x.shape)}"
        )
