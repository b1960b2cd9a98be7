"""Input checks shared by the functional ops and the modules.

Every check looks at shapes and dtypes only, so none of them syncs with the device and all of
them work on the tracer arrays that mx.compile and mx.grad pass in.
"""

from __future__ import annotations

import math

import mlx.core as mx

ACTIVATION_DTYPES = (mx.float32, mx.bfloat16, mx.float16)


def check_array(x, name: str) -> None:
    if not isinstance(x, mx.array):
        raise TypeError(f"{name} must be an mlx.core.array, got {type(x).__name__}")


def check_float(x, name: str) -> None:
    check_array(x, name)
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; mhc-mlx takes float32, bfloat16 or float16 "
            f"(cast with {name}.astype(mx.float32))"
        )


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_eps(eps, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{name} must be a float, got {eps!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{name} must be a finite positive float, got {eps}")
    return float(eps)


def check_streams(x, name: str = "x", n: int | None = None, C: int | None = None) -> tuple[int, int]:
    """x must be stream state [..., n, C]; returns (n, C)."""
    check_float(x, name)
    if x.ndim < 2:
        raise ValueError(
            f"{name} must be stream state of shape [..., n, C] (rank >= 2), got shape {tuple(x.shape)}"
        )
    xn, xc = x.shape[-2], x.shape[-1]
    if n is not None and xn != n:
        raise ValueError(f"{name} has {xn} streams (shape {tuple(x.shape)}), expected n={n}")
    if C is not None and xc != C:
        raise ValueError(f"{name} has width {xc} (shape {tuple(x.shape)}), expected C={C}")
    return xn, xc


def check_sublayer_output(f, lead: tuple[int, ...], C: int) -> None:
    """f, what the sublayer wrote back, must be [*lead, C] like the site's input h."""
    check_float(f, "f")
    if tuple(f.shape) != tuple(lead) + (C,):
        raise ValueError(f"f (the sublayer output) must have shape {tuple(lead) + (C,)}, got {tuple(f.shape)}")


def check_coefficient(h, name: str, n: int, trailing: tuple[int, ...], lead: tuple[int, ...]) -> None:
    """A coefficient of shape [..., *trailing] whose leading dims broadcast against `lead`."""
    check_float(h, name)
    k = len(trailing)
    if h.ndim < k or tuple(h.shape[h.ndim - k:]) != trailing:
        want = "[..., " + ", ".join(str(t) for t in trailing) + "]"
        raise ValueError(f"{name} must have shape {want} for n={n}, got {tuple(h.shape)}")
    hl = tuple(h.shape[: h.ndim - k])
    if len(hl) > len(lead) or any(a != 1 and a != b for a, b in zip(reversed(hl), reversed(lead))):
        raise ValueError(
            f"{name} leading dims {hl} do not broadcast against the stream state's leading dims {lead}"
        )
