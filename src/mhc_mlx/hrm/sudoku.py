"""Offline Sudoku generator: unique-solution puzzles of size k x k (4, 6, 9, ...), the
original's validity-preserving augmentations, written in the original format
(dataset/build_sudoku_dataset.py: cells stored as value + 1, so 1 = blank and 0 = padding;
labels are the full solution).

Puzzles are made by filling a random grid and then blanking cells in random order, keeping a
blank only while the puzzle still has exactly one solution: every puzzle is minimal for its
removal order (no given can be taken away) unless `max_blanks` stops the removal earlier.
"""

from __future__ import annotations

import math

import numpy as np

from .dataset import check_fresh_output, write_split


def box_shape(size: int) -> tuple[int, int]:
    """(rows, cols) of a box: 4 -> 2x2, 6 -> 2x3, 8 -> 2x4, 9 -> 3x3, 12 -> 3x4, 16 -> 4x4."""
    if isinstance(size, bool) or not isinstance(size, int) or not 4 <= size <= 16:
        raise ValueError(f"Sudoku size must be an int in 4..16, got {size!r}")
    rows = max(d for d in range(1, math.isqrt(size) + 1) if size % d == 0)
    if rows == 1:
        raise ValueError(f"Sudoku size {size} is prime: it has no rectangular boxes")
    return rows, size // rows


