"""Shared test settings: the `gpu` marker skips (with its reason shown by -ra) on CPU-only MLX.

MHC_TEST_SHARD=i/k keeps every k-th collected test from the i-th (0 <= i < k), so a GPU session
can run k pytest processes side by side (the kernels' NVRTC builds are CPU-bound).
MHC_TEST_KERNEL_SETTINGS="module.ATTRIBUTE=value ..." assigns kernel settings before any test
(kernels.assign_settings), so the GPU tests run a candidate as the default (tests that set a
setting themselves still do)."""

import os

import mlx.core as mx
import pytest


def gpu_backend() -> str | None:
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def _shard(config, items):
    spec = os.environ.get("MHC_TEST_SHARD", "").strip()
    if not spec:
        return
    try:
        i, k = (int(v) for v in spec.split("/"))
        if not 0 <= i < k:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"MHC_TEST_SHARD={spec!r}: expected i/k with 0 <= i < k") from None
    keep = [it for j, it in enumerate(items) if j % k == i]
    config.hook.pytest_deselected(items=[it for j, it in enumerate(items) if j % k != i])
    items[:] = keep


def pytest_collection_modifyitems(config, items):
    _shard(config, items)
    if gpu_backend() is not None:
        return
    skip = pytest.mark.skip(reason="needs MLX with a GPU backend (CUDA or Metal); this MLX runs on the CPU only")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    items = os.environ.get("MHC_TEST_KERNEL_SETTINGS", "").replace(",", " ").split()
    if items:
        from mhc_mlx import kernels

        try:
            kernels.assign_settings(items)
        except ValueError as err:
            raise pytest.UsageError(f"MHC_TEST_KERNEL_SETTINGS: {err}") from None

