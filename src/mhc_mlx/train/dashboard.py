"""The stability dashboard: one PNG with loss, gains, gradient norm and speed per mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLORS = {"baseline": "#7f7f7f", "hc": "#d62728", "mhc": "#1f77b4"}
PANELS = (
    "Training loss",
    "Composite forward gain (max row sum)",
    "Composite backward gain (max column sum)",
    "Gradient norm (before clipping)",
    "Forward gain after each site (last log)",
    "Throughput",
)


def _finite(values) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(a), a, np.nan)


def plot_dashboard(metrics: dict, path) -> tuple[str, ...]:
    """Write the dashboard PNG to `path`; returns the panel titles (also in the PNG's metadata)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    modes = metrics["modes"]
    cfg = metrics["config"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.2))
    ax_loss, ax_fwd, ax_bwd, ax_grad, ax_depth, ax_speed = axes.ravel()
    for ax, title in zip(axes.ravel(), PANELS):
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.3)

    for mode, h in modes.items():
        color = COLORS.get(mode)
        steps = np.asarray(h["step"])
        if steps.size:
            ax_loss.plot(steps, _finite(h["loss"]), color=color, label=mode, lw=1.2)
            ax_grad.plot(steps, _finite(h["grad_norm"]), color=color, label=mode, lw=1.0)
        if h["diverged_at"] is not None:
            ax_loss.axvline(h["diverged_at"], color=color, ls=":", lw=1)
        if h["gains"]:
            gsteps = np.asarray(h["gain_step"])
            for ax, key in ((ax_fwd, "forward"), (ax_bwd, "backward")):
                ax.plot(gsteps, _finite([g["composite"][f"{key}_max"] for g in h["gains"]]),
                        color=color, marker="o", ms=3, label=f"{mode} max")
                ax.plot(gsteps, _finite([g["composite"][f"{key}_min"] for g in h["gains"]]),
                        color=color, ls="--", lw=1, label=f"{mode} min")
            depth = h["gains"][-1]["composite_by_depth"]
            ax_depth.plot(np.arange(1, len(depth) + 1), _finite(depth), color=color, marker=".", label=mode)
    floor = metrics["task"].get("loss_floor")
    if floor is not None:
        ax_loss.axhline(floor, color="k", ls="--", lw=0.8, label=f"best possible {floor:.2f}")

    for ax in (ax_fwd, ax_bwd, ax_depth):
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_yscale("log")
        ax.set_xlabel("step" if ax is not ax_depth else "site (attention, MLP, ... in order)")
    ax_grad.set_yscale("log")
    for ax in (ax_loss, ax_grad):
        ax.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_depth.set_ylabel("max row sum of H_res product up to the site")

    names = list(modes)
    speeds = [float(np.median(modes[m]["tokens_per_s"])) if modes[m]["tokens_per_s"] else 0.0 for m in names]
    ax_speed.bar(names, speeds, color=[COLORS.get(m, "#2ca02c") for m in names])
    ax_speed.set_ylabel("tokens/s (median step)")
    for i, s in enumerate(speeds):
        ax_speed.text(i, s, f"{s:.0f}", ha="center", va="bottom", fontsize=9)

    for ax in (ax_loss, ax_fwd, ax_bwd, ax_grad, ax_depth):
        if ax.lines:
            ax.legend(fontsize=8)
    task = metrics["task"]
    fig.suptitle(
        f"mhc-mlx train: {cfg['model']}, {cfg['layers']} blocks x width {cfg['hidden_size']}, "
        f"n={cfg['n_streams']} streams ({'dynamic' if cfg['dynamic'] else 'static'} sites), "
        f"task {task['name']}, batch {cfg['batch_size']}x{cfg['seq_len']}, lr {cfg['lr']:g}, "
        f"{metrics.get('world_size', 1)} rank(s)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = Path(path)
    fig.savefig(path, dpi=72, pil_kwargs={"optimize": True}, metadata={"Title": "mhc-mlx training dashboard", "Description": "; ".join(PANELS)})
    plt.close(fig)
    return PANELS
