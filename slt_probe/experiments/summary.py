"""What a finished grokking run shows, read from its rows: λ̂ at initialisation, peak and
end, when train and test accuracy cross their thresholds, whether λ̂ falls after grokking,
how local its estimates were; and the table over runs. Not here: training, plotting.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..reports import markdown_table, mean_pm_std, plot_grokking, plot_resolutions
from ..run_log import CSV_NAME, read_rows, write_json_atomic
from .presets import REGIMES

SUMMARY_NAME = "summary.json"
PLOT_NAME = "trajectory.png"
RESOLUTIONS_PLOT = "resolutions.png"
# what "small", "rises" and "falls" mean in the claims table (fixed before any run was read)
SMALL_AT_INIT = 0.25  # λ̂ at initialisation at most this fraction of the peak
RISE_FACTOR = 2.0  # the peak at least this many times λ̂ at initialisation
MIN_FALL = 0.2  # λ̂ after grokking falls by at least this fraction of the peak


def _first_step(rows: list[dict], key: str, threshold: float) -> int | None:
    for row in rows:
        value = row.get(key)
        if value is not None and value >= threshold:
            return int(row["step"])
    return None


def summarize(rows: list[dict], *, wall_seconds: float | None = None,
              probe_seconds: float | None = None, grok_accuracy: float = 0.9) -> dict:
    """LLC at init, peak and end; when train/test accuracy cross 50 %/90 %/100 %; and
    whether λ̂ falls after its peak, read from a run's rows.

    The peak and the fall after grokking are read from the trusted estimates: chains not
    found to leave w* (``local`` true, or not assessable as at initialisation) at a w*
    whose gradient does not pull the plain estimate (``critical_point``). The others are
    counted (``not_local_points``, ``not_critical_points``), never taken as the peak.
    """
    llc_rows = [r for r in rows if r.get("llc_mean") is not None]
    if not llc_rows:
        raise ValueError("no rows with an LLC estimate")
    trusted = [r for r in llc_rows
               if r.get("local") is not False and r.get("critical_point") is not False]
    peak = max(trusted or llc_rows, key=lambda r: r["llc_mean"])
    final, init = llc_rows[-1], llc_rows[0]
    metric_rows = [r for r in rows if r.get("test_acc") is not None]
    grok = _first_step(metric_rows, "test_acc", grok_accuracy)
    summary = {
        "llc_init": init["llc_mean"], "llc_init_std": init["llc_std"],
        "llc_init_trusted": init in trusted,
        "llc_peak": peak["llc_mean"], "llc_peak_std": peak["llc_std"], "llc_peak_step": peak["step"],
        "llc_peak_local": bool(trusted),
        "llc_final": final["llc_mean"], "llc_final_std": final["llc_std"],
        "final_step": final["step"],
        "llc_fall_fraction": ((peak["llc_mean"] - final["llc_mean"]) / abs(peak["llc_mean"])
                              if peak["llc_mean"] else None),
        "train_acc_100_step": _first_step(metric_rows, "train_acc", 1.0),
        "test_acc_50_step": _first_step(metric_rows, "test_acc", 0.5),
        "test_acc_90_step": _first_step(metric_rows, "test_acc", 0.9),
        "grok_accuracy": grok_accuracy, "grok_step": grok,
        "final_train_acc": metric_rows[-1].get("train_acc") if metric_rows else None,
        "final_test_acc": metric_rows[-1].get("test_acc") if metric_rows else None,
        "grokked": grok is not None,
        "num_llc_points": len(llc_rows),
        "unhealthy_points": sum(1 for r in llc_rows if r.get("healthy") is False),
        "not_local_points": sum(1 for r in llc_rows if r.get("local") is False),
        "not_critical_points": sum(1 for r in llc_rows if r.get("critical_point") is False),
        "max_excess_ratio": max((r["excess_ratio"] for r in llc_rows
                                 if r.get("excess_ratio") is not None), default=None),
        "llc_init_excess_ratio": init.get("excess_ratio"),
        "llc_peak_excess_ratio": peak.get("excess_ratio"),
        "llc_final_excess_ratio": final.get("excess_ratio"),
        "llc_seconds": sum(r.get("seconds") or 0.0 for r in llc_rows),
        "wall_seconds": wall_seconds, "probe_seconds": probe_seconds,
    }
    baseline = lambda row: row.get("quadratic_llc")  # noqa: E731
    if any(isinstance(baseline(r), float) for r in llc_rows):
        for name, row in (("init", init), ("peak", peak), ("final", final)):
            summary[f"quadratic_{name}"] = baseline(row)
            summary[f"gap_{name}"] = (row["llc_mean"] - baseline(row)
                                      if isinstance(baseline(row), float) else None)
    if grok is not None:
        before = [r["llc_mean"] for r in trusted if r["step"] <= grok]
        after = [r["llc_mean"] for r in trusted if r["step"] >= grok]
        summary["llc_at_grok"] = before[-1] if before else None
        summary["llc_falls_after_grok"] = bool(after and before and min(after) < before[-1])
        summary["peak_before_grok"] = peak["step"] <= grok
    return summary


def load_run(folder: str | Path) -> tuple[dict, list[dict]] | None:
    """A finished regime folder's summary (recomputed from its rows) and rows, or None if
    it is not finished."""
    folder = Path(folder)
    if not (folder / SUMMARY_NAME).exists() or not (folder / CSV_NAME).exists():
        return None
    summary = json.loads((folder / SUMMARY_NAME).read_text())
    rows = read_rows(folder / CSV_NAME)
    # what the rows show is recomputed, so a summary written by an earlier rule is refreshed
    fresh = {**summary, **summarize(rows, wall_seconds=summary.get("wall_seconds"),
                                    probe_seconds=summary.get("probe_seconds"),
                                    grok_accuracy=summary.get("grok_accuracy", 0.9))}
    if fresh != summary:
        write_json_atomic(folder / SUMMARY_NAME, fresh)
    return fresh, rows


def aggregate(summaries: list[dict], keys=("llc_init", "llc_peak", "llc_final", "llc_peak_step",
                                           "grok_step", "final_test_acc",
                                           "wall_seconds")) -> dict:
    """Mean and std over runs of each key (None where a run lacks it, e.g. never grokked)."""
    result = {"num_runs": len(summaries)}
    for key in keys:
        values = [s.get(key) for s in summaries]
        finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        result[key] = float(np.mean(finite)) if finite else None
        result[f"{key}_std"] = float(np.std(finite)) if len(finite) > 1 else (0.0 if finite else None)
        result[f"{key}_count"] = len(finite)
    return result


def report(root: str | Path, replot: bool = False) -> str:
    """Markdown table over every finished run under ``root/<setup>/seed<k>/<regime>``: λ̂ at
    init, peak and end (mean ± std over seeds) with their excess ratios, where the peak
    and the fall sit relative to the test-accuracy jump, how many estimates were not
    local, and the time spent estimating. ``replot`` redraws each run's trajectory.png."""
    root = Path(root)
    header = ["setup", "regime", "seeds", "grokked", "λ̂ init (r)", "λ̂ peak of local points (step; r)",
              "λ̂ final (r)", "grokking step", "peak before grokking",
              "λ̂ falls after grokking", "fall from peak", "points not local",
              "estimating s/run"]
    table = []
    for setup_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        regimes = sorted({p.name for p in setup_dir.glob("seed*/*") if p.is_dir()
                          and (p / SUMMARY_NAME).exists()},
                         key=lambda r: (REGIMES.index(r) if r in REGIMES else len(REGIMES), r))
        for regime in regimes:
            folders = sorted(setup_dir.glob(f"seed*/{regime}"))
            runs = [load_run(d) for d in folders]
            summaries = [r[0] for r in runs if r is not None]
            if replot:
                for folder, run in zip(folders, runs):
                    if run is not None:
                        summary, rows = run
                        plot_grokking(rows, folder / PLOT_NAME, grok_step=summary["grok_step"],
                                      grok_accuracy=summary.get("grok_accuracy", 0.9),
                                      title=f"{summary['setup']} ({summary['activation']}, "
                                            f"seed {summary['seed']}, {regime} LLC)")
            if not summaries:
                continue
            agg = aggregate(summaries, keys=(
                "llc_init", "llc_peak", "llc_peak_step", "llc_final", "grok_step",
                "llc_fall_fraction", "llc_seconds", "llc_init_excess_ratio",
                "llc_peak_excess_ratio", "llc_final_excess_ratio"))
            pm = lambda key, fmt=".3g": mean_pm_std(agg[key], agg[f"{key}_std"], fmt)  # noqa: E731
            count = lambda key: f"{sum(bool(s.get(key)) for s in summaries)}/{len(summaries)}"  # noqa: E731
            ratio = lambda key: mean_pm_std(agg[key], None, ".2f")  # noqa: E731
            not_local = sum(s.get("not_local_points") or 0 for s in summaries)
            points = sum(s.get("num_llc_points") or 0 for s in summaries)
            table.append([setup_dir.name, regime, len(summaries), count("grokked"),
                          f"{pm('llc_init')} ({ratio('llc_init_excess_ratio')})",
                          f"{pm('llc_peak')} ({pm('llc_peak_step', '.0f')}; "
                          f"{ratio('llc_peak_excess_ratio')})",
                          f"{pm('llc_final')} ({ratio('llc_final_excess_ratio')})",
                          pm("grok_step", ".0f"), count("peak_before_grok"),
                          count("llc_falls_after_grok"), pm("llc_fall_fraction", ".0%"),
                          f"{not_local}/{points}", pm("llc_seconds", ".0f")])
    return "\n".join(markdown_table(header, table)) + "\n"


