"""The Hierarchical Reasoning Model (HRM, arXiv 2506.21734) in MLX, faithful to sapientinc/HRM,
with mHC residual streams as an option (`HRMConfig(residual="mhc")`).

    from mhc_mlx.hrm import HRM, HRMConfig
    model = HRM(HRMConfig(seq_len=16, vocab_size=6, residual="mhc"))
    carry = model.initial_carry(batch)
    carry, outputs = model(carry, batch)      # one ACT step

Data: `mhc_mlx.hrm.sudoku` / `mhc_mlx.hrm.maze` write the original on-disk format;
`mhc_mlx.hrm.dataset.PuzzleDataset` reads it. Training: `mhc_mlx.hrm.training`.
"""

from .config import HRMConfig
from .dataset import DatasetMetadata, PuzzleDataset
from .embeddings import InputEmbedding, PuzzleEmbedding, TokenEmbedding
from .initializers import trunc_normal
from .layers import Attention, HRMBlock, Linear, RotaryEmbedding, SwiGLU, rms_norm, swiglu_width
from .losses import (
    IGNORE_LABEL_ID,
    act_loss,
    finalize_metrics,
    log_stablemax,
    softmax_cross_entropy,
    stablemax_cross_entropy,
)
from .model import HRM, Carry, HRMInner, InnerCarry, ReasoningModule
from .optimizers import AdamATan2, SparseSignSGD, warmup_cosine, warmup_cosine_lr

__all__ = [
    "HRMConfig",
    "HRM",
    "HRMInner",
    "Carry",
    "InnerCarry",
    "ReasoningModule",
    "HRMBlock",
    "Attention",
    "SwiGLU",
    "RotaryEmbedding",
    "Linear",
    "rms_norm",
    "swiglu_width",
    "TokenEmbedding",
    "PuzzleEmbedding",
    "InputEmbedding",
    "trunc_normal",
    "IGNORE_LABEL_ID",
    "act_loss",
    "finalize_metrics",
    "log_stablemax",
    "stablemax_cross_entropy",
    "softmax_cross_entropy",
    "AdamATan2",
    "SparseSignSGD",
    "warmup_cosine",
    "warmup_cosine_lr",
    "DatasetMetadata",
    "PuzzleDataset",
]