class Board:
    """Candidate bookkeeping with bitmasks for a k x k grid (0 = blank, digits 1..k)."""

    def __init__(self, size: int):
        self.size = size
        self.box_rows, self.box_cols = box_shape(size)
        self.full = (1 << (size + 1)) - 2  # bits 1..k
        self.cells = size * size
        rc = [divmod(i, size) for i in range(self.cells)]
        self.unit_of = [
            (r, c, (r // self.box_rows) * (size // self.box_cols) + c // self.box_cols) for r, c in rc
        ]

    def count_solutions(
        self,
        grid: np.ndarray,
        limit: int = 2,
        rng: np.random.Generator | None = None,
        out: list | None = None,
    ) -> int:
        """Solutions of `grid` (flat, 0 = blank) up to `limit`; with `out`, the first is appended.

        Depth-first search on the most constrained blank; `rng` randomises the digit order
        (used to fill an empty grid at random).
        """
        k = self.size
        rows, cols, boxes = [0] * k, [0] * k, [0] * k
        g = [int(v) for v in grid]
        for i, v in enumerate(g):
            if v:
                r, c, b = self.unit_of[i]
                bit = 1 << v
                if (rows[r] | cols[c] | boxes[b]) & bit:
                    return 0  # a digit repeats in a unit
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
        blanks = [i for i, v in enumerate(g) if not v]
        found = 0

        def search() -> bool:
            nonlocal found
            best, best_mask, best_n = -1, 0, k + 1
            for i in blanks:
                if g[i]:
                    continue
                r, c, b = self.unit_of[i]
                mask = self.full & ~(rows[r] | cols[c] | boxes[b])
                n = bin(mask).count("1")
                if n < best_n:
                    best, best_mask, best_n = i, mask, n
                    if n <= 1:
                        break
            if best < 0:
                found += 1
                if out is not None and found == 1:
                    out.append(np.array(g, dtype=np.int64))
                return found >= limit
            if best_n == 0:
                return False
            digits = [d for d in range(1, k + 1) if best_mask >> d & 1]
            if rng is not None:
                rng.shuffle(digits)
            r, c, b = self.unit_of[best]
            for d in digits:
                bit = 1 << d
                g[best] = d
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
                stop = search()
                rows[r] &= ~bit
                cols[c] &= ~bit
                boxes[b] &= ~bit
                g[best] = 0
                if stop:
                    return True
            return False

        search()
        return found

    def random_solution(self, rng: np.random.Generator) -> np.ndarray:
        out: list = []
        self.count_solutions(np.zeros(self.cells, np.int64), limit=1, rng=rng, out=out)
        return out[0]

    def make_puzzle(
        self, rng: np.random.Generator, max_blanks: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(puzzle, solution), flat, 0 = blank; the puzzle has exactly one solution."""
        solution = self.random_solution(rng)
        puzzle = solution.copy()
        blanks = 0
        for i in rng.permutation(self.cells):
            if max_blanks is not None and blanks >= max_blanks:
                break
            keep = puzzle[i]
            puzzle[i] = 0
            if self.count_solutions(puzzle, limit=2) == 1:
                blanks += 1
            else:
                puzzle[i] = keep
        return puzzle, solution


def shuffle_sudoku(
    board: np.ndarray, solution: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The original's augmentation, generalised to r x c boxes: relabel the digits, permute the
    bands (groups of r rows) and the rows inside each band, the stacks (groups of c columns) and
    the columns inside each stack, and transpose when boxes are square (r = c). Each keeps every
    row, column and box a row, column or box, so solutions stay solutions and stay unique."""
    k = board.shape[0]
    r, c = box_shape(k)
    digit_map = np.concatenate([[0], rng.permutation(np.arange(1, k + 1))])
    transpose = r == c and rng.random() < 0.5
    row_perm = np.concatenate([band * r + rng.permutation(r) for band in rng.permutation(k // r)])
    col_perm = np.concatenate([stack * c + rng.permutation(c) for stack in rng.permutation(k // c)])

    def apply(x: np.ndarray) -> np.ndarray:
        if transpose:
            x = x.T
        return digit_map[x[row_perm][:, col_perm]]

    return apply(board), apply(solution)


def generate(
    size: int,
    num_train: int,
    num_test: int,
    seed: int,
    num_aug: int = 0,
    max_blanks: int | None = None,
    progress=None,
) -> tuple[list, list]:
    """Train groups (each: a puzzle and `num_aug` augmented copies) and test groups (one puzzle).

    No test puzzle equals any train puzzle or augmented copy, or another test puzzle.
    """
    for name, v in (("num_train", num_train), ("num_test", num_test), ("num_aug", num_aug)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    board = Board(size)
    if max_blanks is not None and not 1 <= max_blanks <= board.cells:
        raise ValueError(f"max_blanks must be in 1..{board.cells}, got {max_blanks}")
    rng = np.random.default_rng(seed)
    seen: set = set()
    train, test = [], []
    attempts = 0
    limit = 50 * (num_train + num_test) + 1000
    for target, out, aug in ((num_train, train, num_aug), (num_test, test, 0)):
        while len(out) < target:
            attempts += 1
            if attempts > limit:
                raise ValueError(
                    f"could not find {num_train + num_test} distinct {size}x{size} puzzles "
                    f"(found {len(train) + len(test)}); ask for fewer"
                )
            puzzle, solution = board.make_puzzle(rng, max_blanks)
            if puzzle.tobytes() in seen:
                continue
            p, s = puzzle.reshape(size, size), solution.reshape(size, size)
            group = [(p, s)] + [shuffle_sudoku(p, s, rng) for _ in range(aug)]
            for inp, _ in group:
                seen.add(inp.astype(np.int64).reshape(-1).tobytes())
            out.append(group)
            if progress is not None:
                progress.update(1)
    return train, test


def encode(group: list) -> list:
    """Cells as value + 1 (blank 0 -> 1; padding keeps 0), as the original stores them."""
    return [(inp.reshape(-1) + 1, out.reshape(-1) + 1) for inp, out in group]


def build_dataset(
    out_dir: str,
    size: int,
    num_train: int,
    num_test: int,
    seed: int,
    num_aug: int = 0,
    max_blanks: int | None = None,
    progress=None,
) -> dict:
    """Generate and write DIR/{train,test}; returns the two metadata objects by split."""
    box_shape(size)
    check_fresh_output(out_dir)
    if num_train < 1 or num_test < 1:
        raise ValueError("need at least one train and one test puzzle")
    train, test = generate(size, num_train, num_test, seed, num_aug, max_blanks, progress)
    vocab = size + 2  # PAD, blank, digits 1..k
    return {
        split: write_split(out_dir, split, [encode(g) for g in groups], vocab_size=vocab, seq_len=size * size)
        for split, groups in (("train", train), ("test", test))
    }
