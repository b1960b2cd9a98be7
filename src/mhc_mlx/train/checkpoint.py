"""Checkpoints with exact resume: weights, optimizer state, step and metrics of every mode.

Layout under the run's output directory:

    checkpoints/step-0000050/{mode}.model.safetensors      model parameters
    checkpoints/step-0000050/{mode}.optimizer.safetensors  optimizer state (moments, step)
    checkpoints/step-0000050/state.json                    step, config, metrics so far, sha256 of each file
    checkpoints/latest                                     name of the newest complete checkpoint

A checkpoint is written to a hidden temporary directory and renamed into place, and
`latest` is replaced atomically, so an interrupted save never leaves a half checkpoint
behind `latest`. Loading checks every file's sha256 before reading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from .._version import __version__

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state.json"
FORMAT = 1
KEEP = 2
_NAME = re.compile(r"^step-\d{7}$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(mode: str) -> tuple[str, str]:
    return f"{mode}.model.safetensors", f"{mode}.optimizer.safetensors"


def save(out_dir: Path, step: int, config: dict, runs: dict, history: dict) -> Path:
    """Write checkpoint `step` for runs {mode: (model, optimizer)}; returns its directory."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        for mode, (model, optimizer) in runs.items():
            model_file, opt_file = _files(mode)
            mx.save_safetensors(str(tmp / model_file), dict(tree_flatten(model.parameters())))
            mx.save_safetensors(str(tmp / opt_file), dict(tree_flatten(optimizer.state)))
        state = {
            "format": FORMAT,
            "mhc_mlx_version": __version__,
            "step": step,
            "modes": list(runs),
            "config": config,
            "history": history,
            "files": {f.name: _sha256(f) for f in sorted(tmp.iterdir())},
        }
        (tmp / STATE).write_text(json.dumps(state))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name)
    os.replace(pointer, root / LATEST)
    for old in sorted(p for p in root.iterdir() if _NAME.match(p.name))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    path: Path
    step: int
    modes: list
    config: dict
    history: dict

    def _load(self, file: str) -> dict:
        try:
            return mx.load(str(self.path / file))
        except Exception as e:  # MLX raises several types for a damaged file
            raise ValueError(f"corrupt checkpoint {self.path}: cannot read {file} ({e})") from None

    def restore(self, mode: str, model: nn.Module, optimizer: optim.Optimizer) -> None:
        """Load `mode`'s weights and optimizer state into model and optimizer."""
        if mode not in self.modes:
            raise ValueError(f"checkpoint {self.path} has no run for mode {mode!r} (it has {', '.join(self.modes)})")
        model_file, opt_file = _files(mode)
        weights = self._load(model_file)
        try:
            model.load_weights(list(weights.items()), strict=True)
        except ValueError as e:
            raise ValueError(f"checkpoint {self.path} does not match the {mode} model: {e}") from None
        optimizer.state = tree_unflatten(list(self._load(opt_file).items()))
        mx.eval(model.parameters(), optimizer.state)


def load_latest(out_dir) -> Checkpoint:
    """The newest checkpoint under out_dir, with every file checked; clear errors otherwise."""
    root = Path(out_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from in {out_dir} (missing {pointer})")
    name = pointer.read_text().strip()
    path = root / name
    if not _NAME.match(name) or not path.is_dir():
        raise ValueError(f"corrupt checkpoint: {pointer} names {name!r}, which is not a checkpoint directory")
    try:
        state = json.loads((path / STATE).read_text())
        step, modes, config, history, files = (
            state["step"], state["modes"], state["config"], state["history"], state["files"]
        )
    except FileNotFoundError:
        raise ValueError(f"corrupt checkpoint {path}: {STATE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt checkpoint {path}: {STATE} is unreadable ({e!r})") from None
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has format {state.get('format')!r}; this mhc-mlx reads format {FORMAT}")
    for mode in modes:
        for file in _files(mode):
            if file not in files:
                raise ValueError(f"corrupt checkpoint {path}: {STATE} lists no {file}")
    for file, digest in files.items():
        f = path / file
        if not f.is_file():
            raise ValueError(f"corrupt checkpoint {path}: {file} is missing")
        if _sha256(f) != digest:
            raise ValueError(f"corrupt checkpoint {path}: {file} does not match its recorded sha256")
    return Checkpoint(path, int(step), list(modes), config, history)
