"""Fixtures of the core suite: a fresh, recorded random seed per test, and the backend switch.

Every run draws new inputs. The session seed comes from MHC_TEST_SEED when set (to replay a
failure) or from the OS otherwise; each test derives its own generator from it and its node
id, and prints both, so a failing test's "Captured stdout setup" says how to replay it.
"""

from __future__ import annotations

import os
import secrets
import zlib

import mhc_mlx
import numpy as np
import pytest

SESSION_SEED = int(os.environ.get("MHC_TEST_SEED") or secrets.randbits(32))
# compiled-split: the compiled path with its matmuls split as on TF32 GPUs (compiled/matmul.py),
# so the form a CUDA machine runs is checked against the float64 reference here too.
BACKENDS = ("reference", "compiled", "compiled-split")


@pytest.fixture
def rng(request) -> np.random.Generator:
    test_seed = zlib.crc32(request.node.nodeid.encode())
    print(f"random inputs: MHC_TEST_SEED={SESSION_SEED} (test stream {test_seed}); "
          f"replay with MHC_TEST_SEED={SESSION_SEED} pytest '{request.node.nodeid}'")
    return np.random.default_rng([SESSION_SEED, test_seed])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test body under mhc_mlx.use_backend(<name>) for each pure-MLX path."""
    name = request.param
    if name == "compiled-split":
        from mhc_mlx.compiled import site

        monkeypatch.setattr(site, "_needs_split", lambda: True)
        name = "compiled"
    with mhc_mlx.use_backend(name):
        yield name
