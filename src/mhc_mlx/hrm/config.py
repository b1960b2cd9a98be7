"""HRMConfig: every architecture setting of the Hierarchical Reasoning Model, in one dataclass.

Field names follow the original (sapientinc/HRM, `HierarchicalReasoningModel_ACTV1Config`);
`residual`, `streams`, `sinkhorn_iters` and `mhc_dynamic` are ours (the mHC option).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import mlx.core as mx

RESIDUALS = ("plain", "mhc", "hc")
POS_ENCODINGS = ("rope", "learned")
FORWARD_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass
class HRMConfig:
    seq_len: int
    vocab_size: int
    num_puzzle_identifiers: int = 1
    puzzle_emb_ndim: int = 0

    H_cycles: int = 2
    L_cycles: int = 2
    H_layers: int = 4
    L_layers: int = 4

    hidden_size: int = 512
    expansion: float = 4.0
    num_heads: int = 8
    pos_encodings: str = "rope"
    # The original rounds the SwiGLU width up to a multiple of 256; kept as the default.
    ffn_multiple_of: int = 256

    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    halt_max_steps: int = 16
    halt_exploration_prob: float = 0.1

    forward_dtype: str = "float32"

    # mHC option: "plain" is the original post-norm residual; "mhc"/"hc" turn each block's two
    # residual connections into hyper-connection sites over `streams` copies of the state.
    residual: str = "plain"
    streams: int = 4
    sinkhorn_iters: int = 20
    mhc_dynamic: bool = True

    def __post_init__(self):
        for name in (
            "seq_len",
            "vocab_size",
            "num_puzzle_identifiers",
            "H_cycles",
            "L_cycles",
            "H_layers",
            "L_layers",
            "hidden_size",
            "num_heads",
            "halt_max_steps",
            "ffn_multiple_of",
            "streams",
            "sinkhorn_iters",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HRMConfig.{name} must be a positive int, got {value!r}")
        if (
            isinstance(self.puzzle_emb_ndim, bool)
            or not isinstance(self.puzzle_emb_ndim, int)
            or self.puzzle_emb_ndim < 0
        ):
            raise ValueError(f"HRMConfig.puzzle_emb_ndim must be an int >= 0, got {self.puzzle_emb_ndim!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head dim {self.hidden_size // self.num_heads} must be even for RoPE")
        if not self.expansion > 0:
            raise ValueError(f"expansion must be > 0, got {self.expansion}")
        if not 0.0 <= self.halt_exploration_prob <= 1.0:
            raise ValueError(f"halt_exploration_prob must be in [0, 1], got {self.halt_exploration_prob}")
        if self.pos_encodings not in POS_ENCODINGS:
            raise ValueError(f"pos_encodings must be one of {POS_ENCODINGS}, got {self.pos_encodings!r}")
        if self.forward_dtype not in FORWARD_DTYPES:
            raise ValueError(
                f"forward_dtype must be one of {tuple(FORWARD_DTYPES)}, got {self.forward_dtype!r}"
            )
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {self.residual!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def puzzle_emb_len(self) -> int:
        """Positions the puzzle embedding occupies in front of the tokens (ceil(ndim / hidden))."""
        return -(self.puzzle_emb_ndim // -self.hidden_size)

    @property
    def total_len(self) -> int:
        return self.seq_len + self.puzzle_emb_len

    @property
    def dtype(self) -> mx.Dtype:
        return FORWARD_DTYPES[self.forward_dtype]

    @property
    def uses_streams(self) -> bool:
        return self.residual != "plain"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HRMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown HRMConfig fields: {', '.join(unknown)}")
        return cls(**d)
