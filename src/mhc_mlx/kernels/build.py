"""Kernel specs, the cached kernel factory and the launcher.

A KernelSpec is one kernel body (backend-neutral, written in the K* macros of prelude.py)
with its input and output names. `compiled_kernel(spec, backend)` wraps it in
mx.fast.cuda_kernel or mx.fast.metal_kernel once per process (lru_cache): the hot call
never builds a kernel object, and MLX caches the compiled binary per template instance.
"""

from __future__ import annotations

import os
import struct
import sys
import types
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx

from . import prelude

ENV_DISABLE_METAL = "MHC_MLX_DISABLE_METAL"
# Checks set this to NaN: MLX then fills every output before the kernel runs, so an element
# a kernel forgot to write shows up as NaN instead of as stale memory.
_poison: list[float | None] = [None]


def poison_outputs(value: float | None) -> None:
    """Fill kernel outputs with `value` before each launch (None: leave them unfilled)."""
    _poison[0] = value
    bump_settings()


# The settings epoch: a count bumped whenever an attribute of a watched module is assigned (the
# kernels' modules, the dispatcher's: their settings, and what tests stand in), so hot paths keep
# what they derive from those settings (a dispatch decision, a trace key) until one changes,
# instead of reading a score of module attributes on every call.
_epoch = [0]


class _WatchedModule(types.ModuleType):
    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        _epoch[0] += 1

    def __delattr__(self, name):
        super().__delattr__(name)
        _epoch[0] += 1


def watch(module_name: str) -> None:
    """Bump the settings epoch on every attribute assignment to this module from now on."""
    sys.modules[module_name].__class__ = _WatchedModule


def settings_epoch() -> int:
    return _epoch[0]


def bump_settings() -> None:
    """A setting held outside module attributes changed (the poison value, a Metal check's result)."""
    _epoch[0] += 1


# The latency paths (a few tokens: the static layer's single launch, the dynamic read step, post)
# run under mx.compile, cached per setting: a call then replays the recorded launches instead of
# running this package's Python (custom functions, the launches' arguments), which was most of a
# B = 1 call's graph building. The parameters are inputs of the compiled functions, never their
# constants, so updated parameters are used. H200 (2026-11-30, eighth session,
# gpu_experiments.py b1-sync, build + eval, medians of 5 alternated runs): the static layer
# function at 1 x 4 x 512 bf16 38.8 µs compiled against 56.1 eager, the dynamic site's pre +
# post 90.5 against 178.8. Only on a GPU: on the CPU no kernel runs, and the test emulator
# evaluates each launch at once, which no trace allows. False: eager.
COMPILE_LATENCY = True
LATENCY_COMPILE_TOKENS = 16  # up to this many tokens


@lru_cache(maxsize=None)
def gpu_present() -> bool:
    """Whether this MLX has a GPU device (the real one, whatever a test stands in)."""
    return bool(mx.is_available(mx.gpu))


def tokens(x) -> int:
    """Tokens of a stream state x [..., n, C]."""
    return x.size // (x.shape[-2] * x.shape[-1]) if x.size else 0


def compiles_latency(x) -> bool:
    """Whether a call on stream state x [..., n, C] takes its op's compiled latency path."""
    return COMPILE_LATENCY and tokens(x) <= LATENCY_COMPILE_TOKENS and gpu_present()


@lru_cache(maxsize=256)
def compiled_for(fn, key):
    """fn under mx.compile, one per (fn, key): `key` holds everything fn's trace reads besides its
    arrays (a trace is reused for every call of the same input shapes and dtypes). Each key
    compiles a function object of its own: MLX keys its traces by the compiled function's
    identity, so two mx.compile wrappers of one function share (and replay) one trace."""

    def traced(*arrays):
        return fn(*arrays)

    return mx.compile(traced)


def compiled(fn, *key):
    """compiled_for(fn, ...) keyed by `key`, the default device (a trace's launches are bound to
    the stream it was traced on) and the settings epoch, which every setting a trace reads moves
    when assigned (the poison value too): a setting assigned after a trace was made takes a new
    one (2026-11-30: ONE_LAUNCH_SMALL switched on was not seen by a trace keyed on named settings
    only)."""
    return compiled_for(fn, (key, str(mx.default_device()), _epoch[0]))


