"""Optimizers of HRM (original: pretrain.py, adam_atan2, models/sparse_embedding.py).

- AdamATan2: Adam with atan2(m, sqrt(v)) in place of m / (sqrt(v) + eps) — no epsilon, bounded
  steps — and decoupled weight decay; the update rule of the `adam-atan2` package HRM trains
  with, step for step.
- SparseSignSGD: for the puzzle embedding; sums the gradients of the batch's rows per
  identifier and applies sign-SGD with decoupled weight decay to those rows only.
- warmup_cosine: the original's linear warmup + cosine schedule (min_ratio floor).
"""

from __future__ import annotations

import math
from typing import Callable, Union

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from .embeddings import PuzzleEmbedding

Schedule = Union[float, Callable[[mx.array], mx.array]]


def warmup_cosine_lr(
    step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> float:
    """The learning rate of update number `step` (1-based, as the original counts)."""
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * (min_ratio + max(0.0, (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))))


def warmup_cosine(base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """A schedule for mlx optimizers: called with the number of updates already made."""

    def schedule(done: mx.array) -> mx.array:
        step = done.astype(mx.float32) + 1  # this update's 1-based number
        warm = base_lr * step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        cosine = base_lr * (
            min_ratio + mx.maximum(0.0, (1 - min_ratio) * 0.5 * (1.0 + mx.cos(math.pi * progress)))
        )
        return mx.where(step < warmup_steps, warm, cosine)

    return schedule


class AdamATan2(optim.Optimizer):
    """p <- p (1 - lr wd);  m <- lerp(m, g, 1 - b1);  v <- lerp(v, g^2, 1 - b2);
    p <- p - lr / (1 - b1^t) * atan2(m, sqrt(v) / sqrt(1 - b2^t)).
    """

    def __init__(
        self, learning_rate: Schedule, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 1e-2
    ):
        super().__init__()
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self._maybe_schedule("learning_rate", learning_rate)
        self.betas = (float(b1), float(b2))
        self.weight_decay = float(weight_decay)

    def init_single(self, parameter: mx.array, state: dict):
        state["m"] = mx.zeros_like(parameter)
        state["v"] = mx.zeros_like(parameter)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        b1, b2 = self.betas
        lr = self.learning_rate.astype(mx.float32)
        t = self.step.astype(mx.float32)  # already counts this update
        g = gradient.astype(mx.float32)
        p = parameter.astype(mx.float32) * (1 - lr * self.weight_decay)
        m = state["m"] + (1 - b1) * (g - state["m"])
        v = state["v"] + (1 - b2) * (g * g - state["v"])
        state["m"], state["v"] = m, v
        denom = mx.sqrt(v) / mx.sqrt(1 - b2**t)
        p = p - (lr / (1 - b1**t)) * mx.arctan2(m, denom)
        return p.astype(parameter.dtype)


class SparseSignSGD:
    """Sign-SGD with decoupled weight decay on the rows of a PuzzleEmbedding a batch used.

    `update(embedding, row_grads, ids)`: row_grads [B, D] is the gradient of the loss with
    respect to the gathered rows weight[ids]; rows not in `ids` are left exactly as they are.
    """

    def __init__(self, learning_rate: Schedule, weight_decay: float = 1e-2):
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.schedule = learning_rate if callable(learning_rate) else (lambda _: mx.array(learning_rate))
        self.weight_decay = float(weight_decay)
        self.step = 0

    def update(self, embedding: PuzzleEmbedding, row_grads: mx.array, ids: mx.array) -> None:
        if not isinstance(embedding, PuzzleEmbedding):
            raise TypeError(f"SparseSignSGD updates a PuzzleEmbedding, got {type(embedding).__name__}")
        weight = embedding.weight
        if (
            row_grads.ndim != 2
            or row_grads.shape[1] != weight.shape[1]
            or tuple(ids.shape) != (row_grads.shape[0],)
        ):
            raise ValueError(
                f"row_grads must be [B, {weight.shape[1]}] and ids [B]; "
                f"got {tuple(row_grads.shape)} and {tuple(ids.shape)}"
            )
        lr = self.schedule(mx.array(self.step)).astype(mx.float32)
        self.step += 1
        unique, inverse = np.unique(np.asarray(ids), return_inverse=True)
        if unique.size and (unique[0] < 0 or unique[-1] >= weight.shape[0]):
            raise ValueError(
                f"puzzle identifiers must be in [0, {weight.shape[0]}), got {unique[0]}..{unique[-1]}"
            )
        unique = mx.array(unique.astype(np.int32))
        grad = (
            mx.zeros((unique.shape[0], weight.shape[1]), mx.float32)
            .at[mx.array(inverse.reshape(-1).astype(np.int32))]
            .add(row_grads.astype(mx.float32))
        )
        rows = weight[unique].astype(mx.float32)
        rows = rows * (1 - lr * self.weight_decay) - lr * mx.sign(grad)
        new_weight = mx.array(weight)
        new_weight[unique] = rows.astype(weight.dtype)
        embedding.weight = new_weight

    @property
    def state(self) -> dict:
        return {"step": self.step}

    def load_state(self, state: dict) -> None:
        self.step = int(state["step"])
