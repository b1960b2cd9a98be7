"""Training and evaluation of HRM (original: pretrain.py), with checkpoints and exact resume.

One training step = one ACT step for every row of the batch: rows that halted take the next
puzzle, the model runs once (plus the no-gradient second forward for the Q target), AdamATan2
(or AdamW) updates the weights and SparseSignSGD the batch's puzzle-embedding rows; both follow
the warmup + cosine schedule. Evaluation runs every test puzzle for halt_max_steps steps.

A run directory holds:
    metrics.json        configs, train/eval history, wall times (rewritten at every eval)
    accuracy.png        eval blank-cell and exact accuracy against step
    checkpoint/         model, optimizer state, ACT carry and counters: `resume` continues
                        exactly where the run stopped
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from .config import HRMConfig
from .dataset import DatasetMetadata, PuzzleDataset
from .losses import LOSS_TYPES, act_loss, finalize_metrics
from .model import HRM, Carry, InnerCarry
from .optimizers import AdamATan2, SparseSignSGD, warmup_cosine

OPTIMIZERS = ("adam_atan2", "adamw")
CHECKPOINT = "checkpoint"
METRICS = "metrics.json"
PLOT = "accuracy.png"


@dataclass
class TrainConfig:
    data: str
    out: str
    steps: int = 1000
    batch_size: int = 32
    eval_every: int = 100
    eval_batch_size: int = 256
    lr: float = 1e-3
    lr_min_ratio: float = 1.0
    lr_warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    puzzle_emb_lr: float = 1e-3
    puzzle_emb_weight_decay: float = 0.1
    optimizer: str = "adam_atan2"
    loss_type: str = "stablemax_cross_entropy"
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        for name in ("lr", "puzzle_emb_lr", "weight_decay", "puzzle_emb_weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def model_config_for(data: DatasetMetadata, **arch) -> HRMConfig:
    """The model config for a dataset: vocab, seq_len and identifiers come from its metadata."""
    return HRMConfig(
        seq_len=data.seq_len,
        vocab_size=data.vocab_size,
        num_puzzle_identifiers=data.num_puzzle_identifiers,
        **arch,
    )


def check_compatible(model_config: HRMConfig, meta: DatasetMetadata, where: str) -> None:
    """A model only reads data with its vocabulary, sequence length and identifiers."""
    for name in ("vocab_size", "seq_len"):
        if getattr(model_config, name) != getattr(meta, name):
            raise ValueError(
                f"{where} has {name} {getattr(meta, name)} but the model was built for "
                f"{getattr(model_config, name)}: mismatched dataset"
            )
    if meta.num_puzzle_identifiers > model_config.num_puzzle_identifiers:
        raise ValueError(
            f"{where} has {meta.num_puzzle_identifiers} puzzle identifiers, the model only "
            f"{model_config.num_puzzle_identifiers}"
        )


class Trainer:
    """Owns the model, the optimizers, the ACT carry and the data stream of one run."""

    def __init__(self, train_config: TrainConfig, model_config: HRMConfig):
        self.tc = train_config
        self.mc = model_config
        self.train_data = PuzzleDataset(
            train_config.data, "train", train_config.batch_size, seed=train_config.seed
        )
        self.test_data = PuzzleDataset(
            train_config.data, "test", train_config.eval_batch_size, seed=train_config.seed
        )
        check_compatible(model_config, self.train_data.metadata, f"{train_config.data}/train")
        check_compatible(model_config, self.test_data.metadata, f"{train_config.data}/test")

        mx.random.seed(train_config.seed)
        self.model = HRM(model_config)
        self.model.train()
        tc = train_config
        schedule = warmup_cosine(tc.lr, tc.lr_warmup_steps, tc.steps, tc.lr_min_ratio)
        if tc.optimizer == "adam_atan2":
            self.optimizer = AdamATan2(schedule, (tc.beta1, tc.beta2), tc.weight_decay)
        else:
            self.optimizer = optim.AdamW(
                schedule, [tc.beta1, tc.beta2], weight_decay=tc.weight_decay, bias_correction=True
            )
        emb_schedule = warmup_cosine(tc.puzzle_emb_lr, tc.lr_warmup_steps, tc.steps, tc.lr_min_ratio)
        self.emb_optimizer = SparseSignSGD(emb_schedule, tc.puzzle_emb_weight_decay)

        self.step = 0
        self.batches_used = 0
        self.carry: Carry | None = None
        self.history: dict = {"train": [], "eval": []}
        self.wall_time = 0.0
        self._stream = self.train_data.iter_train()
        self._grad_fn = self._make_grad_fn()

    # ----- one step -------------------------------------------------------------------------
    def _make_grad_fn(self):
        model, loss_type = self.model, self.tc.loss_type

        def loss_fn(params, rows, carry, key):
            model.update(params)
            carry, outputs = model.step(carry, rows, key)
            loss, metrics = act_loss(outputs, carry, loss_type)
            # The original backpropagates loss / global batch size.
            return loss / carry.steps.shape[0], carry, metrics

        with_rows = self.model.puzzle_emb is not None
        return mx.value_and_grad(loss_fn, argnums=(0, 1) if with_rows else 0), with_rows

    def next_batch(self) -> dict:
        _, batch, _ = next(self._stream)
        self.batches_used += 1
        return batch

    def train_step(self) -> dict:
        batch = self.next_batch()
        if self.carry is None:
            self.carry = self.model.initial_carry(batch)
        grad_fn, with_rows = self._grad_fn
        carry = self.model.take_new_data(self.carry, batch)
        rows = self.model.puzzle_rows(carry.current_data)
        key = mx.random.key(self.tc.seed * 1_000_003 + self.step)
        (loss, carry, metrics), grads = grad_fn(self.model.trainable_parameters(), rows, carry, key)
        param_grads, row_grads = grads if with_rows else (grads, None)
        self.optimizer.update(self.model, param_grads)
        if with_rows:
            self.emb_optimizer.update(
                self.model.puzzle_emb, row_grads, carry.current_data["puzzle_identifiers"]
            )
        self.carry = carry
        mx.eval(self.model.parameters(), self.optimizer.state, self.carry, metrics, loss)
        self.step += 1
        out = finalize_metrics(metrics, batch_size=self.tc.batch_size)
        out["lr"] = float(self.optimizer.learning_rate)  # the rate this update used
        out["loss"] = float(loss)
        return out

    # ----- evaluation -----------------------------------------------------------------------
    def evaluate(self, max_batches: int | None = None) -> dict:
        return evaluate(self.model, self.test_data, self.tc.loss_type, max_batches)

    # ----- checkpoints ----------------------------------------------------------------------
    def save(self) -> str:
        path = os.path.join(self.tc.out, CHECKPOINT)
        tmp = path + ".tmp"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        mx.save_safetensors(
            os.path.join(tmp, "model.safetensors"), dict(tree_flatten(self.model.parameters()))
        )
        opt_state = dict(tree_flatten(self.optimizer.state))
        mx.save_safetensors(
            os.path.join(tmp, "optimizer.safetensors"), {k: mx.array(v) for k, v in opt_state.items()}
        )
        if self.carry is not None:
            mx.save_safetensors(os.path.join(tmp, "carry.safetensors"), carry_to_dict(self.carry))
        state = {
            "step": self.step,
            "batches_used": self.batches_used,
            "sparse_optimizer": self.emb_optimizer.state,
            "wall_time_s": self.wall_time,
            "model_config": self.mc.to_dict(),
            "train_config": dataclasses.asdict(self.tc),
            "history": self.history,
        }
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=1)
        # Replace the old checkpoint only once the new one is complete.
        if os.path.exists(path):
            old = path + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        return path

    def parameter_count(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))

    @classmethod
    def resume(cls, run_dir: str, data: str | None = None, steps: int | None = None) -> "Trainer":
        """The run in `run_dir`, exactly as its last checkpoint left it; `steps` raises the
        budget (the learning-rate schedule is then laid out over the new total)."""
        state = read_checkpoint_state(run_dir)
        overrides = {"out": run_dir}
        if data:
            overrides["data"] = data
        if steps is not None:
            if steps < state["step"]:
                raise ValueError(f"--steps {steps} is below the {state['step']} steps the run already made")
            overrides["steps"] = steps
        tc = TrainConfig(**{**state["train_config"], **overrides})
        trainer = cls(tc, HRMConfig.from_dict(state["model_config"]))
        ckpt = os.path.join(run_dir, CHECKPOINT)
        load_model_weights(trainer.model, ckpt)
        opt_flat = mx.load(os.path.join(ckpt, "optimizer.safetensors"))
        trainer.optimizer.state = tree_unflatten(list(opt_flat.items()))
        trainer.emb_optimizer.load_state(state["sparse_optimizer"])
        carry_file = os.path.join(ckpt, "carry.safetensors")
        if os.path.exists(carry_file):
            trainer.carry = carry_from_dict(mx.load(carry_file))
        trainer.step = state["step"]
        trainer.history = state["history"]
        trainer.wall_time = state["wall_time_s"]
        # Replay the data stream to where the run stopped (numpy only: cheap).
        for _ in range(state["batches_used"]):
            trainer.next_batch()
        return trainer

    # ----- the loop -------------------------------------------------------------------------
    def fit(self, progress: bool = True, on_eval=None) -> dict:
        """Train to `steps`, evaluating (and checkpointing) every `eval_every` steps and at the end."""
        from tqdm import tqdm

        os.makedirs(self.tc.out, exist_ok=True)
        if not self.history["eval"]:
            self._record_eval()  # the starting point of the curves
        bar = tqdm(
            total=self.tc.steps, initial=self.step, desc="hrm train", disable=not progress, dynamic_ncols=True
        )
        while self.step < self.tc.steps:
            start = time.perf_counter()
            metrics = self.train_step()
            self.wall_time += time.perf_counter() - start
            self.history["train"].append({"step": self.step, **metrics})
            if metrics["count"]:  # accuracy is measured on rows that halted at this step
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}", refresh=False
                )
            bar.update(1)
            if self.step % self.tc.eval_every == 0 or self.step == self.tc.steps:
                result = self._record_eval()
                bar.write(
                    f"step {self.step}: test blank-cell acc {result['blank_accuracy']:.3f}, "
                    f"exact {result['exact_accuracy']:.3f} ({self.wall_time:.0f} s training)"
                )
                if on_eval is not None:
                    on_eval(self)
        bar.close()
        return self.history["eval"][-1]

    def _record_eval(self) -> dict:
        start = time.perf_counter()
        result = self.evaluate()
        result = {
            "step": self.step,
            "train_wall_s": self.wall_time,
            "eval_wall_s": time.perf_counter() - start,
            **result,
        }
        self.history["eval"].append(result)
        self.save()
        write_metrics(self)
        return result


def evaluate(
    model: HRM,
    data: PuzzleDataset,
    loss_type: str = "stablemax_cross_entropy",
    max_batches: int | None = None,
) -> dict:
    """Every test example, all halt_max_steps ACT steps; metrics of the final step (the original's
    `evaluate`). Leaves the model in the mode it found it in."""
    was_training = model.training
    model.eval()
    sums: dict = {}
    try:
        for i, (_, batch, _) in enumerate(data.iter_test()):
            if max_batches is not None and i >= max_batches:
                break
            carry = model.initial_carry(batch)
            while True:
                carry, outputs = model(carry, batch)
                if bool(mx.all(carry.halted)):
                    break
            _, metrics = act_loss(outputs, carry, loss_type)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    finally:
        model.train(was_training)
    return finalize_metrics(sums)


def carry_to_dict(carry: Carry) -> dict:
    out = {"z_H": carry.inner.z_H, "z_L": carry.inner.z_L, "steps": carry.steps, "halted": carry.halted}
    out.update({f"data.{k}": v for k, v in carry.current_data.items()})
    return out


def carry_from_dict(d: dict) -> Carry:
    data = {k[len("data.") :]: v for k, v in d.items() if k.startswith("data.")}
    return Carry(InnerCarry(d["z_H"], d["z_L"]), d["steps"], d["halted"], data)


def read_checkpoint_state(run_dir: str) -> dict:
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    path = os.path.join(run_dir, CHECKPOINT, "state.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{run_dir!r} has no checkpoint ({CHECKPOINT}/state.json): not an HRM run directory"
        )
    with open(path) as f:
        return json.load(f)


def load_model_weights(model: HRM, checkpoint_dir: str) -> None:
    weights = mx.load(os.path.join(checkpoint_dir, "model.safetensors"))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())


def load_run(run_dir: str) -> tuple[HRM, dict]:
    """The trained model of a run directory (eval mode) and its checkpoint state."""
    state = read_checkpoint_state(run_dir)
    model = HRM(HRMConfig.from_dict(state["model_config"]))
    load_model_weights(model, os.path.join(run_dir, CHECKPOINT))
    model.eval()
    return model, state


def write_metrics(trainer: Trainer) -> None:
    summary = {
        "model_config": trainer.mc.to_dict(),
        "train_config": dataclasses.asdict(trainer.tc),
        "step": trainer.step,
        "train_wall_s": trainer.wall_time,
        "final_eval": trainer.history["eval"][-1] if trainer.history["eval"] else None,
        "history": trainer.history,
    }
    with open(os.path.join(trainer.tc.out, METRICS), "w") as f:
        json.dump(summary, f, indent=1)
    from .plotting import plot_runs

    plot_runs([(trainer.mc.residual, trainer.history)], os.path.join(trainer.tc.out, PLOT))
