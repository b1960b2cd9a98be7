"""AdamATan2, SparseSignSGD and the warmup + cosine schedule against float64 references."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mhc_mlx.hrm import AdamATan2, PuzzleEmbedding, SparseSignSGD, warmup_cosine, warmup_cosine_lr

rng = np.random.default_rng()


class Two(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a = mx.array(a, mx.float32)
        self.b = mx.array(b, mx.float32)


def test_adam_atan2_matches_the_reference_update():
    lr, b1, b2, wd = 3e-3, 0.9, 0.95, 0.1
    a0, b0 = rng.normal(size=(5, 4)) * 0.1, rng.normal(size=(7,)) * 0.1
    model = Two(a0, b0)
    opt = AdamATan2(lr, (b1, b2), wd)
    ref = {"a": a0.copy(), "b": b0.copy()}
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v = {k: np.zeros_like(x) for k, x in ref.items()}
    for t in range(1, 31):
        grads = {"a": rng.normal(size=a0.shape) * 1e-2, "b": rng.normal(size=b0.shape) * 1e-3}
        opt.update(model, {k: mx.array(g, mx.float32) for k, g in grads.items()})
        mx.eval(model.parameters(), opt.state)
        for k, g in grads.items():
            ref[k] *= 1 - lr * wd
            m[k] += (1 - b1) * (g - m[k])
            v[k] += (1 - b2) * (g * g - v[k])
            ref[k] -= lr / (1 - b1**t) * np.arctan2(m[k], np.sqrt(v[k]) / math.sqrt(1 - b2**t))
    np.testing.assert_allclose(np.array(model.a, dtype=np.float64), ref["a"], atol=2e-6)
    np.testing.assert_allclose(np.array(model.b, dtype=np.float64), ref["b"], atol=2e-6)


def test_adam_atan2_step_is_bounded_without_epsilon():
    # A zero gradient history gives atan2(0, 0) = 0: no division by zero, no NaN.
    model = Two(np.ones((3,)), np.ones((2,)))
    opt = AdamATan2(1e-2, (0.9, 0.99), 0.0)
    opt.update(model, {"a": mx.zeros((3,)), "b": mx.array([1e-30, -1e30])})
    mx.eval(model.parameters())
    assert np.array(model.a).tolist() == [1.0, 1.0, 1.0]
    step = 1.0 - np.array(model.b, dtype=np.float64)
    assert np.all(np.isfinite(step)) and np.all(np.abs(step) <= 1e-2 / 0.1 * math.pi / 2 + 1e-9)


def test_sparse_sign_sgd_touches_only_batch_rows():
    N, D, lr, wd = 12, 6, 0.01, 0.1
    emb = PuzzleEmbedding(N, D)
    w0 = rng.normal(size=(N, D))
    emb.weight = mx.array(w0, mx.float32)
    opt = SparseSignSGD(lr, wd)
    ids = np.array([3, 7, 3, 0, 7, 7])
    row_grads = rng.normal(size=(6, D))
    opt.update(emb, mx.array(row_grads, mx.float32), mx.array(ids, mx.int32))
    w = np.array(emb.weight, dtype=np.float64)
    w0f = w0.astype(np.float32).astype(np.float64)
    untouched = np.setdiff1d(np.arange(N), ids)
    assert np.array_equal(w[untouched], w0f[untouched])  # bit for bit: no decay either
    for i in np.unique(ids):
        g = row_grads[ids == i].sum(0)  # duplicates are summed before the sign
        np.testing.assert_allclose(w[i], w0f[i] * (1 - lr * wd) - lr * np.sign(g), atol=1e-6)


def test_sparse_sign_sgd_rejects_bad_ids():
    emb = PuzzleEmbedding(4, 3)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        SparseSignSGD(0.1).update(emb, mx.zeros((2, 3)), mx.array([1, 4]))
    with pytest.raises(ValueError, match="row_grads must be"):
        SparseSignSGD(0.1).update(emb, mx.zeros((2, 5)), mx.array([1, 2]))


def test_warmup_cosine_schedule_follows_the_original_formula():
    base, warm, total = 1e-3, 10, 100
    for min_ratio in (0.0, 0.1, 1.0):
        sched = warmup_cosine(base, warm, total, min_ratio)
        for done in (0, 1, 5, 9, 10, 11, 50, 99, 100, 150):
            step = done + 1  # the original counts this update from 1
            if step < warm:
                ref = base * step / warm
            else:
                p = (step - warm) / (total - warm)
                ref = base * (min_ratio + max(0.0, (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))))
            assert abs(float(sched(mx.array(done))) - ref) < 1e-9 + 1e-6 * ref
            assert abs(warmup_cosine_lr(step, base, warm, total, min_ratio) - ref) < 1e-12
