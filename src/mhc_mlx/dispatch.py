"""One dispatch point per op: kernels where they can run, else the compiled path.

The choice can be forced for the whole process with MHC_MLX_BACKEND=reference|compiled|kernels
(read at each call, so tests and benchmarks can change it), or for a block of code with
`use_backend(...)`. MHC_MLX_DISABLE_METAL=1 (the seed's switch) keeps Metal kernels off.
"""

from __future__ import annotations

import contextlib
import os
import threading
from functools import partial

import mlx.core as mx

from . import compiled, kernels, reference
from .kernels import build

BACKENDS = ("reference", "compiled", "kernels")
ENV_BACKEND = "MHC_MLX_BACKEND"
ENV_DISABLE_METAL = "MHC_MLX_DISABLE_METAL"

_PATHS = {"reference": reference, "compiled": compiled}


class _Forced(threading.local):
    # the class attribute is each thread's default: reading it takes no AttributeError path
    # (getattr(local, "name", None) on an unset name cost ~0.35 µs, state() reads it per call)
    name: str | None = None


_forced = _Forced()

# os.environ's own dict on POSIX CPython (bytes to bytes): a lookup there skips os.environ.get's
# re-encoding of key and value, a tenth of its ~0.5 µs, on every call of the few-token paths.
# os.environ's assignments (and so pytest's monkeypatch.setenv) update it; elsewhere: None.
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_ENVIRON_BYTES, dict):
    _ENVIRON_BYTES = None
_ENV_KEYS = {name: name.encode() for name in (ENV_BACKEND, ENV_DISABLE_METAL)}


def _raw_env(name: str):
    """os.environ.get(name), as the bytes it holds on POSIX (a key for state())."""
    if _ENVIRON_BYTES is None:
        return os.environ.get(name)
    return _ENVIRON_BYTES.get(_ENV_KEYS.get(name) or name.encode())


def _env(name: str) -> str | None:
    """os.environ.get(name)."""
    value = _raw_env(name)
    return value if value is None or isinstance(value, str) else os.fsdecode(value)


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} in {where}; choose one of {', '.join(BACKENDS)}")
    return name


def forced_backend() -> str | None:
    """The backend forced by use_backend() or MHC_MLX_BACKEND, or None for automatic choice."""
    name = _forced.name
    if name is not None:
        return name
    env = _env(ENV_BACKEND)
    if not env:
        return None
    env = env.strip().lower()
    if not env or env == "auto":
        return None
    return _check_name(env, f"environment variable {ENV_BACKEND}")


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend inside a `with` block (None: automatic). Thread-local."""
    if name is not None:
        _check_name(name, "use_backend()")
    previous = _forced.name
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


def metal_disabled() -> bool:
    return build.metal_disabled()


def choose(op: str, *arrays, **params) -> tuple[str, object]:
    """(backend name, implementation) for one call of `op` on these arrays."""
    name = forced_backend()
    if name in _PATHS:
        return name, getattr(_PATHS[name], op)
    kernel = kernels.kernel_for(op, *arrays, **params)
    if kernel is not None:
        return "kernels", kernel
    if name == "kernels":
        raise RuntimeError(
            f"{ENV_BACKEND}=kernels was asked for, but no kernel can run '{op}' here: "
            f"{kernels.why_not(op)}. Unset it to use the compiled path."
        )
    return "compiled", getattr(compiled, op)


def resolve_layer(x, iters: int, eps: float, **params) -> tuple[str, object]:
    """(backend name, fn) for mhc_layer on stream state x, fn a function of (x, H_pre_raw,
    H_post_raw, H_res_raw, rms_weight) with iters, eps and every per-call decision bound: what a
    module may keep while x's shape and dtype and state() stay the same."""
    name, impl = choose("mhc_layer", x, **params)
    if name == "kernels":
        return name, kernels.resolve_layer(x, iters, eps, params.get("threads_per_group"),
                                           params.get("policy", "auto"))
    return name, partial(impl, iters=iters, eps=eps)


def explain(op: str) -> str:
    """One line for `mhc-mlx info`: which path `op` takes by default here and why."""
    name = forced_backend()
    if name in _PATHS:
        return f"{name} (forced by {ENV_BACKEND} / use_backend)"
    reason = kernels.why_not(op)
    if not reason:
        return f"kernels ({kernels.status()[op]['reason']}; {kernels.LIMITS_NOTE})"
    return f"compiled (kernels unavailable: {reason})"


def state() -> tuple:
    """Everything a dispatch decision or a latency path's trace reads besides the arrays' shapes
    and dtypes: the forced backend (use_backend's), the environment (raw), the default device (a
    trace's launches are bound to its stream; a Device hashes by identity, so its name), and the
    settings epoch (any assignment to a kernel or dispatch module attribute, a Metal first-use
    result) in place of the settings themselves. A module may keep its decision for a shape and
    dtype, and a trace is reused, while this stays equal."""
    return (_forced.name, _raw_env(ENV_BACKEND), _raw_env(ENV_DISABLE_METAL),
            _device_name(mx.default_device()), build.settings_epoch())


_last_device: list = [None]  # (Device, its str), read and replaced whole: no thread sees a torn pair


def _device_name(device) -> str:
    """str(device), kept for the last device seen: a Device compares by value (~0.08 µs) where
    str() formats it anew (~0.3 µs), and state() runs on every few-token call."""
    last = _last_device[0]
    if last is None or device != last[0]:
        last = (device, str(device))
        _last_device[0] = last
    return last[1]


_metal_checked = []


def latency_compiles(x) -> bool:
    """Whether a module call on stream state x runs its dispatch and ops under one mx.compile
    (kernels.build.COMPILE_LATENCY: a few tokens, a GPU present). On Metal the kernels' first-use
    checks run first, eagerly: none can run while mx.compile traces."""
    if not build.compiles_latency(x):
        return False
    if not _metal_checked:
        kernels.check_metal_kernels()
        _metal_checked.append(True)
    return True


def compiled_latency(fn, *settings):
    """fn under mx.compile for a module's latency path: one per (fn, its Python settings,
    state()). fn's arrays are its inputs, never constants of the trace."""
    return build.compiled_for(fn, (settings, state()))


# assignments to these modules' attributes (settings; the paths' functions, which tests stand in)
# bump build.settings_epoch, which state() and the modules' kept decisions read
for _module in (__name__, compiled.__name__, reference.__name__):
    build.watch(_module)
