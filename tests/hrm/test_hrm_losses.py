"""Stablemax / softmax cross entropy and the ACT loss head against float64 numpy."""

import mlx.core as mx
import numpy as np
import pytest

from mhc_mlx.hrm import (
    IGNORE_LABEL_ID,
    act_loss,
    finalize_metrics,
    log_stablemax,
    softmax_cross_entropy,
    stablemax_cross_entropy,
)
from mhc_mlx.hrm.model import Carry, InnerCarry

rng = np.random.default_rng()


def np_log_stablemax(x):
    s = np.where(x < 0, 1 / (1 - x), x + 1)
    return np.log(s / s.sum(-1, keepdims=True))


def labels_with_ignored(shape, vocab):
    labels = rng.integers(0, vocab, size=shape)
    labels[rng.random(shape) < 0.3] = IGNORE_LABEL_ID
    return labels


def test_log_stablemax_matches_its_formula():
    x = rng.normal(size=(4, 6, 11)) * 5
    np.testing.assert_allclose(
        np.array(log_stablemax(mx.array(x, mx.float32)), dtype=np.float64),
        np_log_stablemax(x),
        atol=2e-5,
        rtol=1e-5,
    )


def test_stablemax_cross_entropy():
    x = rng.normal(size=(3, 9, 7)) * 4
    labels = labels_with_ignored((3, 9), 7)
    got = np.array(stablemax_cross_entropy(mx.array(x, mx.float32), mx.array(labels)), dtype=np.float64)
    lp = np_log_stablemax(x)
    ref = -np.where(labels >= 0, np.take_along_axis(lp, np.maximum(labels, 0)[..., None], -1)[..., 0], 0.0)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
    assert np.all(got[labels == IGNORE_LABEL_ID] == 0)


def test_softmax_cross_entropy():
    x = rng.normal(size=(3, 9, 7)) * 4
    labels = labels_with_ignored((3, 9), 7)
    got = np.array(softmax_cross_entropy(mx.array(x, mx.float32), mx.array(labels)), dtype=np.float64)
    m = x.max(-1, keepdims=True)
    lp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    ref = -np.where(labels >= 0, np.take_along_axis(lp, np.maximum(labels, 0)[..., None], -1)[..., 0], 0.0)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)


def _bce(z, t):
    return np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))


@pytest.mark.parametrize("loss_type", ["stablemax_cross_entropy", "softmax_cross_entropy"])
def test_act_loss_head(loss_type):
    B, L, V = 6, 5, 4
    labels = rng.integers(1, V, size=(B, L))
    labels[0, :2] = IGNORE_LABEL_ID
    labels[5] = IGNORE_LABEL_ID  # a padding row: no labelled cells
    inputs = np.where(rng.random((B, L)) < 0.5, 0, labels)  # 0 marks the cells to fill in
    logits = rng.normal(size=(B, L, V))
    logits[1] = np.eye(V)[np.maximum(labels[1], 0)] * 10  # row 1 exactly right
    q_halt, q_cont = rng.normal(size=B), rng.normal(size=B)
    target = rng.random(B)
    halted = np.array([True, True, False, True, True, True])
    steps = np.array([2, 1, 1, 3, 2, 2])
    carry = Carry(
        InnerCarry(mx.zeros((1,)), mx.zeros((1,))),
        mx.array(steps, mx.int32),
        mx.array(halted),
        {
            "inputs": mx.array(inputs),
            "labels": mx.array(labels),
            "puzzle_identifiers": mx.zeros((B,), mx.int32),
        },
    )
    outputs = {
        "logits": mx.array(logits, mx.float32),
        "q_halt_logits": mx.array(q_halt, mx.float32),
        "q_continue_logits": mx.array(q_cont, mx.float32),
        "target_q_continue": mx.array(target, mx.float32),
    }
    loss, metrics = act_loss(outputs, carry, loss_type)

    mask = labels != IGNORE_LABEL_ID
    counts = mask.sum(-1)
    div = np.maximum(counts, 1)[:, None]
    if loss_type == "stablemax_cross_entropy":
        lp = np_log_stablemax(logits)
    else:
        lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tok = -np.where(mask, np.take_along_axis(lp, np.maximum(labels, 0)[..., None], -1)[..., 0], 0)
    lm = (tok / div).sum()
    correct = mask & (logits.argmax(-1) == labels)
    seq_ok = correct.sum(-1) == counts
    q_halt_loss = _bce(q_halt, seq_ok.astype(float)).sum()
    q_cont_loss = _bce(q_cont, target).sum()
    np.testing.assert_allclose(float(loss), lm + 0.5 * (q_halt_loss + q_cont_loss), rtol=1e-5)

    valid = halted & (counts > 0)
    blank = mask & (inputs != labels) & valid[:, None]
    expect = {
        "count": valid.sum(),
        "accuracy": np.where(valid, (correct / div).sum(-1), 0).sum(),
        "exact_accuracy": (valid & seq_ok).sum(),
        "q_halt_accuracy": (valid & ((q_halt >= 0) == seq_ok)).sum(),
        "steps": np.where(valid, steps, 0).sum(),
        "blank_correct": (blank & correct).sum(),
        "blank_cells": blank.sum(),
        "lm_loss": lm,
        "q_halt_loss": q_halt_loss,
        "q_continue_loss": q_cont_loss,
    }
    assert set(metrics) == set(expect)
    for k, v in expect.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, err_msg=k)

    final = finalize_metrics(metrics, batch_size=B)
    np.testing.assert_allclose(final["accuracy"], expect["accuracy"] / expect["count"], rtol=1e-6)
    np.testing.assert_allclose(final["lm_loss"], lm / B, rtol=1e-5)
    np.testing.assert_allclose(
        final["blank_accuracy"], expect["blank_correct"] / expect["blank_cells"], rtol=1e-6
    )


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type"):
        act_loss({}, None, "hinge")