@dataclass(frozen=True)
class KernelSpec:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    body: str
    helpers: str = ""  # device functions for this kernel only (K* macros, no thread attributes)
    # inputs the kernel writes into as scratch (counters its caller zeroes per call, never read
    # afterwards): MLX declares every input const, so such a kernel casts it; the CPU emulator's
    # check that no input is written skips these
    scratch: tuple[str, ...] = ()
    # bytes of dynamic shared memory a launch requests (CUDA only: a body declaring `extern
    # __shared__` storage past the 48 KB of static shared memory a threadgroup may hold); 0: none
    shared_memory: int = 0

    def source(self) -> str:
        return self.body + prelude.ATTRIBUTES_NOTE

    def header(self, backend: str) -> str:
        """The header MLX compiles this kernel with: the backend's macros, the shared device code
        this kernel names (prelude.common_for) and its helpers, without comment lines (with
        FULL_HEADERS: all of the shared code, comments included, as before 2026-11-29)."""
        if FULL_HEADERS:
            return prelude.header(backend) + self.helpers
        return prelude.compact(prelude.header(backend, self.helpers + self.source()) + self.helpers)


def edited(body: str, edits) -> str:
    """A kernel body with each (old, new) text replaced; each old must occur exactly once, so a
    variant derived from a checked kernel breaks loudly if that kernel's text changes."""
    for old, new in edits:
        if body.count(old) != 1:
            raise ValueError(f"kernel text to edit occurs {body.count(old)} times, not once: {old!r}")
        body = body.replace(old, new)
    return body


def metal_disabled() -> bool:
    """MHC_MLX_DISABLE_METAL set to anything but empty, 0 or false."""
    return os.environ.get(ENV_DISABLE_METAL, "0").strip() not in ("", "0", "false", "False")


def _cuda_available() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


def gpu_backend() -> str | None:
    """'cuda' or 'metal' when this MLX has that GPU backend, else None (CPU only)."""
    if _cuda_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


def device_name() -> str:
    """The default device's name as MLX reports it (e.g. 'NVIDIA H200'; '' when it has none)."""
    try:
        return str(mx.device_info().get("device_name", ""))
    except Exception:  # noqa: BLE001 -- older MLX, or a device that reports nothing
        return ""


def on_gpu(*arrays) -> bool:
    """Kernels run on the GPU stream only: the default device must be the GPU."""
    return mx.default_device() == mx.gpu


# True: every kernel's header holds the whole shared prelude with its comments (15-19 KB), as
# before the headers were trimmed; scripts/gpu_experiments.py times both (MLX hashes the whole
# source on every launch).
FULL_HEADERS = False


def compiled_kernel(spec: KernelSpec, backend: str):
    """The MLX custom-kernel object for `spec` on `backend` ('cuda' or 'metal'), built once."""
    return _compiled_kernel(spec, backend, FULL_HEADERS)


@lru_cache(maxsize=None)
def _compiled_kernel(spec: KernelSpec, backend: str, full_headers: bool):
    if backend == "cuda":
        extra = {"shared_memory": spec.shared_memory} if spec.shared_memory else {}
        return mx.fast.cuda_kernel(
            name=spec.name,
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            source=spec.source(),
            header=spec.header("cuda"),
            **extra,
        )
    if spec.shared_memory:
        raise ValueError(f"kernel {spec.name} asks for dynamic shared memory, which only its CUDA form has")
    if backend == "metal":
        return mx.fast.metal_kernel(
            name=spec.name,
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            source=spec.source(),
            header=spec.header("metal"),
        )
    raise ValueError(f"unknown kernel backend {backend!r}")


def launch(spec: KernelSpec, inputs, outputs, grid: int, threadgroup: int, template, backend=None):
    """Run `spec` over `grid` threads (a multiple of `threadgroup`) and return its outputs.

    outputs: [(shape, dtype), ...] in the order of spec.outputs. template: [(name, value)].
    """
    if grid % threadgroup:
        raise ValueError(f"grid {grid} is not a multiple of the threadgroup {threadgroup}")
    if grid == 0:  # nothing to compute (no tokens): empty or zero outputs, no launch
        return [mx.zeros(tuple(s), d) for s, d in outputs]
    backend = backend or gpu_backend()
    kernel = compiled_kernel(spec, backend)
    return kernel(
        inputs=list(inputs),
        template=list(template),
        grid=(grid, 1, 1),
        threadgroup=(threadgroup, 1, 1),
        output_shapes=[tuple(s) for s, _ in outputs],
        output_dtypes=[d for _, d in outputs],
        init_value=_poison[0],
    )


