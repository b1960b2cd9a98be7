"""Token, position and puzzle embeddings."""

import math

import mlx.core as mx
import numpy as np

from mhc_mlx.hrm import InputEmbedding, PuzzleEmbedding, TokenEmbedding

rng = np.random.default_rng()


def test_token_embedding_init_std_and_lookup():
    mx.random.seed(0)
    emb = TokenEmbedding(500, 256, init_std=1 / 16)
    w = np.array(emb.weight, dtype=np.float64)
    assert abs(w.std() * 16 - 1) < 0.02
    ids = rng.integers(0, 500, size=(3, 7))
    np.testing.assert_array_equal(np.array(emb(mx.array(ids))), w[ids].astype(np.float32))


def test_puzzle_embedding_is_zero_and_frozen():
    emb = PuzzleEmbedding(10, 12)
    assert float(mx.abs(emb.weight).max()) == 0.0
    assert emb.trainable_parameters() == {}
    emb.weight = mx.array(rng.normal(size=(10, 12)), mx.float32)
    ids = mx.array([3, 3, 9])
    np.testing.assert_array_equal(np.array(emb.rows(ids)), np.array(emb.weight)[[3, 3, 9]])


def test_input_embedding_prefix_scale_and_padding():
    mx.random.seed(1)
    # puzzle_emb_ndim 20 over hidden 16: two prefix positions, the second padded with zeros.
    emb = InputEmbedding(
        vocab_size=9,
        hidden_size=16,
        seq_len=5,
        num_puzzle_identifiers=4,
        puzzle_emb_ndim=20,
        learned_positions=False,
    )
    emb.puzzle_emb.weight = mx.array(rng.normal(size=(4, 20)), mx.float32)
    inputs = rng.integers(0, 9, size=(2, 5))
    ids = np.array([1, 3])
    out = np.array(emb(mx.array(inputs), mx.array(ids)), dtype=np.float64)
    tok = np.array(emb.embed_tokens.weight, dtype=np.float64)[inputs]
    rows = np.pad(np.array(emb.puzzle_emb.weight, dtype=np.float64)[ids], ((0, 0), (0, 12))).reshape(2, 2, 16)
    np.testing.assert_allclose(out, 4.0 * np.concatenate([rows, tok], 1), atol=1e-5)
    # Rows given explicitly (the training step's differentiable copy) take their place.
    given = rng.normal(size=(2, 20))
    out2 = np.array(emb(mx.array(inputs), mx.array(ids), mx.array(given, mx.float32)), dtype=np.float64)
    np.testing.assert_allclose(out2[:, :2].reshape(2, -1)[:, :20], 4.0 * given, atol=1e-5)


def test_learned_positions_are_averaged_in():
    mx.random.seed(2)
    emb = InputEmbedding(
        vocab_size=9,
        hidden_size=16,
        seq_len=5,
        num_puzzle_identifiers=1,
        puzzle_emb_ndim=0,
        learned_positions=True,
    )
    inputs = rng.integers(0, 9, size=(3, 5))
    out = np.array(emb(mx.array(inputs), mx.zeros((3,), mx.int32)), dtype=np.float64)
    tok = np.array(emb.embed_tokens.weight, dtype=np.float64)[inputs]
    pos = np.array(emb.embed_pos.weight, dtype=np.float64)
    np.testing.assert_allclose(out, 4.0 * (tok + pos) / math.sqrt(2), atol=1e-5)
