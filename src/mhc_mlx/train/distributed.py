"""Data parallelism over MLX's own distributed engine, and a launcher that checks its ranks.

`mhc-mlx train --distributed` started from a shell re-runs itself under `mlx.launch` (ring
backend on CPUs, NCCL on NVIDIA GPUs) and then checks that every rank reported success:
mlx.launch exits 0 even when a rank fails, so each rank writes a status file and the
launcher fails unless all of them say "ok". A rank (MLX_RANK set by mlx.launch) joins the
group with `mx.distributed.init`, takes its slice of each global batch and averages
gradients with `mlx.nn.average_gradients`; rank 0 alone writes logs, metrics, plots and
checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

# The backends this launcher starts and checks (mlx.launch sets MLX_RANK for both).
BACKENDS = ("auto", "ring", "nccl")
ENV_REQUEST = "MHC_MLX_TRAIN_REQUEST"  # the JSON request a launched rank runs
ENV_STATUS = "MHC_MLX_RANK_STATUS_DIR"  # where each rank writes rank-<r>.json
ENV_FAIL_RANK = "MHC_MLX_FAIL_RANK"  # test hook: this rank raises right after joining
ENV_SLOW_RANK = "MHC_MLX_SLOW_RANK"  # test hook: "rank:seconds", this rank sleeps after joining


def inside_launch() -> bool:
    """True in a rank process: started by mlx.launch (it exports MLX_RANK) or by our launcher."""
    return "MLX_RANK" in os.environ or ENV_REQUEST in os.environ


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown distributed backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    cuda = getattr(mx, "cuda", None)
    return "nccl" if cuda is not None and cuda.is_available() else "ring"


def init_group(backend: str):
    """Join the group mlx.launch set up; fails loudly instead of training alone."""
    try:
        group = mx.distributed.init(strict=True, backend=resolve_backend(backend))
    except RuntimeError as e:
        raise RuntimeError(f"cannot join the distributed group ({backend}): {e}") from None
    fail = os.environ.get(ENV_FAIL_RANK)
    if fail is not None and fail.strip() == str(group.rank()):
        raise RuntimeError(f"rank {group.rank()} failed on purpose ({ENV_FAIL_RANK}={fail})")
    slow = os.environ.get(ENV_SLOW_RANK, "")
    if slow.partition(":")[0].strip() == str(group.rank()):
        time.sleep(float(slow.partition(":")[2] or 1.0))
    return group


def agree(group, ok: bool) -> bool:
    """True when every rank says ok; a collective, so no rank runs ahead of the others.

    Each rank checks the request (out directory, checkpoint) before rank 0 writes anything;
    without this step rank 0 can create train.log while another rank is still checking
    whether --out already holds a run, and that rank then refuses the run as foreign.
    """
    votes = mx.distributed.all_sum(mx.array(1 if ok else 0, dtype=mx.int32), group=group)
    return int(votes.item()) == group.size()


def write_status(ok: bool, error: str = "") -> None:
    """Report this rank's outcome to the launcher (no-op when not started by it)."""
    status_dir = os.environ.get(ENV_STATUS)
    rank = os.environ.get("MLX_RANK")
    if not status_dir or rank is None:
        return
    path = Path(status_dir) / f"rank-{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"ok": ok, "error": error}))
    os.replace(tmp, path)


def _free_port_pair() -> int:
    """A port p with p and p + 1 free now (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two adjacent free TCP ports on 127.0.0.1 for the ring backend")


def _launcher() -> str:
    beside = Path(sys.executable).parent / "mlx.launch"
    found = str(beside) if beside.exists() else shutil.which("mlx.launch")
    if not found:
        raise FileNotFoundError("mlx.launch is not installed next to this Python or on PATH (it ships with mlx)")
    return found


def launch(request: dict, ranks: int, backend: str) -> int:
    """Run `mhc-mlx train` on `ranks` local ranks under mlx.launch; 0 only if every rank succeeded."""
    if ranks < 1:
        raise ValueError(f"--ranks must be >= 1, got {ranks}")
    backend = resolve_backend(backend)
    with tempfile.TemporaryDirectory(prefix="mhc-mlx-ranks-") as status_dir:
        request_file = Path(status_dir) / "request.json"
        request_file.write_text(json.dumps({**request, "backend": backend}))
        cmd = [_launcher(), "-n", str(ranks), "--backend", backend]
        if backend == "ring":
            cmd += ["--starting-port", str(_free_port_pair())]
        cmd += ["--", sys.executable, "-m", "mhc_mlx.cli.main", "train", "--distributed"]
        env = {**os.environ, ENV_REQUEST: str(request_file), ENV_STATUS: status_dir}
        env.pop("MLX_RANK", None)
        proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL)
        problems = []
        for rank in range(ranks):
            path = Path(status_dir) / f"rank-{rank}.json"
            if not path.exists():
                problems.append(f"rank {rank} did not finish (killed, or stopped after another rank failed)")
                continue
            status = json.loads(path.read_text())
            if not status.get("ok"):
                problems.append(f"rank {rank} failed: {status.get('error') or 'unknown error'}")
    if problems or proc.returncode != 0:
        if proc.returncode != 0:
            problems.append(f"mlx.launch exited with status {proc.returncode}")
        print("mhc-mlx train --distributed: FAILED\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0
