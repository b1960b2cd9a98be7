"""Training data: the embedded synthetic language, or a user's text file.

Every batch is a pure function of (seed, step): a resumed run and every rank of a
distributed run see exactly the batches a single uninterrupted run sees. A batch is an
int32 array [batch_size, seq_len + 1]; inputs are [:, :-1] and targets [:, 1:].
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

_BATCH_STREAM = 1
_PROBE_STREAM = 2


def _rng(seed: int, stream: int, step: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, step])


class Task(Protocol):
    name: str
    vocab_size: int

    def batch(self, step: int, batch_size: int, seq_len: int) -> np.ndarray: ...

    def probe(self, batch_size: int, seq_len: int) -> np.ndarray: ...

    def describe(self) -> dict: ...


class SyntheticLanguage:
    """Sequences whose first half is a sparse random Markov chain and whose second half
    repeats the first: one part a model learns from the current token alone, one it can
    only learn by attending back half a sequence. Offline, generated on the fly.

    The grammar (each token's `successors` allowed next tokens and their probabilities) is
    fixed by `grammar_seed`, so every run trains on the same language; `seed` picks the
    sequences.
    """

    name = "synthetic"

    def __init__(self, seed: int = 0, vocab_size: int = 32, successors: int = 3, grammar_seed: int = 1234):
        if not 2 <= successors <= vocab_size:
            raise ValueError(f"successors must be in [2, vocab_size], got {successors}")
        self.seed = seed
        self.vocab_size = vocab_size
        grammar = np.random.default_rng(grammar_seed)
        self.next_tokens = np.stack([grammar.choice(vocab_size, successors, replace=False) for _ in range(vocab_size)])
        self.next_probs = grammar.dirichlet(np.ones(successors), size=vocab_size)
        self._cumulative = np.cumsum(self.next_probs, axis=-1)

    def _sample(self, rng: np.random.Generator, batch_size: int, seq_len: int) -> np.ndarray:
        total = seq_len + 1
        half = total // 2
        seq = np.empty((batch_size, total), dtype=np.int32)
        seq[:, 0] = rng.integers(0, self.vocab_size, batch_size)
        u = rng.random((batch_size, half))
        for t in range(1, half):
            prev = seq[:, t - 1]
            pick = (u[:, t, None] > self._cumulative[prev]).sum(-1)
            seq[:, t] = self.next_tokens[prev, np.minimum(pick, self.next_tokens.shape[1] - 1)]
        # from `half` on, each token repeats the one `half` positions back
        seq[:, half:] = seq[:, np.arange(half, total) % half]
        return seq

    def batch(self, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        return self._sample(_rng(self.seed, _BATCH_STREAM, step), batch_size, seq_len)

    def probe(self, batch_size: int, seq_len: int) -> np.ndarray:
        return self._sample(_rng(self.seed, _PROBE_STREAM), batch_size, seq_len)

    def loss_floor(self, seq_len: int) -> float:
        """The best achievable mean cross-entropy (nats/token) for sequences of seq_len + 1.

        Targets 1 .. half-1 follow the chain (entropy of the next token given the previous,
        with the first token uniform); targets from `half` on repeat earlier tokens exactly.
        """
        half = (seq_len + 1) // 2
        p = np.full(self.vocab_size, 1.0 / self.vocab_size)
        row_entropy = -(self.next_probs * np.log(self.next_probs)).sum(-1)
        transition = np.zeros((self.vocab_size, self.vocab_size))
        for a in range(self.vocab_size):
            transition[a, self.next_tokens[a]] = self.next_probs[a]
        total = 0.0
        for _ in range(1, half):
            total += float(p @ row_entropy)
            p = p @ transition
        return total / seq_len

    def describe(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "successors": int(self.next_tokens.shape[1])}


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): works for any text, needs no files."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


class TextFile:
    """Random windows of seq_len + 1 tokens from one tokenized text file."""

    name = "text"

    def __init__(self, path, tokenizer, seed: int = 0, vocab_size: int | None = None):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"data file {path} does not exist")
        if not path.is_file():
            raise ValueError(f"data file {path} is not a regular file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"data file {path} is not UTF-8 text ({e})") from None
        if not text.strip():
            raise ValueError(f"data file {path} is empty")
        self.path = path
        self.seed = seed
        self.tokens = np.asarray(tokenizer.encode(text), dtype=np.int32)
        self.vocab_size = int(vocab_size or tokenizer.vocab_size)
        if self.tokens.size and int(self.tokens.max()) >= self.vocab_size:
            raise ValueError(
                f"the tokenizer produced id {int(self.tokens.max())}, outside the model's vocabulary of {self.vocab_size}"
            )

    def check_fits(self, batch_size: int, seq_len: int) -> None:
        need = batch_size * (seq_len + 1)
        if self.tokens.size < need:
            raise ValueError(
                f"data file {self.path} has {self.tokens.size} tokens, fewer than one batch needs "
                f"({batch_size} sequences x {seq_len + 1} tokens = {need}): the batch is larger than "
                "the data; lower --batch-size or --seq-len, or use more text"
            )

    def _windows(self, rng: np.random.Generator, batch_size: int, seq_len: int) -> np.ndarray:
        self.check_fits(batch_size, seq_len)
        starts = rng.integers(0, self.tokens.size - seq_len, batch_size)
        return np.stack([self.tokens[s : s + seq_len + 1] for s in starts])

    def batch(self, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        return self._windows(_rng(self.seed, _BATCH_STREAM, step), batch_size, seq_len)

    def probe(self, batch_size: int, seq_len: int) -> np.ndarray:
        return self._windows(_rng(self.seed, _PROBE_STREAM), batch_size, seq_len)

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.path), "tokens": int(self.tokens.size), "vocab_size": self.vocab_size}
