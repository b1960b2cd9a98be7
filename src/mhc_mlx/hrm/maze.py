"""Offline maze generator in the original format (dataset/build_maze_dataset.py): characters
"# SGo" -> ids 1..5 (0 = padding): wall, open, start, goal, path. The input is the maze with S
and G; the label is the same maze with the unique shortest S -> G path marked "o".

Mazes are carved by a randomised depth-first search on the odd cells of an N x N grid (a
perfect maze: exactly one path between two cells); `loops` knocks out a fraction of the
remaining inner walls to add cycles, and S/G pairs are then kept only if their shortest path is
unique and at least `min_path` steps long.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .dataset import check_fresh_output, write_split

CHARSET = "# SGo"
WALL, OPEN, START, GOAL, PATH = (CHARSET.index(ch) + 1 for ch in CHARSET)
DIHEDRAL_INVERSE = [0, 3, 2, 1, 4, 5, 6, 7]


def dihedral_transform(arr: np.ndarray, tid: int) -> np.ndarray:
    """The 8 symmetries of the square, numbered as the original (dataset/common.py)."""
    return [
        lambda a: a,
        lambda a: np.rot90(a, 1),
        lambda a: np.rot90(a, 2),
        lambda a: np.rot90(a, 3),
        np.fliplr,
        np.flipud,
        lambda a: a.T,
        lambda a: np.fliplr(np.rot90(a, 1)),
    ][tid](arr)


def carve(size: int, rng: np.random.Generator, loops: float = 0.0) -> np.ndarray:
    """[size, size] grid of WALL / OPEN: a perfect maze on the odd cells, plus optional loops."""
    grid = np.full((size, size), WALL, np.int64)
    cells = (size - 1) // 2
    start = (1 + 2 * rng.integers(cells), 1 + 2 * rng.integers(cells))
    grid[start] = OPEN
    stack = [start]
    while stack:
        r, c = stack[-1]
        nbrs = [
            (r + dr, c + dc)
            for dr, dc in ((-2, 0), (2, 0), (0, -2), (0, 2))
            if 0 < r + dr < size - 1 and 0 < c + dc < size - 1 and grid[r + dr, c + dc] == WALL
        ]
        if not nbrs:
            stack.pop()
            continue
        nr, nc = nbrs[rng.integers(len(nbrs))]
        grid[(r + nr) // 2, (c + nc) // 2] = OPEN
        grid[nr, nc] = OPEN
        stack.append((nr, nc))
    if loops > 0:
        # Inner walls between two open cells, in a line: removing one adds a cycle.
        walls = [
            (r, c)
            for r in range(1, size - 1)
            for c in range(1, size - 1)
            if grid[r, c] == WALL
            and (
                (grid[r - 1, c] == OPEN and grid[r + 1, c] == OPEN)
                or (grid[r, c - 1] == OPEN and grid[r, c + 1] == OPEN)
            )
        ]
        for i in rng.permutation(len(walls))[: int(round(loops * len(walls)))]:
            grid[walls[i]] = OPEN
    return grid


def bfs(grid: np.ndarray, source: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Distances from source over non-wall cells (-1: unreachable) and shortest-path counts."""
    dist = np.full(grid.shape, -1, np.int64)
    ways = np.zeros(grid.shape, np.int64)
    dist[source], ways[source] = 0, 1
    queue = deque([source])
    while queue:
        r, c = queue.popleft()
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < grid.shape[0] and 0 <= nc < grid.shape[1] and grid[nr, nc] != WALL:
                if dist[nr, nc] < 0:
                    dist[nr, nc] = dist[r, c] + 1
                    queue.append((nr, nc))
                if dist[nr, nc] == dist[r, c] + 1:
                    ways[nr, nc] = min(ways[nr, nc] + ways[r, c], 2)  # 2 means "more than one"
    return dist, ways


def shortest_path(grid: np.ndarray, start: tuple[int, int], goal: tuple[int, int]) -> list | None:
    """The cells of the unique shortest start -> goal path, or None if none or not unique."""
    dist, ways = bfs(grid, start)
    if dist[goal] < 0 or ways[goal] != 1:
        return None
    path = [goal]
    while path[-1] != start:
        r, c = path[-1]
        path.append(
            next(
                (nr, nc)
                for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1))
                if 0 <= nr < grid.shape[0] and 0 <= nc < grid.shape[1] and dist[nr, nc] == dist[r, c] - 1
            )
        )
    return path[::-1]


def make_maze(
    size: int, rng: np.random.Generator, min_path: int, loops: float = 0.0, tries: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """(input, label) token grids with a unique shortest path of >= min_path steps."""
    for _ in range(tries):
        grid = carve(size, rng, loops)
        open_cells = np.argwhere(grid == OPEN)
        for _ in range(20):
            a, b = rng.choice(len(open_cells), 2, replace=False)
            start, goal = tuple(open_cells[a]), tuple(open_cells[b])
            path = shortest_path(grid, start, goal)
            if path is None or len(path) - 1 < min_path:
                continue
            inp = grid.copy()
            inp[start], inp[goal] = START, GOAL
            label = inp.copy()
            for cell in path[1:-1]:
                label[cell] = PATH
            return inp, label
    raise ValueError(
        f"no {size}x{size} maze with a unique shortest path of >= {min_path} steps in {tries} tries; "
        "lower --min-path"
    )


def generate(
    size: int,
    num_train: int,
    num_test: int,
    seed: int,
    aug: bool = False,
    min_path: int | None = None,
    loops: float = 0.0,
    progress=None,
) -> tuple[list, list]:
    if isinstance(size, bool) or not isinstance(size, int) or size < 5:
        raise ValueError(f"maze size must be an int >= 5, got {size!r}")
    if not 0.0 <= loops <= 1.0:
        raise ValueError(f"loops must be in [0, 1], got {loops}")
    min_path = size if min_path is None else min_path
    if min_path < 1:
        raise ValueError(f"min_path must be >= 1, got {min_path}")
    rng = np.random.default_rng(seed)
    seen: set = set()
    train, test = [], []
    for target, out, n_aug in ((num_train, train, 8 if aug else 1), (num_test, test, 1)):
        misses = 0
        while len(out) < target:
            inp, label = make_maze(size, rng, min_path, loops)
            if inp.tobytes() in seen:
                misses += 1
                if misses > 100 * target + 100:
                    raise ValueError(f"could not find {target} distinct mazes of size {size}; ask for fewer")
                continue
            group = [(dihedral_transform(inp, t), dihedral_transform(label, t)) for t in range(n_aug)]
            for g_inp, _ in group:
                seen.add(np.ascontiguousarray(g_inp).tobytes())
            out.append(group)
            if progress is not None:
                progress.update(1)
    return train, test


def build_dataset(
    out_dir: str,
    size: int,
    num_train: int,
    num_test: int,
    seed: int,
    aug: bool = False,
    min_path: int | None = None,
    loops: float = 0.0,
    progress=None,
) -> dict:
    check_fresh_output(out_dir)
    if num_train < 1 or num_test < 1:
        raise ValueError("need at least one train and one test maze")
    train, test = generate(size, num_train, num_test, seed, aug, min_path, loops, progress)
    return {
        split: write_split(out_dir, split, groups, vocab_size=len(CHARSET) + 1, seq_len=size * size)
        for split, groups in (("train", train), ("test", test))
    }
