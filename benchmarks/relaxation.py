"""Under-relaxation against discretisation bias: λ̂ over time windows for a ladder of ε.

Why automatic calibration must not compare step sizes on chains that have not relaxed
(``slt_probe.calibrate`` therefore relaxes them first, with a warm-up). Chains start at w*
and λ̂ climbs while they spread along flat directions; a run of a fixed number of steps
at a small ε stops before they have spread, so an equal-steps sweep reads λ̂ too low at
small ε and mistakes that for a plateau. This script runs every ε of
a ladder for the same number of steps from w* (no burn-in) and prints λ̂/λ over the
octiles of the run, and λ̂/λ over a common Langevin window [τ/2, τ] where the runs
reach it.

    python benchmarks/relaxation.py                       # deep linear 5-5-5-5, r = 2
    python benchmarks/relaxation.py --widths 5,4,5 --rank 0 --steps 8000
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from slt_probe import SGLD, estimate_llc
from slt_probe.ground_truth import problems as known_models

BATCH_SIZE = 500


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="5,5,5,5")
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--lrs", default="1e-6,2e-6,5e-6,1e-5,2e-5,5e-5")
    parser.add_argument("--steps", type=int, default=16_000)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--localization", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    problem = known_models.deep_linear(widths, args.rank, args.n, args.seed).settle()
    truth = float(problem.true_lambda)
    lrs = sorted(float(v) for v in args.lrs.split(","))
    print(f"{problem.name}: d = {problem.num_params}, true λ = {problem.true_lambda} "
          f"({truth:.4g}); {args.chains} chains × {args.steps} steps from w*, "
          f"γ = {args.localization:g}, batch {BATCH_SIZE}")
    traces = {}
    for lr in lrs:
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = estimate_llc(problem.model, (problem.x, problem.y),
                                  loss_fn=problem.loss_fn,
                                  sampler=SGLD(lr=lr, localization=args.localization),
                                  num_chains=args.chains, num_draws=args.steps, num_burnin=0,
                                  batch_size=BATCH_SIZE, verbose=False)
        traces[lr] = np.nanmean(result.llc_trace, axis=0) / truth
        octiles = [chunk.mean() for chunk in np.array_split(traces[lr], 8)]
        print(f"ε = {lr:.3g}  ε·T = {lr * args.steps:.3g}  λ̂/λ by octile: "
              + " ".join(f"{v:.2f}" for v in octiles)
              + f"  last half {traces[lr][args.steps // 2:].mean():.3f}"
              + f"  MALA acc {result.diagnostics['mala_acceptance']:.2f}"
              + f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    tau = min(lrs) * args.steps  # the longest time every run reaches
    print(f"\nequal Langevin time: λ̂/λ over ε·t ∈ [{tau / 2:.3g}, {tau:.3g}]")
    for lr in lrs:
        start, stop = int(round(tau / 2 / lr)), int(round(tau / lr))
        print(f"ε = {lr:.3g}  steps [{start}, {stop})  λ̂/λ = {traces[lr][start:stop].mean():.3f}")


if __name__ == "__main__":
    main()
