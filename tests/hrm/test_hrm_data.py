"""Offline data: generated Sudoku and mazes are valid and uniquely solvable (checked by solvers
written here, independent of the generators), in the original on-disk format; the loader and
its sampler; clear errors for bad datasets."""

import json
import os
from collections import deque

import mlx.core as mx
import numpy as np
import pytest

from mhc_mlx.hrm import IGNORE_LABEL_ID, PuzzleDataset
from mhc_mlx.hrm import maze, sudoku
from mhc_mlx.hrm.dataset import load_split
from mhc_mlx.hrm.training import check_compatible, model_config_for

BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}


# ----- an independent Sudoku solver (sets, not bitmasks) -------------------------------------


def units(k):
    r, c = BOXES[k]
    out = [[(i, j) for j in range(k)] for i in range(k)] + [[(i, j) for i in range(k)] for j in range(k)]
    for bi in range(0, k, r):
        for bj in range(0, k, c):
            out.append([(bi + a, bj + b) for a in range(r) for b in range(c)])
    return out


def solutions(grid, limit=2):
    k = grid.shape[0]
    peers = {}
    for u in units(k):
        for cell in u:
            peers.setdefault(cell, set()).update(u)
    grid = grid.copy()
    found = []

    def rec():
        best, cands = None, None
        for i in range(k):
            for j in range(k):
                if grid[i, j] == 0:
                    c = set(range(1, k + 1)) - {grid[p] for p in peers[(i, j)]}
                    if best is None or len(c) < len(cands):
                        best, cands = (i, j), c
        if best is None:
            found.append(grid.copy())
            return len(found) >= limit
        for d in sorted(cands):
            grid[best] = d
            if rec():
                return True
        grid[best] = 0
        return False

    rec()
    return found


def is_valid_solution(sol):
    k = sol.shape[0]
    return all(sorted(sol[p] for p in u) == list(range(1, k + 1)) for u in units(k))


def read(d, split):
    meta, data = load_split(str(d), split)
    return meta, data["all"]


@pytest.mark.parametrize("size,n_train,n_test,aug", [(4, 12, 6, 3), (6, 6, 4, 2), (9, 2, 1, 1)])
def test_sudoku_puzzles_are_valid_and_uniquely_solvable(tmp_path, size, n_train, n_test, aug):
    out = tmp_path / f"s{size}"
    sudoku.build_dataset(str(out), size, n_train, n_test, seed=5, num_aug=aug)
    assert json.load(open(out / "identifiers.json")) == ["<blank>"]
    seen_train = set()
    for split, groups, per_group in (("train", n_train, 1 + aug), ("test", n_test, 1)):
        meta, d = read(out, split)
        assert (meta.vocab_size, meta.seq_len) == (size + 2, size * size)
        assert (meta.pad_id, meta.ignore_label_id, meta.blank_identifier_id, meta.num_puzzle_identifiers) == (
            0,
            0,
            0,
            1,
        )
        assert meta.total_groups == groups and meta.sets == ["all"]
        assert np.array_equal(d["group_indices"], np.arange(groups + 1) * per_group)
        assert np.array_equal(d["puzzle_indices"], np.arange(groups * per_group + 1))
        inputs, labels = d["inputs"].astype(int) - 1, d["labels"].astype(int) - 1  # stored as value + 1
        assert inputs.min() >= 0 and labels.min() >= 1  # no padding; labels are full solutions
        for inp, lab in zip(inputs, labels):
            grid, sol = inp.reshape(size, size), lab.reshape(size, size)
            assert is_valid_solution(sol)
            assert np.all((grid == 0) | (grid == sol))
            found = solutions(grid)
            assert len(found) == 1 and np.array_equal(found[0], sol)
        keys = {r.tobytes() for r in d["inputs"]}
        assert len(keys) == len(d["inputs"])  # no duplicates inside a split
        if split == "train":
            seen_train = keys
        else:
            assert not keys & seen_train  # held out: no test puzzle appears in train


def test_sudoku_augmentations_preserve_the_puzzle_structure(tmp_path):
    sudoku.build_dataset(str(tmp_path / "d"), 6, 3, 1, seed=1, num_aug=4)
    _, d = read(tmp_path / "d", "train")
    for g in range(3):
        lo, hi = d["group_indices"][g], d["group_indices"][g + 1]
        base = d["inputs"][lo]
        for p in range(lo + 1, hi):
            assert (d["inputs"][p] == 1).sum() == (base == 1).sum()  # same number of blanks
            assert not np.array_equal(d["inputs"][p], base) or hi - lo == 1


