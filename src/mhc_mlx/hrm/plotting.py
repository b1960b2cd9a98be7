"""Accuracy curves of HRM runs as a PNG (matplotlib, the `plot` extra)."""

from __future__ import annotations

import os
import warnings


def plot_runs(runs: list, out_png: str, title: str | None = None) -> bool:
    """runs: [(label, history)] with history["eval"] rows holding step, blank_accuracy and
    exact_accuracy. Draws both against step; returns False (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'mhc-mlx[plot]'): no accuracy plot written")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, history in runs:
        rows = history["eval"]
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["blank_accuracy"] for r in rows], marker="o", ms=3, label=label)
        axes[1].plot(steps, [r["exact_accuracy"] for r in rows], marker="o", ms=3, label=label)
    axes[0].set_title("held-out blank-cell accuracy")
    axes[1].set_title("held-out exact accuracy (whole puzzle)")
    # Blank-cell accuracy is small early on: scale to the data; exact accuracy keeps [0, 1].
    top = max([r["blank_accuracy"] for _, h in runs for r in h["eval"]] + [0.0])
    axes[0].set_ylim(0, min(1.0, max(0.5, top + 0.1)))
    axes[1].set_ylim(0, 1)
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True
