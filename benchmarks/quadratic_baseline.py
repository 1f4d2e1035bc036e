"""The curvature baseline ½Σ nβh/(nβh + γ) beside λ̂ on the truths.

    python benchmarks/quadratic_baseline.py [--out results/benchmarks]

On regular truths (linear regression at fresh shapes and data seeds, the tanh
teacher-student network) the baseline must be E[λ̂]: equal to the exact value where it is
known and to the sampled λ̂ within its standard error. On singular truths (reduced-rank
regression, deep linear networks) it is reported beside λ̂ and the true λ: what the
baseline misses is the part of λ̂ that a quadratic loss cannot give. Each point is a
settled minimum of L_n (so the gradient's pull is zero). λ̂ is one explicit SGLD (8
chains, nβ = n/log n, one thread) with ε chosen from the Hessian's largest eigenvalue so
that ε·(nβh_max + γ) = 0.04, and enough steps for the flattest direction to relax (ten
relaxation times 2/(εγ) of burn-in and draws, capped at 10,000 steps each). Writes ``OUT/quadratic_baseline.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import slt_probe
from slt_probe.ground_truth import problems
from slt_probe.reports import markdown_table
from slt_probe.run_log import write_text_atomic

HEADER = ["truth", "d", "n", "γ", "λ (large n)", "exact E[λ̂] (linear model)",
          "quadratic baseline", "h_min", "λ̂ ± s.e.", "λ̂ − baseline", "ε", "steps", "s"]
CASES = [
    ("regular d=15, 5→3", lambda: problems.regular(5, 3, 20_000, seed=21)),
    ("regular d=24", lambda: problems.regular(24, 1, 20_000, seed=22)),
    ("tanh teacher-student 2-3-1", lambda: problems.tanh_teacher_student(50_000, seed=23)),
    ("rrr 8-4-6 r=2", lambda: problems.deep_linear([8, 4, 6], 2, 20_000, seed=24)),
    ("deep linear 4-5-5-4 r=2", lambda: problems.deep_linear([4, 5, 5, 4], 2, 20_000, seed=25)),
    ("deep linear 6-4-4-6 r=1", lambda: problems.deep_linear([6, 4, 4, 6], 1, 20_000, seed=26)),
]
GAMMAS = (10.0, 100.0)


def run_case(name, make, gamma):
    started = time.perf_counter()
    p = make().settle()
    data = (p.x, p.y)
    q = slt_probe.quadratic_llc(p.model, data, loss_fn=p.loss_fn, localization=gamma,
                                verbose=False)
    top = float(q.eigenvalues.max())
    lr = 0.04 / (q.nbeta * top + gamma)
    relax = int(2 / (lr * gamma))
    draws = min(max(2_000, 6 * relax), 10_000)
    burnin = min(max(500, 4 * relax), 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = slt_probe.estimate_llc(p.model, data, loss_fn=p.loss_fn,
                                   sampler=slt_probe.SGLD(lr=lr, localization=gamma),
                                   num_chains=8, num_draws=draws,
                                   num_burnin=burnin, batch_size=1_000, verbose=False,
                                   gradient_correction=False)
    linear = isinstance(p.model, torch.nn.Linear)
    expected = p.expected_llc(nbeta=q.nbeta, localization=gamma) if linear else None
    baseline = (f"{q.value:.3f}" if q.bounded else
                f"unbounded (nβh_min + γ = {q.nbeta * q.min_eigenvalue + gamma:.3g})")
    gap = f"{r.llc_mean - q.value:+.3f}" if q.bounded else "—"
    return [name, p.num_params, len(p.y), f"{gamma:g}", f"{float(p.true_lambda):.3g}",
            "—" if expected is None else f"{expected:.3f}", baseline,
            f"{q.min_eigenvalue:.2g}", f"{r.llc_mean:.3f} ± {r.llc_sem:.3f}", gap,
            f"{lr:.2e}", f"{burnin} + {draws}", f"{time.perf_counter() - started:.0f}"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name, make in CASES:
        for gamma in GAMMAS:
            rows.append(run_case(name, make, gamma))
            print(" | ".join(map(str, rows[-1])), flush=True)
    command = "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:])
    text = ("# Curvature baseline beside λ̂ on the truths\n\n"
            f"`{command.strip()}` (one thread; each point a settled minimum of L_n; 8 "
            "chains of explicit SGLD, nβ = n/log n, no gradient correction)\n\n"
            + "\n".join(markdown_table(HEADER, rows)) + "\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out) / "quadratic_baseline.md", text)


if __name__ == "__main__":
    main()
