"""The Hierarchical Reasoning Model with adaptive computation time (original:
models/hrm/hrm_act_v1.py, `HierarchicalReasoningModel_ACTV1`).

Two recurrent modules, H (slow) and L (fast), exchange state for H_cycles x L_cycles calls per
ACT step; only the last L call and the last H call of a step carry gradients (the one-step
gradient) and the state handed to the next step is detached. A Q-head reads the first position
of z_H and decides, per row, whether to halt; rows that halt take the next puzzle of the batch.

With residual "mhc"/"hc" the states z_H and z_L are n-stream states [B, T, n, C]: the streams
live in the carry, across every block, every H/L exchange and every ACT step, so the
hyper-connection mixing acts over the model's whole recurrent depth. H/L exchange (the input
injection) adds stream i to stream i; the heads read the mean of the streams. At identity init
the streams stay equal and the model computes exactly its plain twin.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from .config import HRMConfig
from .embeddings import InputEmbedding
from .initializers import trunc_normal
from .layers import HRMBlock, Linear, RotaryEmbedding

DATA_KEYS = ("inputs", "labels", "puzzle_identifiers")


class InnerCarry(NamedTuple):
    z_H: mx.array  # [B, T, C] or [B, T, n, C]
    z_L: mx.array


class Carry(NamedTuple):
    inner: InnerCarry
    steps: mx.array  # [B] int32: ACT steps taken on the current puzzle
    halted: mx.array  # [B] bool: the row finished its puzzle at the last step
    current_data: dict  # the puzzles the rows are working on (DATA_KEYS)


class ReasoningModule(nn.Module):
    """A stack of blocks fed state + injection (the H or the L level)."""

    def __init__(self, config: HRMConfig, num_layers: int):
        super().__init__()
        self.layers = [HRMBlock(config) for _ in range(num_layers)]

    def __call__(self, hidden: mx.array, injection: mx.array, rope: RotaryEmbedding | None) -> mx.array:
        hidden = hidden + injection
        for layer in self.layers:
            hidden = layer(hidden, rope)
        return hidden


class HRMInner(nn.Module):
    """One ACT step of reasoning: (carry, data) -> (new carry, token logits, Q logits)."""

    def __init__(self, config: HRMConfig):
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.embed = InputEmbedding(
            vocab_size=config.vocab_size,
            hidden_size=C,
            seq_len=config.seq_len,
            num_puzzle_identifiers=config.num_puzzle_identifiers,
            puzzle_emb_ndim=config.puzzle_emb_ndim,
            learned_positions=config.pos_encodings == "learned",
        )
        self.lm_head = Linear(C, config.vocab_size)
        self.q_head = Linear(C, 2, bias=True)
        # Q starts at (almost) "never halt" so early training is not cut short by noise.
        self.q_head.weight = mx.zeros_like(self.q_head.weight)
        self.q_head.bias = mx.full((2,), -5.0)
        self.rope = (
            RotaryEmbedding(config.head_dim, config.rope_theta) if config.pos_encodings == "rope" else None
        )
        self.H_level = ReasoningModule(config, config.H_layers)
        self.L_level = ReasoningModule(config, config.L_layers)
        # Fixed initial states (buffers in the original): saved with the model, never trained.
        self.H_init = trunc_normal((C,), std=1.0)
        self.L_init = trunc_normal((C,), std=1.0)
        self.freeze(keys=["H_init", "L_init"], recurse=False)
        if config.uses_streams:
            for block in self.H_level.layers + self.L_level.layers:
                block.add_residual_sites(config)

    def _state_shape(self, batch_size: int) -> tuple[int, ...]:
        c = self.config
        streams = (c.streams,) if c.uses_streams else ()
        return (batch_size, c.total_len, *streams, c.hidden_size)

    def empty_carry(self, batch_size: int) -> InnerCarry:
        shape = self._state_shape(batch_size)
        return InnerCarry(mx.zeros(shape, self.config.dtype), mx.zeros(shape, self.config.dtype))

    def reset_carry(self, reset: mx.array, carry: InnerCarry) -> InnerCarry:
        """Rows where `reset` is True restart from H_init / L_init (copied into every stream)."""
        flag = reset.reshape(-1, *([1] * (carry.z_H.ndim - 1)))
        dtype = self.config.dtype
        return InnerCarry(
            mx.where(flag, self.H_init.astype(dtype), carry.z_H),
            mx.where(flag, self.L_init.astype(dtype), carry.z_L),
        )

    def input_embeddings(self, data: dict, puzzle_rows: mx.array | None = None) -> mx.array:
        emb = self.embed(data["inputs"], data["puzzle_identifiers"], puzzle_rows, self.config.dtype)
        # Injected into every stream alike.
        return mx.expand_dims(emb, -2) if self.config.uses_streams else emb

    def readout(self, z_H: mx.array) -> mx.array:
        return z_H.mean(axis=-2) if self.config.uses_streams else z_H

    def __call__(
        self, carry: InnerCarry, data: dict, puzzle_rows: mx.array | None = None
    ) -> tuple[InnerCarry, mx.array, tuple[mx.array, mx.array]]:
        c = self.config
        x = self.input_embeddings(data, puzzle_rows)
        z_H, z_L = carry
        # All calls but the last L and the last H: no gradient (stop_gradient below).
        for h in range(c.H_cycles):
            for l in range(c.L_cycles):
                if not (h == c.H_cycles - 1 and l == c.L_cycles - 1):
                    z_L = self.L_level(z_L, z_H + x, self.rope)
            if h != c.H_cycles - 1:
                z_H = self.H_level(z_H, z_L, self.rope)
        z_H, z_L = mx.stop_gradient(z_H), mx.stop_gradient(z_L)
        # The one-step gradient.
        z_L = self.L_level(z_L, z_H + x, self.rope)
        z_H = self.H_level(z_H, z_L, self.rope)

        new_carry = InnerCarry(mx.stop_gradient(z_H), mx.stop_gradient(z_L))
        out = self.readout(z_H)
        logits = self.lm_head(out)[:, c.puzzle_emb_len :]
        q = self.q_head(out[:, 0]).astype(mx.float32)
        return new_carry, logits, (q[..., 0], q[..., 1])


class HRM(nn.Module):
    """HRM with adaptive computation time (the ACT wrapper).

    Call `model(carry, batch)` once per ACT step (training) or until every row halted
    (evaluation: `model.eval()` makes every row run exactly halt_max_steps steps). The
    training step uses the two halves, `take_new_data` and `step`, so it can differentiate the
    puzzle-embedding rows of the batch.
    """

    def __init__(self, config: HRMConfig):
        super().__init__()
        self.config = config
        self.inner = HRMInner(config)

    @property
    def puzzle_emb(self):
        embed = self.inner.embed
        return embed.puzzle_emb if "puzzle_emb" in embed else None

    def initial_carry(self, batch: dict) -> Carry:
        check_batch(batch, self.config)
        B = batch["inputs"].shape[0]
        return Carry(
            inner=self.inner.empty_carry(B),
            steps=mx.zeros((B,), mx.int32),
            # Every row starts halted, so the first step loads data into all of them.
            halted=mx.ones((B,), mx.bool_),
            current_data={k: mx.zeros_like(batch[k]) for k in DATA_KEYS},
        )

    def take_new_data(self, carry: Carry, batch: dict) -> Carry:
        """Rows that halted restart (fresh state, 0 steps) on their row of `batch`; others keep theirs."""
        check_batch(batch, self.config)
        halted = carry.halted
        data = {}
        for k in DATA_KEYS:
            v = carry.current_data[k]
            if tuple(batch[k].shape) != tuple(v.shape):
                raise ValueError(
                    f"batch[{k!r}] has shape {tuple(batch[k].shape)}, the carry holds {tuple(v.shape)}"
                )
            data[k] = mx.where(halted.reshape(-1, *([1] * (v.ndim - 1))), batch[k], v)
        return Carry(
            inner=self.inner.reset_carry(halted, carry.inner),
            steps=mx.where(halted, 0, carry.steps),
            halted=halted,
            current_data=data,
        )

    def puzzle_rows(self, data: dict) -> mx.array | None:
        return None if self.puzzle_emb is None else self.puzzle_emb.rows(data["puzzle_identifiers"])

    def step(
        self, carry: Carry, puzzle_rows: mx.array | None = None, key: mx.array | None = None
    ) -> tuple[Carry, dict]:
        """One ACT step on the rows' current data (after take_new_data)."""
        c = self.config
        data = carry.current_data
        inner, logits, (q_halt, q_continue) = self.inner(carry.inner, data, puzzle_rows)
        outputs = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_continue}

        steps = carry.steps + 1
        is_last_step = steps >= c.halt_max_steps
        halted = is_last_step
        if self.training and c.halt_max_steps > 1:
            halted = halted | (q_halt > q_continue)
            # Exploration: some rows must run a random number of steps in [2, halt_max_steps].
            key = mx.random.key(0) if key is None else key
            k_explore, k_steps = mx.random.split(key)
            explore = mx.random.uniform(shape=q_halt.shape, key=k_explore) < c.halt_exploration_prob
            min_steps = explore * mx.random.randint(2, c.halt_max_steps + 1, steps.shape, key=k_steps)
            halted = halted & (steps >= min_steps)
            # Bootstrap target for Q(continue) from a second forward, without a replay buffer.
            _, _, (next_halt, next_continue) = self.inner(inner, data, puzzle_rows)
            target = mx.where(is_last_step, next_halt, mx.maximum(next_halt, next_continue))
            outputs["target_q_continue"] = mx.stop_gradient(mx.sigmoid(target))
        return Carry(inner, steps, halted, data), outputs

    def __call__(self, carry: Carry, batch: dict, key: mx.array | None = None) -> tuple[Carry, dict]:
        carry = self.take_new_data(carry, batch)
        return self.step(carry, self.puzzle_rows(carry.current_data), key)


def check_batch(batch: dict, config: HRMConfig) -> None:
    """Clear errors for a batch that does not fit the model (keys, shapes, dtypes)."""
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a dict with keys {DATA_KEYS}, got {type(batch).__name__}")
    missing = [k for k in DATA_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {', '.join(missing)} (needs {', '.join(DATA_KEYS)})")
    inputs, labels, ids = (batch[k] for k in DATA_KEYS)
    for k in DATA_KEYS:
        if not isinstance(batch[k], mx.array):
            raise TypeError(f"batch[{k!r}] must be an mlx array, got {type(batch[k]).__name__}")
        if not mx.issubdtype(batch[k].dtype, mx.integer):
            raise TypeError(f"batch[{k!r}] must hold integers, got {batch[k].dtype}")
    if inputs.ndim != 2 or inputs.shape[1] != config.seq_len:
        raise ValueError(f"batch inputs must be [B, {config.seq_len}], got {tuple(inputs.shape)}")
    if tuple(labels.shape) != tuple(inputs.shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} differs from inputs {tuple(inputs.shape)}")
    if tuple(ids.shape) != (inputs.shape[0],):
        raise ValueError(f"puzzle_identifiers must be [B] = [{inputs.shape[0]}], got {tuple(ids.shape)}")
