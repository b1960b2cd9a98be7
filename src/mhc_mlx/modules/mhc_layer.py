"""MHCLayer: the seeds' static mHC layer, F = weighted RMSNorm (SPEC section 1, last paragraph)."""

from __future__ import annotations

import mlx.core as mx

from .. import _checks, dispatch
from . import init as site_init
from .kept import KeepsDecisions

DISPATCH_POLICIES = ("auto", "latency", "throughput")

# Seed (mhc-mlx 0.6.3) knobs that tuned its own Metal heuristics; our dispatcher measures
# and decides itself, so these are refused with a pointer instead of silently ignored.
_RETIRED = (
    "auto_dispatch", "hybrid_latency", "hybrid_min_C", "latency_avoid_fused_n32_max_C",
    "latency_avoid_fused_B1_min_n", "throughput_allow_fused_n32_min_B",
    "throughput_allow_fused_n32_min_C", "throughput_allow_fused_n32_small_C",
    "fused_backward", "mix_kernel",
)


class MHCLayer(KeepsDecisions):
    """out = sinkhorn(H_res_raw) x + 2 sigmoid(H_post_raw) (x) rms_norm(sum_i sigmoid(H_pre_raw)_i x_i).

    Input and output: stream state [..., n, C] (the seeds' [B, n, C]).

    Args:
        n, C: streams and width.
        sinkhorn_iters: Sinkhorn–Knopp iterations.
        eps: RMSNorm epsilon (1e-5, as in the seeds).
        identity_init: True (default) starts function-preserving: with identical streams
            out_i = x + rms_norm(x). False starts from all-zero logits (H_pre = 1/2,
            H_post = 1, H_res = 1/n).
        use_metal: False keeps this layer on the pure-MLX path even where kernels exist.
        threads_per_group: None or a power of two in [32, 1024], a hint for the kernels.
        compile_reference: with use_metal=False, False runs the readable reference instead of
            the compiled path (for debugging).
        dispatch_policy: "auto", "latency" or "throughput", a hint for the kernel dispatcher.
    """

    def __init__(
        self,
        n: int,
        C: int,
        sinkhorn_iters: int = 20,
        eps: float = 1e-5,
        identity_init: bool = True,
        use_metal: bool = True,
        threads_per_group: int | None = 256,
        compile_reference: bool | None = None,
        dispatch_policy: str = "auto",
        **retired,
    ):
        super().__init__()
        for name in retired:
            if name in _RETIRED:
                raise TypeError(
                    f"MHCLayer no longer takes {name!r} (a tuning knob of mhc-mlx 0.6.3's Metal "
                    "heuristics); kernel choice is automatic, see `mhc-mlx info`"
                )
            raise TypeError(f"MHCLayer got an unexpected argument {name!r}")
        self.n = _checks.check_positive_int(n, "n")
        self.C = _checks.check_positive_int(C, "C")
        self.sinkhorn_iters = _checks.check_positive_int(sinkhorn_iters, "sinkhorn_iters")
        self.eps = _checks.check_eps(eps)
        if threads_per_group is not None:
            t = _checks.check_positive_int(threads_per_group, "threads_per_group")
            if t < 32 or t > 1024 or t & (t - 1):
                raise ValueError(f"threads_per_group must be a power of two in [32, 1024], got {t}")
        if dispatch_policy not in DISPATCH_POLICIES:
            raise ValueError(
                f"unknown dispatch_policy {dispatch_policy!r}; choose one of {', '.join(DISPATCH_POLICIES)}"
            )
        self.threads_per_group = threads_per_group
        self.dispatch_policy = dispatch_policy
        self.identity_init = bool(identity_init)
        self.use_metal = bool(use_metal)
        self.compile_reference = compile_reference

        if self.identity_init:
            self.H_pre_raw = mx.full((n,), site_init.identity_pre_logit(n))
            self.H_res_raw = site_init.identity_res_logits(n)
        else:
            self.H_pre_raw = mx.zeros((n,))
            self.H_res_raw = mx.zeros((n, n))
        self.H_post_raw = mx.zeros((n,))
        self.rms_weight = mx.ones((C,))

    def _extra_repr(self) -> str:
        return f"n={self.n}, C={self.C}, sinkhorn_iters={self.sinkhorn_iters}, eps={self.eps}"

    def mixing_matrix(self) -> mx.array:
        """H_res = sinkhorn_knopp(H_res_raw), [n, n]."""
        from ..ops import sinkhorn_knopp

        return sinkhorn_knopp(self.H_res_raw, self.sinkhorn_iters)

    def _implementation(self, x):
        """This layer's op for x, a function of x and the four parameters (dispatch.resolve_layer)."""
        iters, eps = self.sinkhorn_iters, self.eps
        if not self.use_metal:
            path = "compiled" if self.compile_reference in (None, True) else "reference"
            with dispatch.use_backend(dispatch.forced_backend() or path):
                return dispatch.resolve_layer(x, iters, eps)[1]
        return dispatch.resolve_layer(
            x, iters, eps, threads_per_group=self.threads_per_group, policy=self.dispatch_policy
        )[1]

    def __call__(self, x: mx.array) -> mx.array:
        # The checks and the dispatch read only x's shape and dtype and the dispatch state, so
        # their outcome is kept per (shape, dtype, state): at B = 1 they were most of this
        # call's own Python (5 of 8 µs on this project's CPU, scripts/host_overhead.py).
        key = self.signature(x)
        impl = self._kept.get(key)
        if impl is None:
            _checks.check_streams(x, "x", n=self.n, C=self.C)
            impl = self.keep(key, self._implementation(x))
        return impl(x, self["H_pre_raw"], self["H_post_raw"], self["H_res_raw"], self["rms_weight"])
