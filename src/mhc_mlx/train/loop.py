"""The training loop: every residual mode stepped side by side on the same batches.

Per mode and step it records the loss, the gradient norm (before clipping) and tokens/s;
every `log_every` steps the Amax gains of the residual matrices (per site and composite)
on a fixed probe batch. Under data parallelism each rank takes its slice of the global
batch, gradients are averaged with `mlx.nn.average_gradients`, and only rank 0 writes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from .. import kernels
from . import checkpoint
from .config import TrainConfig
from .factory import Setup
from .metrics import residual_gains


def make_optimizer(config: TrainConfig) -> optim.Optimizer:
    lr, warmup = config.lr, config.warmup

    def schedule(step):
        # linear warmup over `warmup` updates, then constant (no dependence on the run's
        # length, so a run resumed with more steps follows the same curve)
        return lr * mx.minimum(1.0, (step + 1) / max(warmup, 1))

    if config.optimizer == "sgd":
        return optim.SGD(learning_rate=schedule, momentum=0.9)
    return optim.AdamW(learning_rate=schedule, weight_decay=0.0)


def cross_entropy(model: nn.Module, inputs: mx.array, targets: mx.array) -> mx.array:
    logits = model(inputs)
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="mean")


def _global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads)))


@dataclass
class ModeRun:
    """One residual mode's model, optimizer and metrics."""

    mode: str
    model: nn.Module
    optimizer: optim.Optimizer
    history: dict = field(default_factory=dict)

    def __post_init__(self):
        # The whole forward and backward under one mx.compile: compiles inside the model (the
        # compiled path's functions) do not fuse under mx.grad, where MLX keeps arrays as
        # tracers, but this one does (the default run's mhc mode, 2-core CPU, its own
        # metrics.json: 1752 -> 2089 tokens/s median, the same losses to the bit). Metal kernels
        # must pass their first-use checks eagerly first (Trainer calls
        # kernels.check_metal_kernels()); no check can run while compile traces.
        loss_and_grad = nn.value_and_grad(self.model, cross_entropy)
        self.loss_and_grad = mx.compile(lambda inputs, targets: loss_and_grad(self.model, inputs, targets),
                                        inputs=self.model.state, outputs=self.model.state)
        for key in ("step", "loss", "grad_norm", "tokens_per_s", "gain_step", "gains"):
            self.history.setdefault(key, [])
        self.history.setdefault("diverged_at", None)

    @property
    def diverged(self) -> bool:
        return self.history["diverged_at"] is not None

    def train_step(self, step: int, inputs, targets, group, clip: float, global_tokens: int) -> None:
        start = time.perf_counter()
        loss, grads = self.loss_and_grad(inputs, targets)
        if group is not None and group.size() > 1:
            grads = nn.average_gradients(grads, group=group)
            loss = mx.distributed.all_sum(loss, group=group) / group.size()
        if clip > 0:
            grads, norm = optim.clip_grad_norm(grads, clip)
        else:
            norm = _global_norm(grads)
        mx.eval(loss, norm, grads)
        loss_value, norm_value = loss.item(), norm.item()
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.optimizer.update(self.model, grads)
            mx.eval(self.model.parameters(), self.optimizer.state)
        else:
            # stop this mode here (the same on every rank: loss and norm are global)
            self.history["diverged_at"] = step
        elapsed = time.perf_counter() - start
        h = self.history
        h["step"].append(step)
        h["loss"].append(loss_value)
        h["grad_norm"].append(norm_value)
        h["tokens_per_s"].append(global_tokens / elapsed)

    def record_gains(self, step: int, probe: mx.array) -> Optional[dict]:
        gains = residual_gains(self.model, probe)
        if gains is not None:
            self.history["gain_step"].append(step)
            self.history["gains"].append(gains)
        return gains


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}"


