"""One training run end to end: check the request, train, write metrics, dashboard and log.

Nothing is written until the request has been checked (data readable and large enough,
model known, checkpoint intact), and an earlier run's outputs are never replaced unless
asked: `resume` continues them, `overwrite` replaces them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import checkpoint
from .config import TrainConfig
from .factory import Setup
from .loop import Trainer, summarise

METRICS = "metrics.json"
DASHBOARD = "dashboard.png"
LOG = "train.log"
OUTPUTS = (METRICS, DASHBOARD, LOG, checkpoint.CHECKPOINTS)
# What a resumed run may set differently from the run it continues.
RESUME_MAY_CHANGE = ("steps", "log_every", "checkpoint_every")


@dataclass
class RunOptions:
    out: Path
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    plot: bool = True

    def to_dict(self) -> dict:
        return {"out": str(self.out), "resume": self.resume, "overwrite": self.overwrite,
                "progress": self.progress, "plot": self.plot}

    @classmethod
    def from_dict(cls, d: dict) -> "RunOptions":
        return cls(Path(d["out"]), d["resume"], d["overwrite"], d["progress"], d["plot"])


def existing_outputs(out: Path) -> list[str]:
    return [name for name in OUTPUTS if (out / name).exists()]


def resolve(overrides: dict, options: RunOptions) -> tuple[TrainConfig, Optional[checkpoint.Checkpoint]]:
    """The run's TrainConfig (and checkpoint, when resuming), checked; writes nothing."""
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if options.resume and options.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: pick one")
    if not options.resume:
        found = existing_outputs(out)
        if found and not options.overwrite:
            raise ValueError(
                f"{out} already holds a run ({', '.join(found)}); continue it with --resume, "
                "replace it with --overwrite, or choose another --out"
            )
        return TrainConfig(**overrides), None
    ckpt = checkpoint.load_latest(out)
    try:
        saved = TrainConfig.from_dict(ckpt.config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"corrupt checkpoint {ckpt.path}: its config is not valid ({e})") from None
    differ = {
        k: (getattr(saved, k), v) for k, v in overrides.items()
        if k not in RESUME_MAY_CHANGE and getattr(saved, k) != (tuple(v) if k == "modes" else v)
    }
    if differ:
        detail = ", ".join(f"{k}: saved {a!r}, given {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"--resume continues the run saved in {out}, but these settings differ from it: {detail}")
    return saved.replace(**{k: v for k, v in overrides.items() if k in RESUME_MAY_CHANGE}), ckpt


def _prepare_out(out: Path) -> None:
    # Create --out now (empty) so an unwritable path fails before training, not at the first write.
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the output directory ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the output directory is not writable")


def check(config: TrainConfig, options: RunOptions) -> None:
    """Fail early on bad data or model settings (reads the data; builds no model)."""
    if options.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("the dashboard needs matplotlib: pip install 'mhc-mlx[plot]', or pass --no-plot")
    Setup(config)
    _prepare_out(Path(options.out))


class _Log:
    """Rank 0's log: each line to the terminal (without tearing the progress bar) and train.log."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True))
    os.replace(tmp, path)


def train(config: TrainConfig, options: RunOptions, ckpt=None, group=None) -> dict:
    """Train every mode of `config`; rank 0 writes the outputs into options.out."""
    out = Path(options.out)
    rank = group.rank() if group is not None else 0
    log = _Log(out / LOG) if rank == 0 else (lambda line: None)
    trainer = Trainer(config, out, group=group, resume_from=ckpt, log=log, progress=options.progress)
    if trainer.start >= config.steps:
        if rank == 0:
            print(f"nothing to do: the checkpoint in {out} is at step {trainer.start}, --steps is {config.steps}")
        return trainer.metrics()
    if rank == 0:
        if options.overwrite:
            for name in existing_outputs(out):
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        out.mkdir(parents=True, exist_ok=True)
        log(
            f"mhc-mlx train: model {config.model}, modes {', '.join(config.modes)}, "
            f"steps {trainer.start + 1}..{config.steps}, batch {config.batch_size}x{config.seq_len}, "
            f"{trainer.world} rank(s); outputs in {out}"
        )

    def write_metrics(step: int) -> None:
        if rank == 0:
            _write_json(out / METRICS, trainer.metrics())

    metrics = trainer.run(on_log=write_metrics)
    if rank == 0:
        _write_json(out / METRICS, metrics)
        if options.plot:
            from .dashboard import plot_dashboard

            plot_dashboard(metrics, out / DASHBOARD)
        for line in summarise(metrics):
            log(line)
        log(f"wrote {out / METRICS}" + (f", {out / DASHBOARD}" if options.plot else "") + f", {out / LOG}, checkpoints")
    return metrics
