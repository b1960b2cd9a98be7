"""TrainConfig: everything that defines a training run (saved in every checkpoint)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from .. import _checks
from ..models.residual import RESIDUAL_MODES, check_mode

BUILTIN_MODEL = "mhc_transformer"
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """One run: the task, the model and its residual modes, the optimiser.

    The defaults are the README's default run: a 12-block, 32-wide transformer (deep and
    narrow) trained with baseline, hc and mhc residuals side by side on the embedded
    synthetic language, sized for a 2-core CPU.
    """

    model: str = BUILTIN_MODEL  # BUILTIN_MODEL, an mlx-lm model_type, or an mlx-lm model directory
    data: Optional[str] = None  # None: the embedded synthetic language; else a UTF-8 text file
    modes: tuple[str, ...] = RESIDUAL_MODES
    steps: int = 120
    batch_size: int = 8  # sequences per step over all ranks
    seq_len: int = 64
    hidden_size: int = 32
    layers: int = 12
    heads: int = 4
    intermediate_size: int = 64
    n_streams: int = 4
    dynamic: bool = True
    sinkhorn_iters: int = 20
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    lr: float = 3e-3
    warmup: int = 10
    grad_clip: float = 1.0  # 0 disables clipping; the recorded norm is always before clipping
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 50

    def __post_init__(self):
        for name in (
            "steps", "batch_size", "seq_len", "hidden_size", "layers", "heads",
            "intermediate_size", "n_streams", "sinkhorn_iters", "log_every", "checkpoint_every",
        ):
            _checks.check_positive_int(getattr(self, name), name)
        for name in ("warmup", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        modes = tuple(self.modes)
        if not modes:
            raise ValueError("modes must name at least one of " + ", ".join(RESIDUAL_MODES))
        for mode in modes:
            check_mode(mode)
        if len(set(modes)) != len(modes):
            raise ValueError(f"modes has duplicates: {', '.join(modes)}")
        object.__setattr__(self, "modes", modes)
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not isinstance(self.dynamic, bool):
            raise ValueError(f"dynamic must be true or false, got {self.dynamic!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty string")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["modes"] = list(self.modes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "modes" in d:
            d["modes"] = tuple(d["modes"])
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
