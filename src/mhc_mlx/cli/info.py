"""`mhc-mlx info` (also `mhc-mlx-info`): what a bug report needs to say about this install."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _matmul_note() -> str:
    from ..compiled import matmul

    if matmul.needs_split():
        return ("this GPU rounds float32 matmul inputs (TF32) unless MLX_ENABLE_TF32=0: the compiled "
                "path splits them to stay float32-exact")
    return "full float32 on this device: the compiled path multiplies directly"


def _tensor_core_note() -> str:
    """Which tensor-core products the dynamic coefficients take here (CUDA only; 16-bit x from
    coefficients.MMA_MIN_ELEMENTS elements)."""
    from ..kernels import build, coefficients_mma, coefficients_mma_vjp

    if build.gpu_backend() != "cuda":
        return "none: the tensor-core coefficient kernels are CUDA only"
    if not coefficients_mma.hopper():
        return ("mma.sync for the coefficient products (warpgroup MMA needs compute capability 9.x; "
                f"this GPU is {build.device_name() or 'unnamed'})")
    wg = [name for name, on in (("forward", coefficients_mma.WGMMA), ("dphi", coefficients_mma_vjp.DPHI_WGMMA)) if on]
    if not wg:
        return "mma.sync for the coefficient products (warpgroup MMA switched off)"
    return f"warpgroup MMA (sm_90a) for the {' and '.join(wg)} coefficient products at bfloat16, n = 4; mma.sync elsewhere"


def collect() -> dict:
    import mlx.core as mx

    from .. import __version__, dispatch, kernels
    from ..kernels import build

    backends = {
        "metal": bool(mx.metal.is_available()),
        "cuda": bool(getattr(mx, "cuda", None) and mx.cuda.is_available()),
        "cpu": True,
    }
    compile_note = (
        "g++ found: mx.compile builds C++ for the CPU"
        if shutil.which("g++") or shutil.which("c++") or platform.system() == "Darwin"
        else "no C++ compiler found: mx.compile on the CPU runs uncompiled (still correct, slower)"
    )
    return {
        "mhc-mlx": __version__,
        "mlx": _version("mlx"),
        "mlx-lm": _version("mlx-lm"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "default_device": str(mx.default_device()),
        "device_name": build.device_name(),
        "backends": backends,
        "cpu_compile": compile_note,
        "env": {
            dispatch.ENV_BACKEND: os.environ.get(dispatch.ENV_BACKEND, "(unset: automatic)"),
            dispatch.ENV_DISABLE_METAL: os.environ.get(dispatch.ENV_DISABLE_METAL, "(unset)"),
        },
        "float32_matmuls": _matmul_note(),
        "tensor_cores": _tensor_core_note(),
        "ops": {op: dispatch.explain(op) for op in kernels.OPS},
        "kernels": kernels.status(),
        "kernel_settings": kernels.settings(),
    }


def render(info: dict) -> str:
    lines = [
        f"mhc-mlx   {info['mhc-mlx']}",
        f"mlx       {info['mlx']}   (mlx-lm {info['mlx-lm']})",
        f"python    {info['python']}",
        f"platform  {info['platform']} ({info['machine']})",
        f"device    {info['default_device']}" + (f" ({info['device_name']})" if info["device_name"] else ""),
        "backends  " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in info["backends"].items()),
        f"cpu       {info['cpu_compile']}",
        f"matmuls   {info['float32_matmuls']}",
        f"tensor    {info['tensor_cores']}",
    ]
    lines += [f"env       {k}={v}" for k, v in info["env"].items()]
    # the kernels' forms and launch settings (docs/kernel-notes.md)
    lines.append("settings  " + ", ".join(f"{k}={v}" for k, v in info["kernel_settings"].items()))
    lines.append("ops (path taken by default, and why):")
    lines += [f"  {op:<17} {why}" for op, why in info["ops"].items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, devices and which path each op takes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mhc-mlx-info", description="mhc-mlx diagnostics")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:  # e.g. MHC_MLX_BACKEND set to a name that does not exist
        print(f"mhc-mlx-info: error: {e}", file=sys.stderr)
        return 2
