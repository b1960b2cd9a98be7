"""`mhc-mlx train`: baseline, hc and mhc side by side, a stability dashboard, checkpoints.

    mhc-mlx train                                   # the default run (~3 min on 2 CPU cores)
    mhc-mlx train --resume                          # continue it from its last checkpoint
    mhc-mlx train --model llama --data notes.txt    # an mlx-lm architecture on your text
    mhc-mlx train --distributed --ranks 2           # data parallel under mlx.launch
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..train import distributed
from ..train.config import BUILTIN_MODEL, TrainConfig

DEFAULT_OUT = "runs/mhc-train"
_DEFAULTS = TrainConfig()

# flag -> TrainConfig field; flags left out keep the config's default (or, with --resume,
# the saved run's value)
_FIELDS = {
    "model": "model", "data": "data", "modes": "modes", "steps": "steps",
    "batch_size": "batch_size", "seq_len": "seq_len", "hidden_size": "hidden_size",
    "layers": "layers", "heads": "heads", "intermediate_size": "intermediate_size",
    "n_streams": "n_streams", "sites": "dynamic", "sinkhorn_iters": "sinkhorn_iters",
    "optimizer": "optimizer", "lr": "lr", "warmup": "warmup", "grad_clip": "grad_clip", "seed": "seed",
    "log_every": "log_every", "checkpoint_every": "checkpoint_every",
}


def _modes(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def overrides_from(args: argparse.Namespace) -> dict:
    out = {}
    for flag, field in _FIELDS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if flag == "sites":
            value = value == "dynamic"
        out[field] = value
    return out


def _options(args: argparse.Namespace):
    from ..train.runner import RunOptions

    return RunOptions(Path(args.out), args.resume, args.overwrite, not args.no_progress, not args.no_plot)


def _run_rank(args: argparse.Namespace) -> int:
    """One rank under mlx.launch (started by `--distributed` or by the user)."""
    from ..train import runner
    from ..train.runner import RunOptions

    try:
        request_file = os.environ.get(distributed.ENV_REQUEST)
        if request_file:
            request = json.loads(Path(request_file).read_text())
            overrides = request["config"]
            overrides["modes"] = tuple(overrides["modes"])
            options, backend = RunOptions.from_dict(request["options"]), request["backend"]
        else:
            overrides, options, backend = overrides_from(args), _options(args), args.backend
        group = distributed.init_group(backend)
        try:
            config, ckpt = runner.resolve(overrides, options)
        except BaseException:
            distributed.agree(group, False)  # release the other ranks before failing
            raise
        if not distributed.agree(group, True):
            raise RuntimeError("another rank refused the run (its error is reported beside this one)")
        runner.train(config, options, ckpt, group=group)
    except BaseException as e:
        distributed.write_status(False, f"{type(e).__name__}: {e}")
        raise
    distributed.write_status(True)
    return 0


def run(args: argparse.Namespace) -> int:
    from ..train import runner

    if args.distributed and distributed.inside_launch():
        return _run_rank(args)
    if distributed.inside_launch():
        raise ValueError("running under mlx.launch: add --distributed so the ranks share one run")
    overrides, options = overrides_from(args), _options(args)
    config, ckpt = runner.resolve(overrides, options)
    if args.distributed:
        if args.ranks < 1:
            raise ValueError(f"--ranks must be >= 1, got {args.ranks}")
        if config.batch_size % args.ranks:
            raise ValueError(f"--batch-size {config.batch_size} does not split evenly over --ranks {args.ranks}")
    runner.check(config, options)  # last check: it creates --out
    if args.distributed:
        request = {"config": config.to_dict(), "options": options.to_dict()}
        return distributed.launch(request, args.ranks, args.backend)
    runner.train(config, options, ckpt)
    return 0


def register(sub) -> None:
    d = _DEFAULTS
    p = sub.add_parser(
        "train",
        help="train baseline, hc and mhc side by side; metrics, dashboard PNG, checkpoints",
        description=(
            "Train the same network with plain residuals (baseline), unconstrained hyper-connections "
            "(hc) and mHC side by side, record loss, gradient norm, tokens/s and the Amax gains of "
            "H_res (per site and composite over depth), and draw a dashboard. The default run uses "
            "an embedded synthetic language and takes a few minutes on a 2-core CPU."
        ),
    )
    g = p.add_argument_group("task and model")
    g.add_argument("--model", default=None, help=f"{BUILTIN_MODEL!r}, an mlx-lm architecture (llama, qwen2, gemma2, ...) "
                   f"for a small random model, or an mlx-lm model directory [default: {d.model}]")
    g.add_argument("--data", default=None, help="a UTF-8 text file to train on (byte tokens, or the model "
                   "directory's tokenizer) [default: the embedded synthetic language]")
    g.add_argument("--modes", type=_modes, default=None, help=f"comma-separated residual modes [default: {','.join(d.modes)}]")
    g.add_argument("--hidden-size", type=int, default=None, help=f"[default: {d.hidden_size}]")
    g.add_argument("--layers", type=int, default=None, help=f"transformer blocks [default: {d.layers}]")
    g.add_argument("--heads", type=int, default=None, help=f"[default: {d.heads}]")
    g.add_argument("--intermediate-size", type=int, default=None, help=f"MLP width [default: {d.intermediate_size}]")
    g.add_argument("--n-streams", type=int, default=None, help=f"residual streams n [default: {d.n_streams}]")
    g.add_argument("--sites", choices=("dynamic", "static"), default=None, help="per-token (dynamic) or learned "
                   "constant (static) coefficients [default: dynamic]")
    g.add_argument("--sinkhorn-iters", type=int, default=None, help=f"[default: {d.sinkhorn_iters}]")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help=f"total steps [default: {d.steps}]")
    g.add_argument("--batch-size", type=int, default=None, help=f"sequences per step, over all ranks [default: {d.batch_size}]")
    g.add_argument("--seq-len", type=int, default=None, help=f"[default: {d.seq_len}]")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default=None, help=f"[default: {d.optimizer}]")
    g.add_argument("--lr", type=float, default=None, help=f"learning rate (after warmup) [default: {d.lr}]")
    g.add_argument("--warmup", type=int, default=None, help=f"linear warmup steps [default: {d.warmup}]")
    g.add_argument("--grad-clip", type=float, default=None, help=f"max gradient norm, 0 = off [default: {d.grad_clip}]")
    g.add_argument("--seed", type=int, default=None, help=f"[default: {d.seed}]")
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default=DEFAULT_OUT, help="output directory (metrics.json, dashboard.png, train.log, checkpoints/)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    g.add_argument("--log-every", type=int, default=None, help=f"steps between log lines and gain probes [default: {d.log_every}]")
    g.add_argument("--checkpoint-every", type=int, default=None, help=f"[default: {d.checkpoint_every}]")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="skip the dashboard PNG")
    g = p.add_argument_group("data parallel")
    g.add_argument("--distributed", action="store_true", help="data parallel under mlx.launch (started for you "
                   "unless already under it); fails if any rank fails")
    g.add_argument("--ranks", type=int, default=2, help="processes on this machine when --distributed starts mlx.launch")
    g.add_argument("--backend", choices=distributed.BACKENDS, default="auto", help="auto: nccl with CUDA, else ring")
    p.set_defaults(func=run)
