"""Puzzle datasets in the original HRM on-disk format (dataset/common.py, puzzle_dataset.py).

    DIR/identifiers.json                     ["<blank>", ...] (names of puzzle identifiers)
    DIR/{train,test}/dataset.json            the metadata below
    DIR/{train,test}/{set}__inputs.npy       [examples, seq_len] token ids
    DIR/{train,test}/{set}__labels.npy       [examples, seq_len] token ids
    DIR/{train,test}/{set}__puzzle_identifiers.npy  [puzzles] identifier of each puzzle
    DIR/{train,test}/{set}__puzzle_indices.npy      [puzzles + 1] example range of each puzzle
    DIR/{train,test}/{set}__group_indices.npy       [groups + 1] puzzle range of each group

A group is an original puzzle with its augmented copies; training draws one puzzle per group
per epoch, so augmentations add variety without multiplying the epoch length.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np

from .losses import IGNORE_LABEL_ID

FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
SPLITS = ("train", "test")


@dataclass
class DatasetMetadata:
    pad_id: int
    ignore_label_id: int | None
    blank_identifier_id: int
    vocab_size: int
    seq_len: int
    num_puzzle_identifiers: int
    total_groups: int
    mean_puzzle_examples: float
    sets: list

    @classmethod
    def from_json(cls, path: str) -> "DatasetMetadata":
        try:
            with open(path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); is this an HRM dataset?") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object of dataset metadata")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in raw]
        if missing:
            raise ValueError(f"{path} is not HRM dataset metadata: missing {', '.join(missing)}")
        meta = cls(**{n: raw[n] for n in names})
        for n in (
            "pad_id",
            "blank_identifier_id",
            "vocab_size",
            "seq_len",
            "num_puzzle_identifiers",
            "total_groups",
        ):
            v = getattr(meta, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{path}: {n} must be an int >= 0, got {v!r}")
        if meta.vocab_size < 1 or meta.seq_len < 1 or meta.num_puzzle_identifiers < 1:
            raise ValueError(f"{path}: vocab_size, seq_len and num_puzzle_identifiers must be >= 1")
        if not isinstance(meta.sets, list) or not meta.sets or not all(isinstance(s, str) for s in meta.sets):
            raise ValueError(f"{path}: sets must be a non-empty list of names, got {meta.sets!r}")
        return meta

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f)


def split_dir(path: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset directory {path!r} does not exist")
    d = os.path.join(path, split)
    if not os.path.isfile(os.path.join(d, "dataset.json")):
        raise FileNotFoundError(
            f"{d!r} has no dataset.json: not an HRM dataset split (make one with `mhc-mlx hrm data ...`)"
        )
    return d


def load_metadata(path: str, split: str) -> DatasetMetadata:
    return DatasetMetadata.from_json(os.path.join(split_dir(path, split), "dataset.json"))


def load_split(path: str, split: str) -> tuple[DatasetMetadata, dict]:
    """Metadata and {set name: {field: array}} of one split, checked for consistency."""
    d = split_dir(path, split)
    meta = DatasetMetadata.from_json(os.path.join(d, "dataset.json"))
    data = {}
    for set_name in meta.sets:
        arrays = {}
        for field in FIELDS:
            f = os.path.join(d, f"{set_name}__{field}.npy")
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f!r} is missing (dataset.json lists set {set_name!r})")
            try:
                arrays[field] = np.load(f, allow_pickle=False)
            except ValueError as e:
                raise ValueError(f"{f!r} is not a readable .npy array ({e})") from None
            if not np.issubdtype(arrays[field].dtype, np.integer):
                raise ValueError(f"{f!r} must hold integers, got dtype {arrays[field].dtype}")
        _check_set(meta, arrays, os.path.join(d, set_name))
        data[set_name] = arrays
    return meta, data


def _check_set(meta: DatasetMetadata, a: dict, where: str) -> None:
    inputs, labels = a["inputs"], a["labels"]
    if inputs.ndim != 2 or inputs.shape[1] != meta.seq_len:
        raise ValueError(f"{where}: inputs must be [examples, seq_len={meta.seq_len}], got {inputs.shape}")
    if labels.shape != inputs.shape:
        raise ValueError(f"{where}: labels {labels.shape} and inputs {inputs.shape} differ in shape")
    for name, arr in (("inputs", inputs), ("labels", labels)):
        if arr.size and (arr.min() < 0 or arr.max() >= meta.vocab_size):
            raise ValueError(
                f"{where}: {name} hold token ids {arr.min()}..{arr.max()}, outside the vocabulary "
                f"[0, {meta.vocab_size}) of dataset.json"
            )
    pi, gi, ids = a["puzzle_indices"], a["group_indices"], a["puzzle_identifiers"]
    if (
        pi.ndim != 1
        or pi.size != ids.size + 1
        or pi[0] != 0
        or pi[-1] != len(inputs)
        or np.any(np.diff(pi) < 1)
    ):
        raise ValueError(
            f"{where}: puzzle_indices must rise from 0 to {len(inputs)} with one entry per puzzle + 1"
        )
    if gi.ndim != 1 or gi[0] != 0 or gi[-1] != ids.size or np.any(np.diff(gi) < 1):
        raise ValueError(f"{where}: group_indices must rise from 0 to {ids.size} (the number of puzzles)")
    if ids.size and (ids.min() < 0 or ids.max() >= meta.num_puzzle_identifiers):
        raise ValueError(f"{where}: puzzle_identifiers must be in [0, {meta.num_puzzle_identifiers})")


def write_split(
    path: str,
    split: str,
    groups: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]],
    vocab_size: int,
    seq_len: int,
    set_name: str = "all",
) -> DatasetMetadata:
    """Write groups of puzzles (each puzzle one (input, label) example, identifier 0) as the
    original builders do: pad 0, ignore label 0, blank identifier 0, one identifier."""
    results = {k: [] for k in FIELDS}
    results["puzzle_indices"].append(0)
    results["group_indices"].append(0)
    examples = puzzles = 0
    for group in groups:
        for inp, out in group:
            results["inputs"].append(np.asarray(inp).reshape(-1))
            results["labels"].append(np.asarray(out).reshape(-1))
            examples += 1
            puzzles += 1
            results["puzzle_indices"].append(examples)
            results["puzzle_identifiers"].append(0)
        results["group_indices"].append(puzzles)
    arrays = {
        "inputs": np.stack(results["inputs"]).astype(np.uint8 if vocab_size <= 256 else np.int32),
        "labels": np.stack(results["labels"]).astype(np.uint8 if vocab_size <= 256 else np.int32),
        "puzzle_identifiers": np.array(results["puzzle_identifiers"], dtype=np.int32),
        "puzzle_indices": np.array(results["puzzle_indices"], dtype=np.int32),
        "group_indices": np.array(results["group_indices"], dtype=np.int32),
    }
    if arrays["inputs"].shape[1] != seq_len:
        raise ValueError(f"examples have {arrays['inputs'].shape[1]} cells, expected seq_len {seq_len}")
    meta = DatasetMetadata(
        pad_id=0,
        ignore_label_id=0,
        blank_identifier_id=0,
        vocab_size=vocab_size,
        seq_len=seq_len,
        num_puzzle_identifiers=1,
        total_groups=len(results["group_indices"]) - 1,
        mean_puzzle_examples=1,
        sets=[set_name],
    )
    d = os.path.join(path, split)
    os.makedirs(d, exist_ok=True)
    meta.to_json(os.path.join(d, "dataset.json"))
    for k, v in arrays.items():
        np.save(os.path.join(d, f"{set_name}__{k}.npy"), v)
    with open(os.path.join(path, "identifiers.json"), "w") as f:
        json.dump(["<blank>"], f)
    return meta


def check_fresh_output(path: str) -> None:
    """Refuse to write a dataset over an existing one."""
    for split in SPLITS:
        if os.path.exists(os.path.join(path, split, "dataset.json")):
            raise ValueError(f"{path!r} already holds a dataset ({split}/dataset.json); choose another --out")


def sample_batch(
    rng: np.random.Generator,
    group_order: np.ndarray,
    puzzle_indices: np.ndarray,
    group_indices: np.ndarray,
    start: int,
    batch_size: int,
) -> tuple[int, np.ndarray, np.ndarray]:
    """Fill one batch from groups in `group_order` from position `start`: a random puzzle of each
    group, then random examples of that puzzle. Returns (next start, example ids, puzzle ids)."""
    examples, puzzle_of = [], []
    size = 0
    while start < group_order.size and size < batch_size:
        group = group_order[start]
        puzzle = rng.integers(group_indices[group], group_indices[group + 1])
        start += 1
        first = puzzle_indices[puzzle]
        count = int(puzzle_indices[puzzle + 1] - first)
        take = min(count, batch_size - size)
        puzzle_of.append(np.full(take, puzzle, dtype=np.int32))
        # The original draws this with numpy's global RNG; the seeded one keeps runs reproducible.
        examples.append(first + rng.choice(count, take, replace=False))
        size += take
    return start, np.concatenate(examples), np.concatenate(puzzle_of)


class PuzzleDataset:
    """Batches of a split, as {"inputs", "labels", "puzzle_identifiers"} mx arrays (int32).

    train: endless epochs; each epoch shuffles the groups (Philox seeded by seed + epoch) and
    drops the last incomplete batch. test: every example once in order; the last batch is
    padded (pad inputs, ignored labels, the blank identifier) and reports its real size.
    """

    def __init__(self, path: str, split: str, batch_size: int, seed: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.path, self.split, self.batch_size, self.seed = path, split, batch_size, seed
        self.metadata, self.data = load_split(path, split)

    def __len__(self) -> int:
        return sum(len(d["inputs"]) for d in self.data.values())

    def collate(self, inputs: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> dict:
        batch = {
            "inputs": inputs.astype(np.int32),
            "labels": labels.astype(np.int32),
            "puzzle_identifiers": ids.astype(np.int32),
        }
        if self.metadata.ignore_label_id is not None:
            batch["labels"][batch["labels"] == self.metadata.ignore_label_id] = IGNORE_LABEL_ID
        pad = self.batch_size - batch["puzzle_identifiers"].size
        if pad > 0:
            values = {
                "inputs": self.metadata.pad_id,
                "labels": IGNORE_LABEL_ID,
                "puzzle_identifiers": self.metadata.blank_identifier_id,
            }
            batch = {
                k: np.pad(v, ((0, pad),) + ((0, 0),) * (v.ndim - 1), constant_values=values[k])
                for k, v in batch.items()
            }
        return {k: mx.array(v) for k, v in batch.items()}

    def iter_train(self, epochs_per_iter: int = 1) -> Iterator[tuple[str, dict, int]]:
        """Endless (set name, batch, real size): the same stream for the same seed."""
        it = 0
        while True:
            produced = 0
            for set_name, d in self.data.items():
                it += 1
                rng = np.random.Generator(np.random.Philox(seed=self.seed + it))
                groups = d["group_indices"].size - 1
                order = np.concatenate([rng.permutation(groups) for _ in range(epochs_per_iter)])
                start = 0
                while start < order.size:
                    start, rows, puzzles = sample_batch(
                        rng, order, d["puzzle_indices"], d["group_indices"], start, self.batch_size
                    )
                    if puzzles.size < self.batch_size:
                        break  # drop the last incomplete batch
                    produced += 1
                    batch = self.collate(
                        d["inputs"][rows], d["labels"][rows], d["puzzle_identifiers"][puzzles]
                    )
                    yield set_name, batch, puzzles.size
            if not produced:
                raise ValueError(
                    f"the {self.split} split of {self.path!r} is too small for batch_size {self.batch_size}: "
                    "an epoch yields no full batch (lower --batch-size or make more data)"
                )

    def iter_test(self) -> Iterator[tuple[str, dict, int]]:
        for set_name, d in self.data.items():
            n = len(d["inputs"])
            # Puzzle of each example, from puzzle_indices.
            puzzle_of = np.searchsorted(d["puzzle_indices"], np.arange(n), side="right") - 1
            for start in range(0, n, self.batch_size):
                end = min(n, start + self.batch_size)
                yield (
                    set_name,
                    self.collate(
                        d["inputs"][start:end],
                        d["labels"][start:end],
                        d["puzzle_identifiers"][puzzle_of[start:end]],
                    ),
                    end - start,
                )
