"""Shared test settings: the `gpu` marker skips (with its reason shown by -ra) on CPU-only MLX."""

import mlx.core as mx
import pytest


def gpu_backend() -> str | None:
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def pytest_collection_modifyitems(config, items):
    if gpu_backend() is not None:
        return
    skip = pytest.mark.skip(reason="needs MLX with a GPU backend (CUDA or Metal); this MLX runs on the CPU only")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
