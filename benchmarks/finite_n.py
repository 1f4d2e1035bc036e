"""SGLD against the exact finite-n E[λ̂], where the posterior is solvable.

The true λ is a large-n limit; at a given n, nβ and γ a perfect sampler reports
``KnownProblem.expected_llc`` instead (monomials: quadrature; regular model: closed
form). Comparing with it separates the sampler's error (step bias, relaxation) from the
estimator's own finite-n bias. Each run burns in and draws for a fixed Langevin time
ε·t, so the ε rows differ only in step size.

    python benchmarks/finite_n.py > results/benchmarks/finite_n.txt
"""
from __future__ import annotations

import argparse
import time
import warnings

from slt_probe import SGLD, estimate_llc
from slt_probe.core.settings import default_nbeta
from slt_probe.ground_truth import problems as known_models

BATCH_SIZE = 500


def _run(problem, *, lr: float, localization: float, langevin_time: float, chains: int) -> None:
    truth = float(problem.true_lambda)
    steps = round(langevin_time / lr)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = estimate_llc(problem.model, (problem.x, problem.y), loss_fn=problem.loss_fn,
                              sampler=SGLD(lr=lr, localization=localization),
                              num_chains=chains, num_draws=steps, num_burnin=steps,
                              batch_size=BATCH_SIZE, seed=0, verbose=False)
    expected = problem.expected_llc(nbeta=result.config["nbeta"], localization=localization)
    print(f"{problem.name:20s} γ = {localization:<8.4g} λ = {truth:<7.4g} "
          f"exact E[λ̂] = {expected:<7.4f} ({expected / truth - 1:+.1%} of λ)  "
          f"ε = {lr:<7.2g} {chains} chains × {steps} draws ({steps} burn-in)  "
          f"λ̂ = {result.llc_mean:.4f} ± {result.llc_sem:.4f} s.e.  "
          f"vs exact {result.llc_mean / expected - 1:+.1%}, vs λ {result.llc_mean / truth - 1:+.1%}"
          f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=32)
    args = parser.parse_args()
    for b in (2, 3):
        problem = known_models.monomial(1, b, 20_000).settle()
        for lr in (5e-4, 2.5e-4):
            _run(problem, lr=lr, localization=1.0, langevin_time=3.0, chains=args.chains)
    regular = known_models.regular(20, 1, 20_000).settle()
    strong = default_nbeta(20_000)  # halves the regular model's E[λ̂]
    for lr in (2e-5, 1e-5, 5e-6):
        _run(regular, lr=lr, localization=strong, langevin_time=0.02, chains=8)


if __name__ == "__main__":
    main()
