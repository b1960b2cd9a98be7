"""The seed packages, each installed into its own folder and timed in its own process.

mhc-mlx 0.6.3 ships modules named `mhc_mlx` and `mlx_mhc`, mlx-mhc 0.4.1 one named `mlx_mhc`:
both collide with this library, so each runs in a subprocess whose PYTHONPATH is its own
folder. Wheels are taken from a local folder (`pip download mhc-mlx==0.6.3 mlx-mhc==0.4.1 -d
.seedpkgs`); both are pure Python, so installing one is unpacking it.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import zipfile

SEEDS = {"mhc-mlx": "mhc_mlx-0.6.3-py3-none-any.whl", "mlx-mhc": "mlx_mhc-0.4.1-py3-none-any.whl"}
LABELS = {"mhc-mlx": "mhc-mlx 0.6.3", "mlx-mhc": "mlx-mhc 0.4.1"}
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seed_runner.py")


def install(wheel_dir: str, package: str) -> str | None:
    """The folder holding `package`'s modules (unpacked on first use), or None if its wheel is absent."""
    wheel = os.path.join(wheel_dir, SEEDS[package])
    if not os.path.exists(wheel):
        found = glob.glob(os.path.join(wheel_dir, SEEDS[package].split("-py3")[0] + "*.whl"))
        if not found:
            return None
        wheel = found[0]
    target = os.path.abspath(os.path.join(wheel_dir, os.path.basename(wheel)[: -len(".whl")]))
    if not os.path.isdir(target):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target + ".partial")
        os.replace(target + ".partial", target)
    return target


def run(package: str, folder: str, cases: list[dict], timeout: float = 900) -> dict:
    """{case id: µs or 'error: ...'} for `cases` timed by the seed in its own process."""
    env = dict(os.environ)
    # The seed's folder first; keep other entries (where MLX itself may be installed) but drop
    # any that hold this library, whose import names the seeds share.
    keep = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and not any(os.path.isdir(os.path.join(p, m)) for m in ("mhc_mlx", "mlx_mhc"))]
    env["PYTHONPATH"] = os.pathsep.join([folder, *keep])
    env.pop("MHC_MLX_BACKEND", None)
    job = json.dumps({"package": package, "cases": cases})
    try:
        res = subprocess.run(
            [sys.executable, RUNNER, job], env=env, capture_output=True, text=True, timeout=timeout,
            cwd=folder,
        )
    except subprocess.TimeoutExpired:
        return {c["id"]: "error: timed out" for c in cases}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("[")]
    if res.returncode or not lines:
        why = (res.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {c["id"]: f"error: {why}" for c in cases}
    out = {}
    for r in json.loads(lines[-1]):
        out[r["id"]] = r["us"] if "us" in r else f"error: {r['error']}"
    return out