def claims(summary: dict, series: str = "llc") -> dict:
    """The grokking claims on one run, for λ̂ (``"llc"``) or for the curvature baseline
    (``"quadratic"``, read at λ̂'s init, peak and final steps): small at initialisation
    (≤ ``SMALL_AT_INIT`` of the peak), rises while fitting (peak ≥ ``RISE_FACTOR`` × init,
    before grokking), falls through grokking (the final value at least ``MIN_FALL`` below
    the peak, after grokking); None where the run has no such value."""
    init, peak, final = (summary.get(f"{series}_{k}") for k in ("init", "peak", "final"))
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (init, peak, final)):
        return {"small_at_init": None, "rises": None, "falls": None, "fall": None}
    fall = (peak - final) / abs(peak) if peak else None
    grokked = summary.get("grok_step") is not None
    # λ̂ at an initialisation that is not a critical point is not assessed, nor a rise from it
    assessable = summary.get("llc_init_trusted", True)
    return {"small_at_init": init <= SMALL_AT_INIT * peak if assessable else None,
            "rises": (peak >= RISE_FACTOR * init and bool(summary.get("peak_before_grok", True))
                      if assessable else None),
            "falls": (grokked and fall is not None and fall >= MIN_FALL) if grokked else None,
            "fall": fall}


