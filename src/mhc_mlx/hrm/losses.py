"""Losses of HRM (original: models/losses.py): stablemax and softmax cross entropy, and the
ACT loss head — token loss + 0.5 (Q-halt loss + Q-continue loss) — with its metrics.

Stablemax replaces exp by s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0): it grows linearly, so
its probabilities do not saturate as fast as softmax's. The original evaluates it in float64;
Metal has no float64, so here it runs in float32 (tests bound the difference).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

IGNORE_LABEL_ID = -100
LOSS_TYPES = ("stablemax_cross_entropy", "softmax_cross_entropy")


def stablemax_s(x: mx.array, eps: float = 1e-30) -> mx.array:
    return mx.where(x < 0, 1.0 / (1.0 - x + eps), x + 1.0)


def log_stablemax(x: mx.array, axis: int = -1) -> mx.array:
    s = stablemax_s(x)
    return mx.log(s / mx.sum(s, axis=axis, keepdims=True))


def _gather_label(logprobs: mx.array, labels: mx.array) -> tuple[mx.array, mx.array]:
    valid = labels != IGNORE_LABEL_ID
    safe = mx.where(valid, labels, 0).astype(mx.int32)
    picked = mx.take_along_axis(logprobs, mx.expand_dims(safe, -1), axis=-1).squeeze(-1)
    return picked, valid


def stablemax_cross_entropy(logits: mx.array, labels: mx.array) -> mx.array:
    """Per-token loss [...], zero where labels == IGNORE_LABEL_ID."""
    picked, valid = _gather_label(log_stablemax(logits.astype(mx.float32)), labels)
    return -mx.where(valid, picked, 0.0)


def softmax_cross_entropy(logits: mx.array, labels: mx.array) -> mx.array:
    """Per-token loss [...], zero where labels == IGNORE_LABEL_ID."""
    logits = logits.astype(mx.float32)
    picked, valid = _gather_label(logits - mx.logsumexp(logits, axis=-1, keepdims=True), labels)
    return -mx.where(valid, picked, 0.0)


def token_loss_fn(loss_type: str):
    if loss_type == "stablemax_cross_entropy":
        return stablemax_cross_entropy
    if loss_type == "softmax_cross_entropy":
        return softmax_cross_entropy
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


def act_loss(outputs: dict, carry, loss_type: str = "stablemax_cross_entropy") -> tuple[mx.array, dict]:
    """The ACT loss head: (summed loss over the batch, metric sums).

    loss = sum_rows(token loss / labelled tokens) + 0.5 (BCE(q_halt, row exactly right)
    + BCE(q_continue, bootstrap target)). Metrics are sums over rows that halted at this step
    (reduce with `finalize_metrics`): count, accuracy (per-row token accuracy), exact_accuracy,
    q_halt_accuracy, steps, and ours: blank_correct / blank_cells, the cells whose input
    differs from the label (Sudoku: the blanks; maze: the path).
    """
    loss_fn = token_loss_fn(loss_type)
    labels = carry.current_data["labels"]
    inputs = carry.current_data["inputs"]
    logits = outputs["logits"]
    q_halt = outputs["q_halt_logits"]

    mask = labels != IGNORE_LABEL_ID
    loss_counts = mask.sum(-1)
    divisor = mx.expand_dims(mx.maximum(loss_counts, 1), -1).astype(mx.float32)
    predicted = mx.stop_gradient(mx.argmax(logits, axis=-1))
    is_correct = mask & (predicted == labels)
    seq_is_correct = is_correct.sum(-1) == loss_counts
    valid = carry.halted & (loss_counts > 0)
    blank = mask & (inputs != labels) & mx.expand_dims(valid, -1)

    metrics = {
        "count": valid.sum(),
        "accuracy": mx.where(valid, (is_correct.astype(mx.float32) / divisor).sum(-1), 0.0).sum(),
        "exact_accuracy": (valid & seq_is_correct).sum(),
        "q_halt_accuracy": (valid & ((q_halt >= 0) == seq_is_correct)).sum(),
        "steps": mx.where(valid, carry.steps, 0).sum(),
        "blank_correct": (blank & is_correct).sum(),
        "blank_cells": blank.sum(),
    }

    lm_loss = (loss_fn(logits, labels) / divisor).sum()
    q_halt_loss = nn.losses.binary_cross_entropy(
        q_halt, seq_is_correct.astype(q_halt.dtype), with_logits=True, reduction="sum"
    )
    metrics["lm_loss"] = mx.stop_gradient(lm_loss)
    metrics["q_halt_loss"] = mx.stop_gradient(q_halt_loss)
    q_continue_loss = mx.array(0.0)
    if "target_q_continue" in outputs:
        q_continue_loss = nn.losses.binary_cross_entropy(
            outputs["q_continue_logits"], outputs["target_q_continue"], with_logits=True, reduction="sum"
        )
        metrics["q_continue_loss"] = mx.stop_gradient(q_continue_loss)
    metrics = {k: mx.stop_gradient(v) for k, v in metrics.items()}
    return lm_loss + 0.5 * (q_halt_loss + q_continue_loss), metrics


def finalize_metrics(sums: dict, batch_size: int | None = None) -> dict:
    """Metric sums -> means, as the original reports them.

    Losses are divided by `batch_size` (training: per-row mean) when given, else by count;
    rates by count (rows that halted); blank_accuracy = blank_correct / blank_cells.
    """
    sums = {k: float(v) for k, v in sums.items()}
    count = max(sums.get("count", 0.0), 1.0)
    out = {}
    for k, v in sums.items():
        if k in ("count", "blank_correct", "blank_cells"):
            continue
        if k.endswith("loss"):
            out[k] = v / (batch_size if batch_size else count)
        else:
            out[k] = v / count
    out["blank_accuracy"] = sums.get("blank_correct", 0.0) / max(sums.get("blank_cells", 0.0), 1.0)
    out["count"] = sums.get("count", 0.0)
    return out