def test_sudoku_generation_is_deterministic_by_seed(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        sudoku.build_dataset(str(tmp_path / name), 4, 10, 3, seed=seed, num_aug=2)
    a, b, c = (read(tmp_path / n, "train")[1]["inputs"] for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sudoku_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="prime"):
        sudoku.build_dataset(str(tmp_path / "x"), 7, 1, 1, seed=0)
    with pytest.raises(ValueError, match="4..16"):
        sudoku.build_dataset(str(tmp_path / "x"), 3, 1, 1, seed=0)
    sudoku.build_dataset(str(tmp_path / "x"), 4, 2, 1, seed=0)
    with pytest.raises(ValueError, match="already holds a dataset"):
        sudoku.build_dataset(str(tmp_path / "x"), 4, 2, 1, seed=0)


# ----- mazes ---------------------------------------------------------------------------------

WALL, OPEN, START, GOAL, PATH = 1, 2, 3, 4, 5  # "# SGo" -> 1..5


def bfs_counts(grid, src):
    dist = {src: 0}
    ways = {src: 1}
    q = deque([src])
    while q:
        r, c = q.popleft()
        for n in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= n[0] < grid.shape[0] and 0 <= n[1] < grid.shape[1] and grid[n] != WALL:
                if n not in dist:
                    dist[n] = dist[(r, c)] + 1
                    ways[n] = 0
                    q.append(n)
                if dist[n] == dist[(r, c)] + 1:
                    ways[n] += ways[(r, c)]
    return dist, ways


def test_mazes_label_the_unique_shortest_path(tmp_path):
    size = 9
    maze.build_dataset(str(tmp_path / "m"), size, 4, 3, seed=2, aug=True, min_path=6, loops=0.2)
    for split, per_group in (("train", 8), ("test", 1)):
        meta, d = read(tmp_path / "m", split)
        assert (meta.vocab_size, meta.seq_len) == (6, size * size)
        assert np.array_equal(np.diff(d["group_indices"]), np.full(meta.total_groups, per_group))
        for inp, lab in zip(d["inputs"].astype(int), d["labels"].astype(int)):
            grid, label = inp.reshape(size, size), lab.reshape(size, size)
            assert set(np.unique(grid)) <= {WALL, OPEN, START, GOAL}
            assert (grid == START).sum() == 1 and (grid == GOAL).sum() == 1
            s, g = tuple(np.argwhere(grid == START)[0]), tuple(np.argwhere(grid == GOAL)[0])
            dist, ways = bfs_counts(grid, s)
            assert g in dist and ways[g] == 1 and dist[g] >= 6
            # The label is the input with exactly the cells of that shortest path marked.
            path = np.argwhere(label == PATH)
            assert np.array_equal(np.where(label == PATH, OPEN, label), grid)
            assert len(path) == dist[g] - 1
            from_goal, _ = bfs_counts(grid, g)
            for cell in map(tuple, path):
                assert dist[cell] + from_goal[cell] == dist[g]  # on a shortest path


def test_maze_generation_is_deterministic_and_checks_arguments(tmp_path):
    for n in "ab":
        maze.build_dataset(str(tmp_path / n), 7, 3, 1, seed=9)
    assert np.array_equal(
        read(tmp_path / "a", "train")[1]["labels"], read(tmp_path / "b", "train")[1]["labels"]
    )
    with pytest.raises(ValueError, match=">= 5"):
        maze.build_dataset(str(tmp_path / "c"), 3, 1, 1, seed=0)
    with pytest.raises(ValueError, match="lower --min-path"):
        maze.build_dataset(str(tmp_path / "d"), 5, 1, 1, seed=0, min_path=100)


def test_dihedral_transforms_match_the_original_numbering():
    a = np.arange(12).reshape(3, 4)
    expect = [
        a,
        np.rot90(a, 1),
        np.rot90(a, 2),
        np.rot90(a, 3),
        np.fliplr(a),
        np.flipud(a),
        a.T,
        np.fliplr(np.rot90(a, 1)),
    ]
    for t in range(8):
        assert np.array_equal(maze.dihedral_transform(a, t), expect[t])
        assert np.array_equal(
            maze.dihedral_transform(maze.dihedral_transform(a, t), maze.DIHEDRAL_INVERSE[t]), a
        )


# ----- the loader and its sampler ------------------------------------------------------------


@pytest.fixture(scope="module")
def small_sudoku(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "s4"
    sudoku.build_dataset(str(d), 4, 20, 7, seed=0, num_aug=2)
    return str(d)


def test_train_batches_draw_each_group_once_per_epoch(small_sudoku):
    ds = PuzzleDataset(small_sudoku, "train", batch_size=4, seed=1)
    _, d = read(small_sudoku, "train")
    stream = ds.iter_train()
    groups = []
    for _ in range(5):  # 20 groups / 4 = one epoch
        _, batch, n = next(stream)
        assert n == 4 and batch["inputs"].shape == (4, 16) and batch["inputs"].dtype == mx.int32
        rows = np.array(batch["inputs"])
        for r in rows:
            puzzle = int(np.nonzero((d["inputs"] == r).all(1))[0][0])
            groups.append(int(np.searchsorted(d["group_indices"], puzzle, side="right") - 1))
    assert sorted(groups) == list(range(20))
    # Same seed, same stream.
    again = PuzzleDataset(small_sudoku, "train", batch_size=4, seed=1).iter_train()
    first = next(again)[1]
    assert mx.array_equal(
        first["inputs"],
        next(PuzzleDataset(small_sudoku, "train", batch_size=4, seed=1).iter_train())[1]["inputs"],
    )


def test_test_batches_cover_every_example_once_and_pad_the_last(small_sudoku):
    ds = PuzzleDataset(small_sudoku, "test", batch_size=3)
    _, d = read(small_sudoku, "test")
    seen, sizes = [], []
    for _, batch, n in ds.iter_test():
        sizes.append(n)
        inputs, labels = np.array(batch["inputs"]), np.array(batch["labels"])
        seen.extend(inputs[:n])
        assert np.all(inputs[n:] == 0) and np.all(labels[n:] == IGNORE_LABEL_ID)
    assert sizes == [3, 3, 1]
    assert np.array_equal(np.array(seen), d["inputs"].astype(np.int32))


def test_ignore_label_becomes_minus_100(tmp_path):
    d = tmp_path / "pad"
    sudoku.build_dataset(str(d), 4, 2, 1, seed=0)
    labels = np.load(d / "test" / "all__labels.npy")
    labels[0, :3] = 0  # padding cells: the metadata's ignore_label_id
    np.save(d / "test" / "all__labels.npy", labels)
    batch = next(PuzzleDataset(str(d), "test", batch_size=1).iter_test())[1]
    assert np.array(batch["labels"])[0, :3].tolist() == [IGNORE_LABEL_ID] * 3


# ----- bad datasets: clear errors ------------------------------------------------------------


def test_missing_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PuzzleDataset(str(tmp_path / "nope"), "train", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        PuzzleDataset(str(tmp_path / "empty"), "train", 4)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_wrong_format(tmp_path, small_sudoku):
    d = _copy(small_sudoku, tmp_path / "a")
    (d / "train" / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PuzzleDataset(str(d), "train", 4)
    (d / "train" / "dataset.json").write_text(json.dumps({"seq_len": 16}))
    with pytest.raises(ValueError, match="missing pad_id"):
        PuzzleDataset(str(d), "train", 4)

    d = _copy(small_sudoku, tmp_path / "b")
    os.remove(d / "train" / "all__labels.npy")
    with pytest.raises(FileNotFoundError, match="all__labels.npy"):
        PuzzleDataset(str(d), "train", 4)

    d = _copy(small_sudoku, tmp_path / "c")
    np.save(d / "train" / "all__inputs.npy", np.load(d / "train" / "all__inputs.npy")[:, :9])
    with pytest.raises(ValueError, match="seq_len=16"):
        PuzzleDataset(str(d), "train", 4)

    d = _copy(small_sudoku, tmp_path / "e")
    np.save(d / "train" / "all__inputs.npy", np.load(d / "train" / "all__inputs.npy").astype(np.float32))
    with pytest.raises(ValueError, match="must hold integers"):
        PuzzleDataset(str(d), "train", 4)

    d = _copy(small_sudoku, tmp_path / "f")
    gi = np.load(d / "train" / "all__group_indices.npy")
    np.save(d / "train" / "all__group_indices.npy", gi[:-1])
    with pytest.raises(ValueError, match="group_indices"):
        PuzzleDataset(str(d), "train", 4)


def test_mismatched_vocabulary(tmp_path, small_sudoku):
    # Tokens outside the declared vocabulary.
    d = _copy(small_sudoku, tmp_path / "v")
    meta = json.loads((d / "train" / "dataset.json").read_text())
    meta["vocab_size"] = 4
    (d / "train" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        PuzzleDataset(str(d), "train", 4)
    # A model built for another dataset.
    s6 = tmp_path / "s6"
    sudoku.build_dataset(str(s6), 6, 2, 1, seed=0)
    four = PuzzleDataset(small_sudoku, "train", 4).metadata
    six = PuzzleDataset(str(s6), "train", 1).metadata
    with pytest.raises(ValueError, match="vocab_size 8 but the model was built for 6"):
        check_compatible(model_config_for(four, hidden_size=16, num_heads=2), six, "s6")


def test_batch_larger_than_the_data(small_sudoku):
    with pytest.raises(ValueError, match="too small for batch_size 64"):
        next(PuzzleDataset(small_sudoku, "train", 64).iter_train())
