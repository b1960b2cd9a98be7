"""Input embeddings: tokens, learned positions and the per-puzzle ("sparse") embedding.

The puzzle embedding holds one row per puzzle identifier. Like the original
(models/sparse_embedding.py) it is not trained by the main optimizer: a training step gathers
the batch's rows, takes their gradient and SparseSignSGD writes back only those rows.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .initializers import trunc_normal


class TokenEmbedding(nn.Module):
    """A lookup table initialised truncated-normal with the given std (CastedEmbedding)."""

    def __init__(self, num_embeddings: int, dims: int, init_std: float):
        super().__init__()
        self.weight = trunc_normal((num_embeddings, dims), std=init_std)

    def __call__(self, ids: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
        return self.weight[ids].astype(dtype)


class PuzzleEmbedding(nn.Module):
    """One row of width `dims` per puzzle identifier, zero at init.

    `weight` is frozen (not seen by the main optimizer); `rows(ids)` gathers the rows a batch
    uses, which the training step differentiates and SparseSignSGD applies.
    """

    def __init__(self, num_identifiers: int, dims: int, init_std: float = 0.0):
        super().__init__()
        self.weight = trunc_normal((num_identifiers, dims), std=init_std)
        self.freeze()

    @property
    def num_identifiers(self) -> int:
        return self.weight.shape[0]

    def rows(self, ids: mx.array) -> mx.array:
        return self.weight[ids]


class InputEmbedding(nn.Module):
    """[B, seq_len] token ids (+ puzzle rows) -> [B, puzzle_emb_len + seq_len, hidden].

    embed = sqrt(hidden) * [puzzle rows | token embedding], with learned positions averaged in
    by 1/sqrt(2) when pos_encodings == "learned" (RoPE is applied inside attention instead).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        seq_len: int,
        num_puzzle_identifiers: int,
        puzzle_emb_ndim: int,
        learned_positions: bool,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.embed_scale = math.sqrt(hidden_size)
        init_std = 1.0 / self.embed_scale
        self.puzzle_emb_ndim = puzzle_emb_ndim
        self.puzzle_emb_len = -(puzzle_emb_ndim // -hidden_size)
        self.embed_tokens = TokenEmbedding(vocab_size, hidden_size, init_std)
        if puzzle_emb_ndim > 0:
            self.puzzle_emb = PuzzleEmbedding(num_puzzle_identifiers, puzzle_emb_ndim)
        if learned_positions:
            self.embed_pos = TokenEmbedding(seq_len + self.puzzle_emb_len, hidden_size, init_std)

    def __call__(
        self,
        inputs: mx.array,
        puzzle_identifiers: mx.array,
        puzzle_rows: mx.array | None = None,
        dtype: mx.Dtype = mx.float32,
    ) -> mx.array:
        embedding = self.embed_tokens(inputs, dtype)
        if self.puzzle_emb_ndim > 0:
            if puzzle_rows is None:
                puzzle_rows = self.puzzle_emb.rows(puzzle_identifiers)
            B = puzzle_rows.shape[0]
            pad = self.puzzle_emb_len * self.hidden_size - self.puzzle_emb_ndim
            if pad:
                puzzle_rows = mx.pad(puzzle_rows, [(0, 0), (0, pad)])
            prefix = puzzle_rows.astype(dtype).reshape(B, self.puzzle_emb_len, self.hidden_size)
            embedding = mx.concatenate([prefix, embedding], axis=1)
        if "embed_pos" in self:
            # 1/sqrt(2) keeps the variance of the sum at that of one embedding.
            embedding = 0.707106781 * (embedding + self.embed_pos.weight.astype(dtype))
        return self.embed_scale * embedding