class Trainer:
    """Runs the modes of one TrainConfig from step `start` to `config.steps`."""

    def __init__(
        self,
        config: TrainConfig,
        out_dir: Path,
        group=None,
        resume_from: Optional[checkpoint.Checkpoint] = None,
        log: Callable[[str], None] = print,
        progress: bool = True,
    ):
        self.config = config
        self.out_dir = Path(out_dir)
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.world = group.size() if group is not None else 1
        if config.batch_size % self.world:
            raise ValueError(
                f"batch size {config.batch_size} does not split evenly over {self.world} ranks"
            )
        self.log = log if self.rank == 0 else (lambda _: None)
        self.progress = progress and self.rank == 0
        self.setup = Setup(config)
        self.task = self.setup.task
        self.runs: dict[str, ModeRun] = {}
        self.start = 0
        kernels.check_metal_kernels()  # before the compiled steps trace (ModeRun)
        for mode in config.modes:
            model, optimizer, history = self.setup.build(mode), make_optimizer(config), {}
            if resume_from is not None:
                resume_from.restore(mode, model, optimizer)
                history = copy.deepcopy(resume_from.history[mode])
            self.runs[mode] = ModeRun(mode, model, optimizer, history)
        if resume_from is not None:
            self.start = resume_from.step
        probe = self.task.probe(min(2, config.batch_size), config.seq_len)
        self.probe = mx.array(probe[:, :-1])

    # -- outputs (rank 0 only) ------------------------------------------------------------

    def histories(self) -> dict:
        return {mode: run.history for mode, run in self.runs.items()}

    def metrics(self) -> dict:
        task = self.task.describe()
        if hasattr(self.task, "loss_floor"):
            task["loss_floor"] = self.task.loss_floor(self.config.seq_len)
        return {
            "config": self.config.to_dict(),
            "task": task,
            "world_size": self.world,
            "modes": self.histories(),
        }

    def save_checkpoint(self, step: int) -> None:
        if self.rank != 0:
            return
        checkpoint.save(
            self.out_dir, step, self.config.to_dict(),
            {mode: (run.model, run.optimizer) for mode, run in self.runs.items()}, self.histories(),
        )

    # -- the loop -------------------------------------------------------------------------

    def _log_line(self, step: int, gains: dict) -> str:
        parts = [f"step {step}/{self.config.steps}"]
        for mode, run in self.runs.items():
            h = run.history
            text = f"{mode} loss {_fmt(h['loss'][-1])} |g| {_fmt(h['grad_norm'][-1])} {h['tokens_per_s'][-1]:.0f} tok/s"
            if gains.get(mode):
                c = gains[mode]["composite"]
                text += f" gain fwd {_fmt(c['forward_max'])} bwd {_fmt(c['backward_max'])}"
            if run.diverged:
                text += f" DIVERGED at step {h['diverged_at']}"
            parts.append(text)
        return " | ".join(parts)

    def run(self, on_log: Optional[Callable[[int], None]] = None) -> dict:
        cfg = self.config
        if self.start >= cfg.steps:
            return self.metrics()
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.steps, initial=self.start, desc="mhc-mlx train", unit="step",
            disable=not self.progress, dynamic_ncols=True, leave=True,
        )
        local = cfg.batch_size // self.world
        rows = slice(self.rank * local, (self.rank + 1) * local)
        global_tokens = cfg.batch_size * cfg.seq_len
        try:
            for step in range(self.start + 1, cfg.steps + 1):
                batch = mx.array(self.task.batch(step, cfg.batch_size, cfg.seq_len)[rows])
                inputs, targets = batch[:, :-1], batch[:, 1:]
                for run in self.runs.values():
                    if not run.diverged:
                        run.train_step(step, inputs, targets, self.group, cfg.grad_clip, global_tokens)
                if self.progress:
                    bar.set_postfix({m: _fmt(r.history["loss"][-1]) for m, r in self.runs.items()}, refresh=False)
                bar.update(1)
                if step % cfg.log_every == 0 or step == 1 or step == cfg.steps:
                    gains = {}
                    if self.rank == 0:
                        for mode, run in self.runs.items():
                            if not run.diverged or run.history["diverged_at"] == step:
                                gains[mode] = run.record_gains(step, self.probe)
                    self.log(self._log_line(step, gains))
                    if on_log is not None:
                        on_log(step)
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    self.save_checkpoint(step)
        finally:
            bar.close()
        return self.metrics()


def summarise(metrics: dict, tail: int = 10) -> list[str]:
    """Lines of a final table: loss (mean of the last `tail` steps), tokens/s, gains."""
    lines = []
    floor = metrics["task"].get("loss_floor")
    if floor is not None:
        lines.append(f"task: {metrics['task']['name']} (best possible loss {floor:.3f})")
    for mode, h in metrics["modes"].items():
        losses = [x for x in h["loss"][-tail:]]
        loss = float(np.mean(losses)) if losses else float("nan")
        speed = float(np.median(h["tokens_per_s"])) if h["tokens_per_s"] else float("nan")
        line = f"{mode:>8}: loss {_fmt(loss)} (mean of last {len(losses)} steps), {speed:.0f} tokens/s"
        if h["gains"]:
            fwd = [g["composite"]["forward_max"] for g in h["gains"]]
            bwd = [g["composite"]["backward_max"] for g in h["gains"]]
            line += (
                f", composite gain fwd max {_fmt(float(np.max(fwd)))} (final {_fmt(fwd[-1])})"
                f", bwd max {_fmt(float(np.max(bwd)))} (final {_fmt(bwd[-1])})"
            )
        if h["diverged_at"] is not None:
            line += f", DIVERGED at step {h['diverged_at']}"
        lines.append(line)
    return lines
