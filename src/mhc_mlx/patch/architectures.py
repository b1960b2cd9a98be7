"""Which mlx-lm transformer blocks AutoPatcher knows, and where each keeps its sublayers.

A block is recognised by the module that defines its class (`mlx_lm.models.<name>`), never
by attribute names alone: a block is only rewritten when its residual form is known.

    pre-norm (llama, qwen2, qwen3, gemma):
        h = x + attn(input_layernorm(x));  out = h + mlp(post_attention_layernorm(h))
    sandwich norm (gemma2, gemma3_text):
        h = x + post_attention_layernorm(attn(input_layernorm(x)))
        out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn


@dataclass(frozen=True)
class BlockLayout:
    """Names of a block's sublayers and of the norms before (and, if any, after) them."""

    attention: str = "self_attn"
    attention_norm: str = "input_layernorm"
    attention_out_norm: Optional[str] = None
    mlp: str = "mlp"
    mlp_norm: str = "post_attention_layernorm"
    mlp_out_norm: Optional[str] = None

    def children(self) -> tuple[str, ...]:
        names = (
            self.attention, self.attention_norm, self.attention_out_norm,
            self.mlp, self.mlp_norm, self.mlp_out_norm,
        )
        return tuple(n for n in names if n is not None)


PRE_NORM = BlockLayout()
SANDWICH_NORM = BlockLayout(
    attention_out_norm="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
)

# mlx_lm.models.<key>.TransformerBlock -> its layout. Every entry is checked by a test that
# patches a tiny random model of that architecture and compares logits.
LAYOUTS: dict[str, BlockLayout] = {
    "llama": PRE_NORM,  # also mistral and other checkpoints mlx-lm maps to llama
    "qwen2": PRE_NORM,
    "qwen3": PRE_NORM,
    "gemma": PRE_NORM,
    "gemma2": SANDWICH_NORM,
    "gemma3_text": SANDWICH_NORM,
}

BLOCK_CLASS = "TransformerBlock"


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(LAYOUTS))


def architecture_of(block: nn.Module) -> Optional[str]:
    """The mlx-lm architecture whose TransformerBlock this is, or None if not a known one."""
    cls = type(block)
    prefix = "mlx_lm.models."
    if cls.__name__ != BLOCK_CLASS or not cls.__module__.startswith(prefix):
        return None
    name = cls.__module__[len(prefix):]
    return name if name in LAYOUTS else None


def layout_for(block: nn.Module, index: int) -> tuple[str, BlockLayout]:
    arch = architecture_of(block)
    if arch is None:
        cls = type(block)
        raise ValueError(
            f"layer {index} is a {cls.__module__}.{cls.__name__}, which AutoPatcher does not know; "
            f"supported: mlx_lm.models.<{'|'.join(supported_architectures())}>.TransformerBlock"
        )
    layout = LAYOUTS[arch]
    missing = [name for name in layout.children() if name not in block]
    if missing:
        raise ValueError(
            f"layer {index} ({arch}) has no {', '.join(missing)}: this mlx-lm version's block "
            "differs from the layout AutoPatcher knows"
        )
    return arch, layout
