"""The installed commands run: `mhc-mlx info`, `mhc-mlx-info`, `mhc-mlx demo --steps 5`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mhc_mlx

BIN = Path(sys.executable).parent
OPS = ("sinkhorn_knopp", "mhc_coefficients", "mhc_pre", "mhc_post")


def run(*argv, env=None, timeout=120):
    exe = BIN / argv[0]
    assert exe.exists(), f"console script {argv[0]} is not installed next to {sys.executable}"
    full_env = {k: v for k, v in os.environ.items() if k != "MHC_MLX_BACKEND"}
    full_env.update(env or {})
    return subprocess.run([str(exe), *argv[1:]], capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.mark.parametrize("command", [["mhc-mlx", "info"], ["mhc-mlx-info"]], ids=["mhc-mlx info", "mhc-mlx-info"])
def test_info_runs(command):
    p = run(*command)
    assert p.returncode == 0, p.stderr
    assert re.search(rf"^mhc-mlx\s+{re.escape(mhc_mlx.__version__)}$", p.stdout, re.M), p.stdout
    assert re.search(r"^mlx\s+\d+\.\d+", p.stdout, re.M), p.stdout
    for op in OPS:
        assert op in p.stdout, f"{op} missing from:\n{p.stdout}"
    # the kernel settings, candidates included (as `mhc-mlx bench` records them)
    assert re.search(r"^settings\s+dynamic_form=\w+, .*fused_read_step=(True|False|auto)", p.stdout, re.M), p.stdout
    p = run(*command, "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["mhc-mlx"] == mhc_mlx.__version__
    assert set(OPS) <= set(info["ops"])
    from mhc_mlx import kernels

    assert info["kernel_settings"] == kernels.settings()
    # the device named as MLX reports it (benches record it too)
    import mlx.core as mx

    assert info["device_name"] == mx.device_info().get("device_name", "")
    assert info["tensor_cores"] and re.search(r"^tensor\s+\S", run(*command).stdout, re.M)


def test_info_says_which_tensor_core_products_run(monkeypatch):
    # `mhc-mlx info`'s tensor line follows the GPU and the settings: none without CUDA, mma.sync
    # before Hopper, warpgroup MMA on Hopper for the products switched on
    from mhc_mlx.cli import info
    from mhc_mlx.kernels import build, coefficients_mma, coefficients_mma_vjp

    monkeypatch.setattr(build, "gpu_backend", lambda: None)
    assert info._tensor_core_note().startswith("none")
    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(build, "device_name", lambda: "NVIDIA A100")
    monkeypatch.setattr(coefficients_mma, "hopper", lambda: False)
    assert info._tensor_core_note().startswith("mma.sync") and "NVIDIA A100" in info._tensor_core_note()
    monkeypatch.setattr(coefficients_mma, "hopper", lambda: True)
    for fwd, dphi, words in ((True, True, "forward and dphi"), (True, False, "the forward coefficient"),
                             (False, True, "the dphi coefficient")):
        monkeypatch.setattr(coefficients_mma, "WGMMA", fwd)
        monkeypatch.setattr(coefficients_mma_vjp, "DPHI_WGMMA", dphi)
        assert info._tensor_core_note().startswith("warpgroup MMA") and words in info._tensor_core_note()
    monkeypatch.setattr(coefficients_mma, "WGMMA", False)
    monkeypatch.setattr(coefficients_mma_vjp, "DPHI_WGMMA", False)
    assert "switched off" in info._tensor_core_note()
    rendered = info.render({**info.collect(), "tensor_cores": info._tensor_core_note()})
    assert re.search(r"^tensor\s+mma\.sync .*switched off", rendered, re.M), rendered


@pytest.mark.parametrize("command", [["mhc-mlx", "info"], ["mhc-mlx-info"]], ids=["mhc-mlx info", "mhc-mlx-info"])
def test_info_reports_a_bad_backend_name_cleanly(command):
    p = run(*command, env={"MHC_MLX_BACKEND": "bogus"})
    assert p.returncode != 0
    assert "unknown backend 'bogus'" in p.stderr and "MHC_MLX_BACKEND" in p.stderr
    assert "Traceback" not in p.stderr, f"a bad environment variable should give a clean error:\n{p.stderr}"


def test_info_rejects_unknown_flags():
    p = run("mhc-mlx", "info", "--bogus")
    assert p.returncode == 2 and "unrecognized arguments: --bogus" in p.stderr


def test_demo_runs():
    p = run("mhc-mlx", "demo", "--steps", "5")
    assert p.returncode == 0, p.stderr
    gap = re.search(r"max \|mhc - plain\| = ([0-9.e+-]+)", p.stdout)
    assert gap, p.stdout
    assert float(gap.group(1)) <= 1e-4, f"the demo's network should start as its plain twin:\n{p.stdout}"
    losses = [float(v) for v in re.findall(r"^step\s+\d+\s+loss ([0-9.]+)", p.stdout, re.M)]
    assert len(losses) >= 2 and all(v == v for v in losses), p.stdout
    assert re.search(r"^step\s+5\s", p.stdout, re.M), p.stdout


def test_version_of_an_uninstalled_source_tree(monkeypatch):
    # run from the repo on PYTHONPATH (the GPU device has no package index): the version comes
    # from pyproject.toml, marked '+source', so bench headers still say which release it is
    import importlib
    import importlib.metadata
    import pathlib

    from mhc_mlx import _version

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    try:
        reloaded = importlib.reload(_version)
        declared = re.search(r'^version\s*=\s*"([^"]+)"', (pathlib.Path(_version.__file__).parents[2] / "pyproject.toml")
                             .read_text(), re.M).group(1)
        assert reloaded.__version__ == f"{declared}+source"
    finally:
        monkeypatch.undo()
        importlib.reload(_version)
    assert _version.__version__ == mhc_mlx.__version__
