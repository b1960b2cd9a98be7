"""What `mhc-mlx bench` measures: cases (site, pass, shape, dtype, mode) and their floors.

Sites, with stream state x [B, n, C] (B tokens):
- static: the seeds' layer (MHCLayer: Sinkhorn + activations + aggregate + RMSNorm + mix +
  add), the site every seed package offers.
- dynamic: the paper's site (HyperConnection, dynamic=True) with F = identity:
  h, c = site.pre(x); x_next = site.post(x, h, c).
Floors (elements moved per application, times the dtype's bytes):
- static forward 2·B·n·C (read x, write x_next); forward+backward 5·B·n·C (also read the
  output cotangent and x, write dx).
- dynamic forward (4n+2)·C per token (coefficients read x; pre reads x, writes h; post reads
  x and f, writes x_next); forward+backward (7n+2)·C per token (also read the cotangent and
  x, write dx).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mlx.core as mx

from .. import HyperConnection, MHCLayer
from ..dispatch import use_backend
from . import timing

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
PAPER_TOKENS = (320, 512, 1280, 2560)
PAPER_WIDTHS = (1280, 1920, 2560)


@dataclass(frozen=True)
class Case:
    site: str  # "static" | "dynamic"
    pass_: str  # "fwd" | "fwd+bwd"
    shape: tuple[int, int, int]
    dtype: str
    mode: str  # "latency" | "throughput"

    @property
    def id(self) -> str:
        B, n, C = self.shape
        return f"{self.site}/{self.pass_}/{B}x{n}x{C}/{self.dtype}/{self.mode}"

    def floor_bytes(self) -> int:
        B, n, C = self.shape
        size = DTYPES[self.dtype].size
        if self.site == "static":
            elements = (2 if self.pass_ == "fwd" else 5) * B * n * C
        else:
            elements = ((4 * n + 2) if self.pass_ == "fwd" else (7 * n + 2)) * C * B
        return elements * size

    def as_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        d["id"] = self.id
        d["floor_bytes"] = self.floor_bytes()
        return d


def full_cases() -> list[Case]:
    bf = "bfloat16"
    cases = [
        Case("static", "fwd", (1, 4, 512), bf, "latency"),
        Case("dynamic", "fwd", (1, 4, 512), bf, "latency"),
        Case("static", "fwd", (1, 4, 512), "float32", "latency"),
        Case("static", "fwd", (4096, 4, 4096), bf, "throughput"),
        Case("static", "fwd", (4096, 4, 4096), "float32", "throughput"),
        Case("dynamic", "fwd", (4096, 4, 4096), bf, "throughput"),
        Case("static", "fwd+bwd", (4096, 4, 4096), bf, "throughput"),
        Case("dynamic", "fwd+bwd", (4096, 4, 4096), bf, "throughput"),
    ]
    for T in PAPER_TOKENS:
        for C in PAPER_WIDTHS:
            cases.append(Case("static", "fwd", (T, 4, C), bf, "throughput"))
    cases += [
        Case("dynamic", "fwd", (512, 4, 1280), bf, "throughput"),
        Case("static", "fwd+bwd", (512, 4, 1280), bf, "throughput"),
        Case("dynamic", "fwd+bwd", (512, 4, 1280), bf, "throughput"),
        Case("static", "fwd", (512, 8, 1280), bf, "throughput"),
        Case("dynamic", "fwd", (512, 8, 1280), bf, "throughput"),
        Case("static", "fwd", (512, 32, 1280), bf, "throughput"),
        Case("dynamic", "fwd", (512, 32, 1280), bf, "throughput"),
        Case("dynamic", "fwd+bwd", (512, 16, 1280), bf, "throughput"),
        Case("static", "fwd", (1, 32, 2048), bf, "latency"),
    ]
    return cases


def quick_cases() -> list[Case]:
    f32 = "float32"
    return [
        Case("static", "fwd", (1, 4, 64), f32, "latency"),
        Case("dynamic", "fwd", (1, 4, 64), f32, "latency"),
        Case("static", "fwd", (64, 4, 128), f32, "throughput"),
        Case("dynamic", "fwd", (64, 4, 128), f32, "throughput"),
        Case("static", "fwd+bwd", (32, 4, 64), f32, "throughput"),
        Case("dynamic", "fwd+bwd", (16, 4, 64), f32, "throughput"),
    ]


def _site(case: Case):
    """(forward fn of x, parameter names, module) for our library."""
    B, n, C = case.shape
    if case.site == "static":
        module = MHCLayer(n, C)
        return module, ["H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight"], module

    module = HyperConnection(C, n=n, dynamic=True)

    def forward(x):
        h, coeffs = module.pre(x)
        return module.post(x, h, coeffs)

    return forward, ["phi", "alpha", "bias"], module


def prepare(case: Case, count: int, compile_step: bool = False):
    """(apply, inputs): one application of our site for `case` (forward, or forward and
    backward through mx.vjp), and `count` evaluated inputs for it. compile_step: the
    application under one mx.compile, as a user compiles a training step (MLX fuses the
    elementwise ops between kernels there, which it cannot inside mx.grad)."""
    B, n, C = case.shape
    dtype = DTYPES[case.dtype]
    forward, names, module = _site(case)
    xs = [mx.random.normal((B, n, C)).astype(dtype) for _ in range(count)]
    cot = mx.random.normal((B, n, C)).astype(dtype)
    mx.eval(xs, cot, module.parameters())
    params = [getattr(module, nm) for nm in names]

    if case.pass_ == "fwd":
        def apply(x):
            return forward(x)
    else:
        step = vjp_step(forward, names, module)

        def apply(x):
            return step(x, cot, *params)

    if compile_step:
        # the parameters and the cotangent are fixed arrays of the closure (constants of the
        # trace); f's setattr only ever sees the trace's arrays, and the module is not used after
        apply = mx.compile(apply)
    return apply, xs


def vjp_step(forward, names, module):
    """step(x, cot, *params): forward and backward of the site through mx.vjp, the module's
    parameters `names` given as arrays (so a compiled step may take them as inputs)."""
    def step(x, cot, *params):
        def f(x_, *ps):
            for nm, p in zip(names, ps):
                setattr(module, nm, p)
            return forward(x_)

        return mx.vjp(f, [x, *params], [cot])

    return step


STEP = "+step"  # an impl name's suffix: the application compiled as one step (prepare)


def time_ours(case: Case, backend: str, K: int, repeats: int, pipelined: bool = False) -> float | dict:
    """µs per application of our site on `backend` ('kernels', 'compiled' or 'reference', or
    one of them + STEP); for a latency case timing.paired_latency_us's dict (the row beside the
    tiny op, in alternating rounds). pipelined (throughput cases): several evals of K applications
    handed to MLX back to back (timing.pipelined_throughput_us)."""
    if pipelined and case.mode != "throughput":
        raise ValueError(f"pipelined timing is for throughput cases, not {case.id}")
    compile_step = backend.endswith(STEP)
    backend = backend.removesuffix(STEP)
    apply, xs = prepare(case, K if case.mode == "throughput" else 1, compile_step)
    with use_backend(backend):
        if case.mode == "latency":
            return timing.paired_latency_us(apply, [xs[0]], repeats=repeats, rounds=min(5, repeats))
        timer = timing.pipelined_throughput_us if pipelined else timing.throughput_us
        return timer(apply, [[x] for x in xs], repeats=repeats)
