"""How figures are measured (SPEC section 5), shared by every row of `mhc-mlx bench`.

- latency: wall time of one call *and* its mx.eval, median over repeats: what a decoding user
  sees, Python graph building included.
- throughput: K independent applications on K rotated inputs, built first, then timed in one
  mx.eval and divided by K: the fixed per-eval cost is amortised as in a real network, and
  the inputs together exceed the GPU's L2 so no application reads a cached input.
- copy floor: a large `x * 1.5`, bytes read + written over its time (run.py measures it before
  and after the rows and keeps the faster).
- pipelined throughput (`--pipelined`): several such evals handed to MLX back to back, so the
  host work for one overlaps the GPU's run of the last (pipelined_throughput_us).
- tiny op: one eval of one op on a 1-element array (the fixed cost of an eval).
- paired latency: a latency row and the tiny op timed in alternating rounds, so that the B = 1
  ratios compare the two under the same host and GPU state (paired_latency_us).
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx

L2_BYTES = 64 * 2**20  # larger than any current GPU's L2 (H100: 50 MB)


def _sync():
    mx.synchronize()


def latency_us(fn, args, repeats: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        mx.eval(fn(*args))
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def paired_latency_us(fn, args, repeats: int = 100, rounds: int = 5) -> dict:
    """A latency row and the tiny op in `rounds` alternating rounds (the order flips each round),
    each round a median over repeats // rounds calls: {"us", "tiny_us", "ratio", "rounds"}, with us
    and tiny_us the medians of the rounds' medians and ratio the median of the rounds' ratios.
    Why: the eval's fixed cost moves within one process (an H200 run of 2026-11-30 measured the
    tiny op at 65.0 µs before its B = 1 rows and 33.6 after them), so a ratio of two figures
    taken minutes apart measured the process's state as much as the row."""
    if rounds < 1 or repeats < rounds:
        raise ValueError(f"paired_latency_us needs 1 <= rounds <= repeats, got rounds={rounds}, repeats={repeats}")
    tiny_in = mx.array([1.0])
    mx.eval(tiny_in)
    calls = {"tiny": (lambda v: v + 1.0, [tiny_in]), "row": (fn, args)}
    pairs = []
    for r in range(rounds):
        timed = {which: latency_us(*calls[which], repeats=repeats // rounds)
                 for which in (("tiny", "row") if r % 2 == 0 else ("row", "tiny"))}
        pairs.append((timed["tiny"], timed["row"]))
    return {"us": statistics.median(u for _, u in pairs), "tiny_us": statistics.median(t for t, _ in pairs),
            "ratio": statistics.median(u / t for t, u in pairs), "rounds": [list(p) for p in pairs]}


def rotation(bytes_per_application: int, minimum: int = 10, maximum: int = 64) -> int:
    """How many independent inputs K make K applications read more than the L2 holds."""
    need = -(-L2_BYTES // max(1, bytes_per_application))
    return max(minimum, min(maximum, need))


def _wall_per_application(fn, input_sets, evals: int, repeats: int, warmup: int, hand_over) -> float:
    """Median over repeats of the wall time of hand_over(batches) / (evals K), where batches are
    `evals` lists of the K applications' outputs, every graph built before the clock."""
    K = len(input_sets)
    for _ in range(warmup):
        mx.eval([fn(*a) for a in input_sets])
    _sync()
    times = []
    for _ in range(repeats):
        batches = [[fn(*a) for a in input_sets] for _ in range(evals)]
        _sync()
        t0 = time.perf_counter()
        hand_over(batches)
        times.append(time.perf_counter() - t0)
        del batches
    return 1e6 * statistics.median(times) / (evals * K)


def throughput_us(fn, input_sets, repeats: int = 10, warmup: int = 2) -> float:
    """Median over repeats of (one eval of all applications) / K, graph built before the clock."""
    return _wall_per_application(fn, input_sets, 1, repeats, warmup, lambda batches: mx.eval(batches[0]))


def _one_after_another(batches) -> None:
    for outs in batches:
        mx.async_eval(outs)
    _sync()


def pipelined_throughput_us(fn, input_sets, evals: int = 4, repeats: int = 5, warmup: int = 1) -> float:
    """As throughput_us, but `evals` evals of the K applications handed to MLX back to back by
    mx.async_eval, every graph built before the clock; median over repeats of wall / (evals K).
    Why: within one eval the GPU does not overlap all of MLX's host work for it (H200,
    docs/kernel-notes.md row 69: the static layer's one eval took 107-119 µs per application
    against a traced GPU span of 77.1, and a CUDA graph every ~4 launches instead of 100 changed
    nothing). Handed over one after another, one eval's host work overlaps the GPU's run of the
    last, as in a training loop with many sites per step or mlx-lm's generation loop: the figure
    is the pipeline's rate, bounded below by the GPU's time."""
    if evals < 1 or repeats < 1:
        raise ValueError(f"pipelined_throughput_us needs evals >= 1 and repeats >= 1, got {evals}, {repeats}")
    return _wall_per_application(fn, input_sets, evals, repeats, warmup, _one_after_another)


def copy_floor(array_bytes: int = 128 << 20, dtype=mx.bfloat16, repeats: int = 10, pipelined: bool = False) -> dict:
    """Copy bandwidth of `x * 1.5`, timed like the throughput rows (K rotated inputs of
    array_bytes each, one eval; pipelined: as pipelined_throughput_us): bytes read + written per
    second."""
    n = array_bytes // dtype.size
    K = rotation(2 * array_bytes)
    xs = [mx.random.normal((n,)).astype(dtype) for _ in range(K)]
    mx.eval(xs)
    timer = pipelined_throughput_us if pipelined else throughput_us
    us = timer(lambda a: a * 1.5, [[x] for x in xs], repeats=repeats)
    return {"bytes": 2 * n * dtype.size, "us": us, "GBps": 2 * n * dtype.size / us / 1e3}


def tiny_op_us(repeats: int = 200) -> float:
    a = mx.array([1.0])
    mx.eval(a)
    return latency_us(lambda v: v + 1.0, [a], repeats=repeats, warmup=20)


def trivial_kernel_us(repeats: int = 200) -> float | None:
    """One eval of a one-line custom GPU kernel on 1 element: the fixed cost MLX adds to every
    eval that contains a custom kernel (None without a GPU backend)."""
    from ..kernels.build import KernelSpec, gpu_backend, launch

    if gpu_backend() is None:
        return None
    spec = KernelSpec(name="mhc_trivial", inputs=("vin",), outputs=("vout",),
                      body="  if (KTID == 0 && KBID == 0) vout[0] = vin[0] + 1.0f;\n")
    a = mx.array([1.0])
    mx.eval(a)
    fn = lambda v: launch(spec, [v], [((1,), mx.float32)], 32, 32, [])[0]  # noqa: E731
    return latency_us(fn, [a], repeats=repeats, warmup=20)