def _count(values: list) -> str:
    known = [v for v in values if v is not None]
    return f"{sum(bool(v) for v in known)}/{len(known)}" if known else "—"


def resolution_report(root: str | Path) -> str:
    """Per setup and resolution regime (local, local-x3, local-x10): in how many seeds each
    claim holds for λ̂ and for the curvature baseline, the fall from the peak, and the
    share of λ̂ at its peak that the baseline explains. Draws ``<setup>/resolutions.png``."""
    root = Path(root)
    header = ["setup", "regime", "γ", "seeds", "λ̂ small at init", "λ̂ rises", "λ̂ falls",
              "λ̂ fall from peak", "baseline small at init", "baseline rises",
              "baseline falls", "baseline fall", "baseline / λ̂ at peak", "points not local",
              "points not at a critical point"]
    table = []
    for setup_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        runs_by_regime = {}
        for regime in ("local", "local-x3", "local-x10"):
            runs = [load_run(d) for d in sorted(setup_dir.glob(f"seed*/{regime}"))]
            runs = [r for r in runs if r is not None]
            if not runs:
                continue
            runs_by_regime[regime] = runs
            summaries = [s for s, _ in runs]
            mine = [claims(s) for s in summaries]
            base = [claims(s, "quadratic") for s in summaries]
            falls = [c["fall"] for c in mine if c["fall"] is not None]
            base_falls = [c["fall"] for c in base if c["fall"] is not None]
            explained = [s["quadratic_peak"] / s["llc_peak"] for s in summaries
                         if isinstance(s.get("quadratic_peak"), float) and s.get("llc_peak")]
            gammas = sorted({r["localization"] for _, rows in runs for r in rows
                             if r.get("localization") is not None})
            table.append([
                setup_dir.name, regime, ", ".join(f"{g:g}" for g in gammas), len(runs),
                _count([c["small_at_init"] for c in mine]), _count([c["rises"] for c in mine]),
                _count([c["falls"] for c in mine]),
                mean_pm_std(np.mean(falls) if falls else None,
                            np.std(falls) if len(falls) > 1 else None, ".0%"),
                _count([c["small_at_init"] for c in base]), _count([c["rises"] for c in base]),
                _count([c["falls"] for c in base]),
                mean_pm_std(np.mean(base_falls) if base_falls else None,
                            np.std(base_falls) if len(base_falls) > 1 else None, ".0%"),
                mean_pm_std(np.mean(explained) if explained else None,
                            np.std(explained) if len(explained) > 1 else None, ".2f"),
                f"{sum(s.get('not_local_points') or 0 for s in summaries)}/"
                f"{sum(s.get('num_llc_points') or 0 for s in summaries)}",
                f"{sum(s.get('not_critical_points') or 0 for s in summaries)}/"
                f"{sum(s.get('num_llc_points') or 0 for s in summaries)}"])
        if len(runs_by_regime) > 1:
            plot_resolutions({regime: [rows for _, rows in runs]
                              for regime, runs in runs_by_regime.items()},
                             setup_dir / RESOLUTIONS_PLOT,
                             title=f"{setup_dir.name}: λ̂ and the curvature baseline by γ "
                                   "(seeds: mean, range)")
    if not table:
        return ""
    return "\n".join(markdown_table(header, table)) + "\n"
