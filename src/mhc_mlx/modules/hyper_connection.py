"""HyperConnection: one mHC site around any sublayer."""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, NamedTuple

import mlx.core as mx

from .. import _checks, dispatch, kernels, ops
from ..compiled.site import hc_coefficients
from . import init as site_init
from .kept import KeepsDecisions

VARIANTS = ("mhc", "hc")


class SiteCoefficients(NamedTuple):
    """What `pre` computed and `post` needs: H_pre [..., n], H_post [..., n], H_res [..., n, n]."""

    pre: mx.array
    post: mx.array
    res: mx.array


class _ChainedCoefficients(SiteCoefficients):
    """SiteCoefficients from a chained read (ops.run_chained_read), with `chain` = (x, x',
    deferred): post reads x' when it is given that same x (deferred: by the post whose backward
    leaves x's and H_res's cotangents to pre's, kernels.DEFER_POST_X)."""


class HyperConnection(KeepsDecisions):
    """x_next = H_res x + H_post (x) sublayer(H_pre x), over stream state x of shape [..., n, dims].

    Args:
        dims: width C of each stream (the model's hidden size).
        n: number of streams.
        dynamic: per-token coefficients from x (parameters phi, alpha, bias); False gives one
            set for all tokens (parameter bias only).
        sinkhorn_iters: Sinkhorn–Knopp iterations for H_res.
        init: "identity" (function-preserving, default) or "paper" (alpha 0.01, bias 0).
        eps: the RMS epsilon of the dynamic coefficients.
        variant: "mhc" (H_res doubly stochastic) or "hc" (H_res unconstrained, the earlier
            hyper-connections, kept for comparison runs).

    Call `hc(x, sublayer)` where sublayer maps [..., dims] -> [..., dims], or, for sublayers
    that need more arguments (masks, caches), the two steps::

        h, coeffs = hc.pre(x)
        x = hc.post(x, attention(h, mask=mask, cache=cache), coeffs)
    """

    def __init__(
        self,
        dims: int,
        n: int = 4,
        dynamic: bool = True,
        sinkhorn_iters: int = 20,
        init: str = "identity",
        eps: float = 1e-6,
        variant: str = "mhc",
    ):
        super().__init__()
        self.dims = _checks.check_positive_int(dims, "dims")
        self.n = _checks.check_positive_int(n, "n")
        self.sinkhorn_iters = _checks.check_positive_int(sinkhorn_iters, "sinkhorn_iters")
        self.eps = _checks.check_eps(eps)
        self.dynamic = bool(dynamic)
        self.init = site_init.check_init(init)
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.variant = variant
        if self.dynamic:
            self.phi = site_init.site_phi(n, dims)
            self.alpha = site_init.site_alpha(init)
        self.bias = site_init.site_bias(n, init, free_res=variant == "hc")

    def _latency_path(self, x) -> tuple:
        """(compiled read, compiled post) for x where its calls take the few-token latency path,
        each None where not; kept per (shape, dtype, dispatch.state()) like MHCLayer's decision,
        since the checks and the choice read nothing else (x's check included: a kept key has
        passed it). scripts/host_overhead.py --stand-in --latency: 15.9 -> 14.8 µs a dynamic site."""
        key = self.signature(x)
        path = self._kept.get(key)
        if path is not None:
            return path
        _checks.check_streams(x, "x", n=self.n, C=self.dims)
        read = post = None
        if dispatch.latency_compiles(x):
            post = dispatch.compiled_latency(ops.run_post)
            if self.variant == "mhc" and kernels.CHAIN_X_COTANGENT != True:  # noqa: E712
                read = dispatch.compiled_latency(_read(self.dynamic, self.sinkhorn_iters, self.eps))
        return self.keep(key, (read, post))

    def _extra_repr(self) -> str:
        return (
            f"dims={self.dims}, n={self.n}, dynamic={self.dynamic}, "
            f"sinkhorn_iters={self.sinkhorn_iters}, init={self.init!r}, variant={self.variant!r}"
        )

    def coefficients(self, x: mx.array) -> SiteCoefficients:
        _checks.check_streams(x, "x", n=self.n, C=self.dims)
        return self._coefficients(x)

    def _coefficients(self, x: mx.array) -> SiteCoefficients:
        # x already checked; the parameters are this module's own (shapes fixed at init)
        phi = self.phi if self.dynamic else None
        alpha = self.alpha if self.dynamic else None
        if self.variant == "hc":
            return SiteCoefficients(*hc_coefficients(x, phi, alpha, self.bias, self.eps))
        return SiteCoefficients(*ops.run_coefficients(x, phi, alpha, self.bias, self.sinkhorn_iters, self.eps))

    def _params(self) -> tuple:
        # item access: nn.Module's attribute fallback costs ~0.4 µs a parameter (B = 1 calls)
        return (self["phi"], self["alpha"], self["bias"]) if self.dynamic else (self["bias"],)

    def pre(self, x: mx.array) -> tuple[mx.array, SiteCoefficients]:
        """Read the streams: returns the sublayer input [..., dims] and the coefficients."""
        read = self._latency_path(x)[0]  # x checked there (or its check's outcome kept)
        if read is not None:
            # a few tokens: this read's dispatch and ops under one mx.compile (no chained read
            # there: "auto" takes it only where the backward takes tensor cores, many tokens)
            h, H = read(x, *self._params())
            return h, SiteCoefficients(*H)
        if self.variant == "mhc":
            read = _read(self.dynamic, self.sinkhorn_iters, self.eps)
            if kernels.CHAIN_X_COTANGENT:
                phi, alpha = (self.phi, self.alpha) if self.dynamic else (None, None)
                chained = ops.run_chained_read(x, phi, alpha, self.bias, self.sinkhorn_iters, self.eps)
                if chained is not None:
                    h, H, x_post, deferred = chained
                    coeffs = _ChainedCoefficients(*H)
                    coeffs.chain = (x, x_post, deferred)
                    return h, coeffs
            h, H = read(x, *self._params())
            return h, SiteCoefficients(*H)
        coeffs = self._coefficients(x)
        return ops.run_pre(x, coeffs.pre), coeffs

    def post(self, x: mx.array, f: mx.array, coeffs: SiteCoefficients) -> mx.array:
        """Mix the streams and write the sublayer output f [..., dims] back: [..., n, dims]."""
        if _deferred_chain(x, coeffs):
            _checks.check_sublayer_output(f, tuple(x.shape[:-2]), self.dims)
            return _post_deferred(coeffs, f)
        x = _streams_for_post(x, coeffs)
        ops.check_post(x, f, coeffs.post, coeffs.res)
        return self._run_post(x, f, coeffs)

    def __call__(self, x: mx.array, sublayer: Callable[[mx.array], mx.array]) -> mx.array:
        h, coeffs = self.pre(x)
        f = sublayer(h)
        # x was checked by pre and coeffs are pre's own: only the sublayer's output needs a look
        _checks.check_sublayer_output(f, tuple(x.shape[:-2]), self.dims)
        if _deferred_chain(x, coeffs):
            return _post_deferred(coeffs, f)
        return self._run_post(_streams_for_post(x, coeffs), f, coeffs)

    def _run_post(self, x: mx.array, f: mx.array, coeffs: SiteCoefficients) -> mx.array:
        """The post op after its checks (a few tokens: its dispatch and op under one mx.compile).
        x's own check: the post checks' (ops.check_post) before, or pre's in __call__."""
        run = self._latency_path(x)[1] or ops.run_post
        return run(x, f, coeffs.post, coeffs.res)


