"""Helpers for the `mhc-mlx train` tests: run the command in-process, read its outputs."""

import hashlib
import json
import struct
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np

from mhc_mlx.cli.main import main

# A network small enough for a few steps in a second or two on a 2-core CPU.
TINY = [
    "--layers", "2", "--hidden-size", "16", "--heads", "2", "--intermediate-size", "32",
    "--batch-size", "4", "--seq-len", "16", "--no-progress",
]


def train(*args) -> int:
    return main(["train", *map(str, args)])


def metrics(out) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text())


def latest_checkpoint(out) -> Path:
    root = Path(out) / "checkpoints"
    return root / (root / "latest").read_text().strip()


def weights(out, mode: str, kind: str = "model") -> dict:
    return mx.load(str(latest_checkpoint(out) / f"{mode}.{kind}.safetensors"))


def flat(params: dict) -> np.ndarray:
    return np.concatenate([np.array(params[k], dtype=np.float64).ravel() for k in sorted(params)])


def snapshot(directory) -> dict:
    """{relative path: sha256} of every file under directory (to prove nothing changed)."""
    root = Path(directory)
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def png_chunks(path) -> list[tuple[bytes, bytes]]:
    """Parse a PNG, checking its signature and every chunk's CRC; returns [(type, data)]."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, f"bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    return chunks
