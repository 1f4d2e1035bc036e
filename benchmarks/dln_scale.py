"""Deep linear networks at scale, at their teachers, under automatic calibration only.

    python benchmarks/dln_scale.py [--sizes 1e4,1e5,1e6] [--n 20000] [--max-excess-ratio R]
                                   [--max-relax-steps S] [--max-steps T]
                                   [--out results/benchmarks]

The setup of Furman & Lau (2024): a deep linear network whose weights are a teacher of a
given end-to-end rank, data generated from it with unit Gaussian noise, and λ̂ estimated
at the teacher (w* = the teacher, β = 1/log n) with ``sampler="auto"``. For each size:
widths (four layers of equal width w, so d = 4w²), rank w/4, the true λ (Aoyagi), the
data's pull nβ·(L_n(teacher) − L_n(w_s)) (w_s the settled minimum nearby: λ̂ at the teacher
reads that much below λ̂ at w_s for any sampler), λ̂ ± s.e. against λ and against λ − pull,
the ε, γ and nβ the calibration chose, the locality limit it ran under (``--max-excess-ratio``,
default the library's) and the calibration's step budget (``--max-relax-steps``,
``--max-steps``: ``CalibrationGrid``'s, default the library's; the relaxation budget bounds
how weak a γ the calibration can relax), chains × draws, wall time and peak memory. Each
size runs in its own process (one thread) so that its peak memory is its own. Appends to
``OUT/dln_scale.md``; each size's measurements, with the calibration's reasoning and its
table of runs, are printed as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

import slt_probe
from slt_probe.ground_truth import problems
from slt_probe.reports import append_table

HEADER = ["d", "widths", "rank", "n", "true λ", "pull", "λ̂ ± s.e.", "rel. error",
          "error vs λ − pull", "ε", "γ", "nβ", "locality limit", "excess ratio",
          "relaxation budget", "calibration steps", "chains × draws", "correction",
          "healthy", "calibration s", "estimate s", "peak RSS MB"]


def shape_for_size(size: float) -> tuple[list[int], int]:
    """The widths (five equal, so four w × w layers: d = 4w²) and rank w/4 of the network
    of about ``size`` parameters."""
    width = max(2, round(math.sqrt(size / 4)))
    return [width] * 5, max(1, width // 4)


def one_size(target: int, n: int, draws: int, max_excess_ratio: float | None,
             budget: dict) -> dict:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    widths, rank = shape_for_size(target)
    p = problems.deep_linear(widths, rank, n, seed=0)
    options = {} if max_excess_ratio is None else {"max_excess_ratio": max_excess_ratio}
    if budget:
        options["calibration_grid"] = slt_probe.CalibrationGrid(**budget)
    started = time.perf_counter()
    r = slt_probe.estimate_llc(p.model, (p.x, p.y), loss_fn="gaussian_nll", sampler="auto",
                               num_draws=draws, batch_size=500, verbose=False, **options)
    truth = float(p.true_lambda)
    pull = p.teacher_pull(r.nbeta)
    cal = r.config["calibration"]
    return {"d": p.num_params, "widths": "-".join(map(str, widths)), "rank": rank, "n": n,
            "true_lambda": truth, "llc_mean": r.llc_mean, "llc_sem": r.llc_sem,
            "relative_error": r.llc_mean / truth - 1, "pull": pull,
            "error_vs_target": r.llc_mean / (truth - pull) - 1, "lr": r.config["sampler"]["lr"],
            "localization": r.config["sampler"]["localization"], "nbeta": r.nbeta,
            "max_excess_ratio": r.config["max_excess_ratio"],
            "max_relax_steps": cal["grid"]["max_relax_steps"],
            "calibration_steps": cal["steps"],
            "excess_ratio": r.diagnostics["excess_ratio"],
            "num_chains": r.config["num_chains"], "num_draws": r.config["num_draws"],
            "correction": r.config["gradient_correction"],
            "healthy": r.diagnostics["healthy"], "calibration_seconds": cal["seconds"],
            "estimate_seconds": r.config["seconds"],
            "seconds": time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "calibration_reason": cal["reason"], "calibration_table": cal["table"]}


def _row(m: dict) -> list:
    return [f"{m['d']:,}", m["widths"], m["rank"], f"{m['n']:,}", f"{m['true_lambda']:g}",
            f"{m['pull']:.4g}", f"{m['llc_mean']:.4g} ± {m['llc_sem']:.2g}",
            f"{m['relative_error']:+.1%}", f"{m['error_vs_target']:+.1%}",
            f"{m['lr']:.2g}", f"{m['localization']:g}", f"{m['nbeta']:.4g}",
            f"{m['max_excess_ratio']:g}",
            "n/a" if m["excess_ratio"] is None else f"{m['excess_ratio']:.3f}",
            f"{m['max_relax_steps']:,}", f"{m['calibration_steps']:,}",
            f"{m['num_chains']} × {m['num_draws']}", "on" if m["correction"] else "off",
            "yes" if m["healthy"] else "no", f"{m['calibration_seconds']:.0f}",
            f"{m['estimate_seconds']:.0f}", f"{m['peak_rss_mb']:.0f}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e4,1e5,1e6")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--max-excess-ratio", type=float, default=None,
                        help="the locality limit (default: the library's)")
    parser.add_argument("--max-relax-steps", type=int, default=None,
                        help="CalibrationGrid.max_relax_steps (default: the library's)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="CalibrationGrid.max_steps (default: the library's)")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    budget = {k: v for k, v in (("max_relax_steps", args.max_relax_steps),
                                ("max_steps", args.max_steps)) if v is not None}
    rows = []
    context = multiprocessing.get_context("spawn")
    for size in (int(float(s)) for s in args.sizes.split(",")):
        with context.Pool(1) as pool:
            measured = pool.apply(one_size, (size, args.n, args.draws,
                                               args.max_excess_ratio, budget))
        print(json.dumps(measured), flush=True)
        rows.append(_row(measured))
    command = "python benchmarks/dln_scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = append_table(Path(args.out) / "dln_scale.md",
                        f"Measured with `{command.strip()}` (CPU, one thread per size). "
                        "w* = the teacher, automatic calibration only, batch 500.",
                        HEADER, rows)
    print(text)


if __name__ == "__main__":
    main()
