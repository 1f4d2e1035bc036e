"""Figures and tables built from results: λ̂ along training, loss traces, the calibration's
evidence, grokking runs, activation comparisons, validation scatter, Markdown tables.

Figures are built on ``matplotlib.figure.Figure`` directly, so plotting never switches the
global backend (a notebook keeps its own). Every function returns the figure and saves
it when given ``path``. Not here: computing any estimate.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .run_log import CSV_NAME, read_rows, write_text_atomic


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """Lines of a Markdown table (cells are written with ``str``).

    Examples:
        >>> markdown_table(["a", "b"], [[1, 2]])
        ['| a | b |', '|---|---|', '| 1 | 2 |']
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def append_table(path, intro: str, header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """Append ``intro`` and a Markdown table to ``path`` (created with its folders),
    atomically, so a file of measurements keeps every earlier run; returns the new text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([intro, "", *markdown_table(header, rows)]) + "\n"
    previous = path.read_text() + "\n" if path.exists() else ""
    write_text_atomic(path, previous + text)
    return text


def mean_pm_std(value, std=None, fmt: str = ".3g") -> str:
    """``value ± std`` (just ``value`` when std is missing or zero; "—" for no value).

    Examples:
        >>> mean_pm_std(1.2345, 0.01)
        '1.23 ± 0.01'
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    text = format(value, fmt)
    if std:
        text += f" ± {format(std, fmt)}"
    return text


def _finish(fig: Figure, path) -> Figure:
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _rows(csv_or_history) -> list[dict]:
    if isinstance(csv_or_history, (str, Path)):
        path = Path(csv_or_history)
        return read_rows(path / CSV_NAME if path.is_dir() else path)
    return list(csv_or_history)


def _column(rows, key):
    kept = [r for r in rows if r.get(key) not in (None, "")]
    return (np.array([r["step"] for r in kept], dtype=float),
            np.array([r[key] for r in kept], dtype=float))


def plot_trajectory(csv_or_history, metrics=("train_loss", "test_acc"), *, path=None,
                    title=None, log_x: bool | None = None, ax=None):
    """λ̂ (± std band) against step, with any logged metric columns on a second axis.

    Args:
        csv_or_history: an ``llc.csv`` path, its folder, or a probe's ``history``.
        metrics: columns to draw on the second axis (those present).
        path: where to save the PNG. title: axis title. log_x: symlog step axis
            (default: when steps span more than two decades). ax: draw into this axis.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ValueError: no rows, or no row holds an estimate.

    Examples:
        >>> rows = [{"step": s, "llc_mean": v, "llc_std": 0.1} for s, v in [(0, 1.0), (10, 2.0)]]
        >>> plot_trajectory(rows, metrics=()).axes[0].get_ylabel()
        'λ̂ (effective parameters / 2)'
    """
    rows = _rows(csv_or_history)
    if not rows:
        raise ValueError("no rows to plot")
    steps, llc = _column(rows, "llc_mean")
    if len(steps) == 0:
        raise ValueError("the rows hold no llc_mean values")
    _, std = _column([r for r in rows if r.get("llc_mean") not in (None, "")], "llc_std")
    fig = Figure(figsize=(8, 4.5)) if ax is None else ax.figure
    if ax is None:
        ax = fig.subplots()
    ax.plot(steps, llc, color="C0", marker="o", ms=3, label="λ̂ (LLC)")
    if len(std) == len(llc):
        ax.fill_between(steps, llc - std, llc + std, color="C0", alpha=0.2, label="± std")
    local = [r for r in rows if r.get("llc_mean") not in (None, "") and r.get("local") is False]
    if local:
        ax.scatter([r["step"] for r in local], [r["llc_mean"] for r in local], s=40,
                   facecolors="none", edgecolors="r", zorder=4, label="chains not local")
    ax.set_xlabel("step")
    ax.set_ylabel("λ̂ (effective parameters / 2)", color="C0")
    positive = steps[steps > 0]
    if log_x if log_x is not None else (steps.min() >= 0 and len(positive)
                                        and steps.max() > 100 * max(positive.min(), 1)):
        ax.set_xscale("symlog", linthresh=max(1.0, float(positive.min(initial=1))))
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
    return _finish(fig, path)


def plot_trace(result, *, path=None, ax=None):
    """Per-chain loss traces of one estimate, with the running λ̂ of all healthy chains.

    Returns:
        The matplotlib ``Figure``.

    Examples:
        >>> import torch, slt_probe
        >>> x, y = torch.randn(64, 2), torch.randint(0, 2, (64,))
        >>> r = slt_probe.estimate_llc(torch.nn.Linear(2, 2), (x, y), num_draws=5,
        ...                            num_chains=2, verbose=False)
        >>> len(plot_trace(r).axes)
        2
    """
    fig = Figure(figsize=(8, 4.5)) if ax is None else ax.figure
    if ax is None:
        ax = fig.subplots()
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
    return _finish(fig, path)


def plot_calibration(calibration, path=None) -> Figure:
    """Left: the warm-up's λ̂ against Langevin time. Right: λ̂ of the ladder levels
    against ε (the chosen one circled) with their MALA acceptance.

    Returns:
        The matplotlib ``Figure``.

    Examples:
        >>> from slt_probe import SGLD, Calibration
        >>> cal = Calibration(sampler=SGLD(lr=1e-4, localization=100.0), warmup_lr=2e-4,
        ...                   num_warmup=0, num_burnin=0, table=[], reason="", nbeta=150.0)
        >>> len(plot_calibration(cal).axes)
        2
    """
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    warm = calibration.traces.get("warmup")
    warm_lr = calibration.traces.get("warmup_lr", math.nan)
    if warm is not None and len(warm):
        mean = np.nanmean(warm, axis=1)
        width = max(1, len(mean) // 200)
        smooth = np.convolve(mean, np.ones(width) / width, mode="valid")
        left.plot(warm_lr * (np.arange(len(smooth)) + width), smooth)
    left.set_xscale("log")
    left.set_xlabel("Langevin time ε·t")
    left.set_ylabel("λ̂ (chain mean)")
    gamma = calibration.sampler.localization
    left.set_title(f"calibration warm-up at ε = {warm_lr:.3g}, γ = {gamma:g}")
    rows = [r for r in calibration.table if r["stage"] == "ladder"
            and r["localization"] == gamma]
    if rows:
        right.errorbar([r["lr"] for r in rows], [r["llc_mean"] for r in rows],
                       yerr=[2 * r["llc_sem"] for r in rows], fmt="o-", capsize=2,
                       label="λ̂ from the relaxed positions (± 2 s.e.)")
        chosen = [r for r in rows if r["chosen"]]
        if chosen:
            right.scatter([chosen[0]["lr"]], [chosen[0]["llc_mean"]], s=160, facecolors="none",
                          edgecolors="r", zorder=4, label="chosen")
        twin = right.twinx()
        twin.plot([r["lr"] for r in rows], [r["mala_acceptance"] for r in rows], "g.--", lw=1)
        twin.set_ylabel("MALA acceptance", color="g")
        twin.set_ylim(0, 1.05)
        right.legend(fontsize=8)
    right.set_xscale("log")
    right.set_xlabel("SGLD step ε")
    right.set_ylabel("λ̂")
    right.set_title(f"step-bias ladder (nβ = {calibration.nbeta:.3g})")
    return _finish(fig, path)


def plot_grokking(rows: list[dict], path=None, *, title: str = "",
                  grok_step: int | None = None, grok_accuracy: float = 0.9) -> Figure:
    """λ̂ ± std (left) with train/test accuracy (right); losses below; grokking step marked."""
    llc = [r for r in rows if r.get("llc_mean") is not None]
    metric = [r for r in rows if r.get("test_acc") is not None]
    shift = lambda steps: [s + 1 for s in steps]  # noqa: E731 — step 0 on a log axis
    fig = Figure(figsize=(7.5, 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    steps = shift([r["step"] for r in llc])
    mean = [r["llc_mean"] for r in llc]
    std = [r["llc_std"] or 0.0 for r in llc]
    top.plot(steps, mean, color="tab:purple", label="λ̂ (train set)")
    top.fill_between(steps, [m - s for m, s in zip(mean, std)],
                     [m + s for m, s in zip(mean, std)], color="tab:purple", alpha=0.25)
    quadratic = [(s, r["quadratic_llc"]) for s, r in zip(steps, llc)
                 if r.get("quadratic_llc") not in (None, "") and math.isfinite(r["quadratic_llc"])]
    if quadratic:
        top.plot(*zip(*quadratic), color="tab:green", ls="--", lw=1.2,
                 label="quadratic baseline ½Σ nβh/(nβh+γ)")
    away = [(s, m) for s, m, r in zip(steps, mean, llc) if r.get("local") is False]
    if away:
        top.scatter(*zip(*away), s=36, facecolors="none", edgecolors="r", zorder=4,
                    label="chains not local")
    top.set_ylabel("λ̂  (effective params = 2λ̂)")
    if mean and min(mean) < 0 and -min(mean) > 3 * max(max(mean), 1e-12):
        # far from a minimum λ̂ can be hugely negative; a linear axis would flatten the rest
        top.set_yscale("symlog", linthresh=max(max(mean), 1.0))
    acc = top.twinx()
    for key, colour in (("train_acc", "tab:blue"), ("test_acc", "tab:orange")):
        acc.plot(shift([r["step"] for r in metric]), [r[key] for r in metric], color=colour,
                 lw=1, alpha=0.8, label=key.replace("_", " "))
    acc.set_ylabel("accuracy")
    acc.set_ylim(-0.02, 1.02)
    for key, colour in (("train_loss", "tab:blue"), ("test_loss", "tab:orange")):
        bottom.plot(shift([r["step"] for r in metric]), [r[key] for r in metric], color=colour,
                    label=key.replace("_", " "))
    bottom.set_yscale("log")
    bottom.set_ylabel("loss")
    bottom.set_xscale("log")
    bottom.set_xlabel("step + 1")
    if grok_step is not None:
        for ax in (top, bottom):
            ax.axvline(grok_step + 1, color="grey", ls="--", lw=1)
        top.text(grok_step + 1, top.get_ylim()[1], f" test acc ≥ {grok_accuracy:.0%}",
                 va="top", fontsize=8, color="grey")
    handles = top.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
    top.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    bottom.legend(fontsize=8)
    top.set_title(title)
    return _finish(fig, path)


def _by_step(trajectories: list[list[dict]]) -> dict[int, list[float]]:
    by_step: dict[int, list[float]] = {}
    for rows in trajectories:
        for r in rows:
            if r.get("llc_mean") is not None:
                by_step.setdefault(r["step"], []).append(r["llc_mean"])
    return dict(sorted(by_step.items()))


def _mean_band(trajectories: list[list[dict]]):
    by_step = _by_step(trajectories)
    return (np.array(list(by_step)), np.array([np.mean(v) for v in by_step.values()]),
            np.array([np.std(v) for v in by_step.values()]))


def _range_band(trajectories: list[list[dict]]):
    """Steps, mean, and the lowest and highest value over seeds (a band a log axis can
    show, where mean − std may be negative)."""
    by_step = _by_step(trajectories)
    return (np.array(list(by_step)), np.array([np.mean(v) for v in by_step.values()]),
            np.array([np.min(v) for v in by_step.values()]),
            np.array([np.max(v) for v in by_step.values()]))


def plot_resolutions(runs: dict[str, list[list[dict]]], path=None, title: str = "") -> Figure:
    """λ̂ (solid, the mean over seeds with their range shaded, positive points at a critical
    point only) and the curvature baseline (dashed) of each resolution regime on one log
    axis, with the test accuracy of the first seed."""
    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    colours = iter(["tab:purple", "tab:blue", "tab:green", "tab:red"])
    for regime, trajectories in runs.items():
        colour = next(colours)
        # a plain λ̂ at a point that is not a critical point is not drawn, nor a value
        # below 0 (not a minimum), which a log axis cannot show
        trusted = [[r for r in rows if r.get("critical_point") is not False
                    and (r.get("llc_mean") or 0) > 0] for rows in trajectories]
        steps, mean, lowest, highest = _range_band(trusted)
        if not len(steps):
            continue
        ax.plot(steps + 1, mean, color=colour, label=f"λ̂, {regime}")
        ax.fill_between(steps + 1, lowest, highest, color=colour, alpha=0.2)
        baseline = [[{"step": r["step"], "llc_mean": r["quadratic_llc"]} for r in rows
                     if isinstance(r.get("quadratic_llc"), float)] for rows in trajectories]
        b_steps, b_mean, _ = _mean_band(baseline)
        if len(b_steps):
            ax.plot(b_steps + 1, b_mean, color=colour, ls="--", lw=1,
                    label=f"baseline, {regime}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step + 1")
    ax.set_ylabel("λ̂ (log)")
    first = next(iter(runs.values()))[0]
    metric = [r for r in first if r.get("test_acc") is not None]
    if metric:
        acc = ax.twinx()
        acc.plot([r["step"] + 1 for r in metric], [r["test_acc"] for r in metric],
                 color="tab:orange", lw=1, alpha=0.6, label="test acc (first seed)")
        acc.set_ylim(-0.02, 1.02)
        acc.set_ylabel("test accuracy")
        acc.legend(loc="lower right", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title)
    return _finish(fig, path)


def plot_comparison(runs: dict[str, list[list[dict]]], path=None, title: str = "") -> Figure:
    """Mean ± std over seeds of λ̂ per activation (top) and every run's test accuracy."""
    fig = Figure(figsize=(7.5, 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    for i, (act, trajectories) in enumerate(runs.items()):
        colour = f"C{i}"
        steps, mean, std = _mean_band(trajectories)
        top.plot(steps + 1, mean, color=colour, label=act)
        top.fill_between(steps + 1, mean - std, mean + std, color=colour, alpha=0.2)
        for k, rows in enumerate(trajectories):
            metric = [r for r in rows if r.get("test_acc") is not None]
            bottom.plot([r["step"] + 1 for r in metric], [r["test_acc"] for r in metric],
                        color=colour, lw=1, alpha=0.7, label=act if k == 0 else None)
    top.set_ylabel("λ̂ (train set)")
    top.legend(fontsize=8)
    top.set_title(title)
    bottom.set_ylabel("test accuracy")
    bottom.set_xlabel("step + 1")
    bottom.set_xscale("log")
    bottom.legend(fontsize=8)
    return _finish(fig, path)


def plot_redshift(rows: list[dict], path=None) -> Figure:
    """Complexity of the untrained function against the initial weight scale."""
    fig = Figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2)
    for i, act in enumerate(dict.fromkeys(r["activation"] for r in rows)):
        mine = [r for r in rows if r["activation"] == act]
        scales = sorted({r["scale"] for r in mine})
        for ax, key in zip(axes, ("mean_frequency", "lz")):
            means = [np.mean([r[key] for r in mine if r["scale"] == s]) for s in scales]
            ax.plot(scales, means, "o-", color=f"C{i}", label=act)
    for ax, label in zip(axes, ("mean Fourier frequency", "LZ compressed fraction")):
        ax.set_xscale("log")
        ax.set_xlabel("initial weight scale")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("complexity of the untrained network's function (2-D input slice)")
    return _finish(fig, path)


def plot_validation(rows: list[dict], path=None) -> Figure:
    """λ̂ against the true λ on log axes, with the ±10 % band."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    truth = [r["true_lambda"] for r in rows]
    est = [max(r["llc_mean"], 1e-3) for r in rows]
    ax.errorbar(truth, est, yerr=[r["llc_std"] for r in rows], fmt="o", ms=4, capsize=2)
    lo, hi = min(truth + est) / 2, max(truth + est) * 2
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="λ̂ = λ")
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="g",
                    alpha=0.1, label="±10 %")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("true λ")
    ax.set_ylabel("λ̂ (auto-calibrated)")
    ax.legend()
    return _finish(fig, path)


def plot_homogeneity(rows: list[dict], marks: dict, path=None, title: str = "") -> Figure:
    """Against width (log axis): the variance of predictions across runs (initialisation
    and data parts), the pairwise disagreement, the test error, and λ̂/d; the
    interpolation threshold and parameters ≈ examples × outputs marked."""
    fig = Figure(figsize=(8.5, 7))
    axes = fig.subplots(2, 2, sharex=True).ravel()
    widths = [r["width"] for r in rows]
    panels = [("variance of predictions", [("init_variance", "initialisation"),
                                           ("data_variance", "training data"),
                                           ("total_variance", "all runs")]),
              ("pairwise disagreement", [("init_disagreement", "initialisation"),
                                         ("data_disagreement", "training data")]),
              ("error", [("test_error", "test"), ("train_error", "train")]),
              ("λ̂ / d", [("llc_per_param", "λ̂ / parameters")])]
    for ax, (label, series) in zip(axes, panels):
        for key, name in series:
            ax.plot(widths, [np.nan if r[key] is None else r[key] for r in rows], "o-",
                    label=name)
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        if marks.get("interpolation_width"):
            ax.axvline(marks["interpolation_width"], color="grey", ls="--", lw=1,
                       label="interpolation threshold")
        ax.axvline(marks["params_equal_examples_width"], color="tab:red", ls=":", lw=1,
                   label="parameters ≈ examples × outputs")
        ax.legend(fontsize=7)
    axes[3].set_yscale("log")
    for ax in axes[2:]:
        ax.set_xlabel("width")
    if title:
        fig.suptitle(title)
    return _finish(fig, path)
