"""Plots: λ̂ along training beside the user's metrics, and the loss traces of one estimate."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _rows(csv_or_history) -> list[dict]:
    from .probe import read_rows

    if isinstance(csv_or_history, (str, Path)):
        path = Path(csv_or_history)
        return read_rows(path / "llc.csv" if path.is_dir() else path)
    return list(csv_or_history)


def _column(rows, key):
    steps = np.array([r["step"] for r in rows if r.get(key) not in (None, "")], dtype=float)
    values = np.array([r[key] for r in rows if r.get(key) not in (None, "")], dtype=float)
    return steps, values


def plot_trajectory(csv_or_history, metrics=("train_loss", "test_acc"), *, path=None,
                    title=None, log_x: bool | None = None, ax=None):
    """λ̂ (± std band) against step, with any logged metric columns on a second axis."""
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = _rows(csv_or_history)
    if not rows:
        raise ValueError("no rows to plot")
    steps, llc = _column(rows, "llc_mean")
    if len(steps) == 0:
        raise ValueError("the rows hold no llc_mean values")
    _, std = _column([r for r in rows if r.get("llc_mean") not in (None, "")], "llc_std")
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, llc, color="C0", marker="o", ms=3, label="λ̂ (LLC)")
    if len(std) == len(llc):
        ax.fill_between(steps, llc - std, llc + std, color="C0", alpha=0.2, label="± std")
    ax.set_xlabel("step")
    ax.set_ylabel("λ̂ (effective parameters / 2)", color="C0")
    if log_x if log_x is not None else (steps.min() >= 0 and steps.max() > 100 * max(steps[steps > 0].min(initial=1), 1)):
        ax.set_xscale("symlog", linthresh=max(1.0, float(steps[steps > 0].min(initial=1))))
    present = [m for m in metrics if any(r.get(m) not in (None, "") for r in rows)]
    if present:
        twin = ax.twinx()
        for i, name in enumerate(present, start=1):
            s, v = _column(rows, name)
            twin.plot(s, v, color=f"C{i}", lw=1.2, label=name)
        twin.set_ylabel(", ".join(present))
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
        ax.legend(handles, labels, loc="best", fontsize=8)
    else:
        ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title)
    figure = fig or ax.figure
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def plot_trace(result, *, path=None, ax=None):
    """Per-chain loss traces of one estimate, with the running λ̂ of all healthy chains."""
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 4.5))
    for c, row in enumerate(result.loss_trace):
        ax.plot(row, lw=0.8, label=f"chain {c}")
    ax.axhline(result.init_loss, color="k", ls=":", lw=1, label="L_n(w*)")
    ax.set_xlabel("draw")
    ax.set_ylabel("loss")
    running = np.nanmean(np.cumsum(result.llc_trace, axis=1)
                         / np.arange(1, result.llc_trace.shape[1] + 1), axis=0)
    twin = ax.twinx()
    twin.plot(running, color="k", lw=2, label="running λ̂")
    twin.set_ylabel("running λ̂")
    ax.legend(loc="upper left", fontsize=7, ncol=2)
    figure = fig or ax.figure
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure
