"""`mhc-mlx bench`: our kernels, our compiled path, the reference and the seed packages, side
by side with the copy floor of the same device (timing.py says how; cases.py says what)."""

from .run import run

__all__ = ["run"]