@lru_cache(maxsize=None)
def _read(dynamic: bool, iters: int, eps: float):
    """The read (pre) of an mHC site as a function of x and the parameters, without the
    chained forms: (h, (H_pre, H_post, H_res)); eager, or under dispatch.compiled_latency."""

    def read(x, *params):
        phi, alpha, bias = params if dynamic else (None, None, params[0])
        if kernels.FUSED_READ_STEP and dynamic:
            fused = ops.run_pre_step(x, phi, alpha, bias, iters, eps)
            if fused is not None:
                return fused[0], tuple(fused[1:])
        H = ops.run_coefficients(x, phi, alpha, bias, iters, eps)
        return ops.run_pre(x, H[0]), tuple(H)

    return read


def _streams_for_post(x: mx.array, coeffs: SiteCoefficients) -> mx.array:
    """x' of a chained read when post is given the x that read saw (same values, same buffer),
    else x itself."""
    chain = getattr(coeffs, "chain", None)
    return chain[1] if chain is not None and chain[0] is x else x


def _deferred_chain(x: mx.array, coeffs: SiteCoefficients) -> bool:
    """True when post is given the x of a deferred chained read (kernels.DEFER_POST_X)."""
    chain = getattr(coeffs, "chain", None)
    return chain is not None and chain[0] is x and chain[2]


def _post_deferred(coeffs: SiteCoefficients, f: mx.array) -> mx.array:
    from ..kernels import site

    return site.mhc_post_deferred(coeffs.chain[1], f, coeffs.post, coeffs.res)