# The run-time parameter arrays in GPU memory (CUDA). MLX's CUDA allocator puts an array made on
# the host in managed (unified) memory, and any array of <= 8 bytes (float_params(eps)) in one
# shared managed pool that host-made scalars (every Python number in an MLX op) are written into;
# a kernel reading such a page after the host wrote it waits for a page migration. With
# DEVICE_PARAMS each parameter array is padded to PARAMS_PAD elements (out of that pool) and copied
# once by a GPU op, whose output MLX allocates in device memory. H200, seventh session: the B = 1
# layer kernel's eval 30.0 against 44.1 µs in one process, 36.2 against 36.3 in the next (row 45).
# Eighteenth session (rows 93-94): under Nsight Compute each small kernel of the dynamic fwd+bwd took
# 3.3-12.7 µs with it against 11-34 without (the fragment packs 20-22 µs -> 3.3-5.2), the 18
# kernels 626.2 µs against 781.0 and 794.9; the bench's dynamic fwd+bwd 641.4 / 648.8 µs against
# 713.0 / 698.1 in alternated pinned processes. Default since; Metal (unified memory, no
# migration) keeps host-made arrays. False: host-made arrays everywhere.
DEVICE_PARAMS = True
PARAMS_PAD = 64


def float_bits(value: float) -> int:
    """value as float32, its bits as a (signed) int: a template constant a body reads back with
    KBITS_FLOAT, where a parameter array would be one more load to wait for."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def int_params(*values: int) -> mx.array:
    """Run-time integers for a body (read as p[0], p[1], ...: the same on CUDA and Metal).

    Cached: the same small array is reused, so a hot call makes no new host->device copy.
    """
    return _params(mx.int32, values, DEVICE_PARAMS)


def float_params(*values: float) -> mx.array:
    return _params(mx.float32, values, DEVICE_PARAMS)


def standin(dtype) -> mx.array:
    """A one-element array of `dtype` for an input a kernel's template flags leave unread: made
    once from host data (no op: an `mx.zeros` made per call was one more launch, `copy_s`, in every
    dynamic backward)."""
    return _params(dtype, (0,), False)


@lru_cache(maxsize=4096)
def _params(dtype, values: tuple, device: bool) -> mx.array:
    if not device or not _cuda_available():  # the real CUDA GPU, whatever a test stands in
        return mx.array(list(values), dtype=dtype)
    padded = mx.array(list(values) + [0] * max(0, PARAMS_PAD - len(values)), dtype=dtype)
    # a GPU op's output is allocated in device memory; evaluated now (its inputs are constants,
    # which MLX allows inside compile and grad traces), so later launches only read it
    resident = mx.multiply(padded, mx.array(1, dtype=dtype), stream=mx.gpu)
    mx.eval(resident)
    return resident


_CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
               mx.int32: "int32_t", mx.uint32: "uint32_t"}


def render_cuda(spec: KernelSpec, input_dtypes, output_dtypes, template) -> str:
    """The CUDA translation unit MLX generates for this spec (for offline nvcc checks).

    Mirrors mlx/backend/cuda/custom_kernel.cpp (build_kernel) for bodies that use no
    `<name>_shape/_strides/_ndim`, which ours never do.
    """
    lines = ['#include "mlx/backend/cuda/device/utils.cuh"', "#include <cooperative_groups.h>",
             spec.header("cuda"), "namespace mlx::core::cu {", "namespace cg = cooperative_groups;"]
    params = [f"    const {_CUDA_TYPES[d]}* {n}" for n, d in zip(spec.inputs, input_dtypes)]
    params += [f"    {_CUDA_TYPES[d]}* {n}" for n, d in zip(spec.outputs, output_dtypes)]
    lines.append(f"__global__ void custom_kernel_{spec.name}(\n" + ",\n".join(params) + ") {")
    for name, value in template:
        if isinstance(value, bool):
            lines.append(f"  constexpr bool {name} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            lines.append(f"  constexpr int {name} = {value};")
        else:
            lines.append(f"  using {name} = {_CUDA_TYPES[value]};")
    lines += [spec.source(), "}", "} // namespace mlx::core::cu"]
    return "\n".join(lines)


watch(__name__)
