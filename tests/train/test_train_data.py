"""The embedded synthetic language and text-file data: determinism, structure, errors."""

import numpy as np
import pytest

from mhc_mlx.train.data import ByteTokenizer, SyntheticLanguage, TextFile


def test_batches_are_a_function_of_seed_and_step():
    a, b = SyntheticLanguage(seed=3), SyntheticLanguage(seed=3)
    assert np.array_equal(a.batch(7, 4, 32), b.batch(7, 4, 32))
    assert not np.array_equal(a.batch(7, 4, 32), a.batch(8, 4, 32))
    assert not np.array_equal(a.batch(7, 4, 32), SyntheticLanguage(seed=4).batch(7, 4, 32))
    assert not np.array_equal(a.probe(4, 32), a.batch(0, 4, 32))


@pytest.mark.parametrize("seq_len", [16, 63, 64])
def test_synthetic_sequences_follow_the_grammar_and_repeat(seq_len):
    task = SyntheticLanguage(seed=1)
    seq = task.batch(2, 16, seq_len)
    assert seq.shape == (16, seq_len + 1) and seq.dtype == np.int32
    assert seq.min() >= 0 and seq.max() < task.vocab_size
    half = (seq_len + 1) // 2
    for row in seq:
        for t in range(1, half):
            assert row[t] in task.next_tokens[row[t - 1]]
        for t in range(half, seq_len + 1):
            assert row[t] == row[t - half]


def test_loss_floor_matches_the_optimal_predictor_on_samples():
    task = SyntheticLanguage(seed=2)
    seq_len = 31
    seq = np.concatenate([task.batch(s, 256, seq_len) for s in range(8)])
    half = (seq_len + 1) // 2
    nll = []
    for row in seq:
        total = 0.0
        for t in range(1, half):  # the chain: -log p(next | previous)
            k = int(np.flatnonzero(task.next_tokens[row[t - 1]] == row[t])[0])
            total -= np.log(task.next_probs[row[t - 1], k])
        nll.append(total / seq_len)  # repeats cost nothing to a predictor that looks back
    # 2048 sequences: the sample mean is within a few standard errors of the exact value
    stderr = np.std(nll) / np.sqrt(len(nll))
    assert abs(np.mean(nll) - task.loss_floor(seq_len)) < 4 * stderr


def test_text_file_windows(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 20)
    data = TextFile(path, ByteTokenizer(), seed=0)
    batch = data.batch(3, 5, 8)
    assert batch.shape == (5, 9)
    text = path.read_bytes()
    for row in batch:  # every window is a contiguous piece of the file
        assert bytes(row.astype(np.uint8)) in text
    assert np.array_equal(batch, TextFile(path, ByteTokenizer(), seed=0).batch(3, 5, 8))


def test_text_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextFile(tmp_path / "nope.txt", ByteTokenizer())
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(ValueError, match="is empty"):
        TextFile(tmp_path / "empty.txt", ByteTokenizer())
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match="not UTF-8"):
        TextFile(tmp_path / "bin.txt", ByteTokenizer())
    (tmp_path / "short.txt").write_text("hello world")
    small = TextFile(tmp_path / "short.txt", ByteTokenizer())
    with pytest.raises(ValueError, match="larger than the data"):
        small.batch(0, 2, 8)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        TextFile(tmp_path / "short.txt", ByteTokenizer(), vocab_size=100)
