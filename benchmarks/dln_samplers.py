"""Explicit samplers on a deep linear network at its teacher: what limits λ̂ at scale.

    python benchmarks/dln_samplers.py --size 1e4 [--n 20000]
        --runs rmsprop:1e-4:1:4000:20000,sgld:1.6e-6:10:1000:2000 [--out results/benchmarks]
    python benchmarks/dln_samplers.py --widths 2-3-4-2 --rank 1 --n 50000 --settled
        --chains 64 --runs rmsprop:1e-4:10:4000:20000
    python benchmarks/dln_samplers.py --regular 20 --settled --chains 16 --runs …

The network of ``dln_scale.py`` (four equal layers, rank w/4, unit-noise data from the
teacher, w* = the teacher, nβ = n/log n), sampled with fixed settings instead of the
calibration, so that the step size ε, the localisation γ and the chains' Langevin time can
be varied one at a time (``--widths``/``--rank`` name another network, ``--settled``
estimates at the nearby minimum of L_n instead, where the target is λ itself;
``--regular D`` takes a linear regression on D inputs instead, the control on which the
exact E[λ̂] at the run's nβ and γ is known). Each run is
``sampler:ε:γ:draws:burn-in`` (``sgld``, ``rmsprop``: RMSProp-SGLD with its preconditioner
adapted in the burn-in and fixed for the draws, or ``rmsprop-adaptive``: adapted throughout,
as pSGLD; ``--chains`` chains, default 4,
batch 500, no gradient correction) and prints λ̂ ± s.e. against λ and λ − pull,
the excess ratio and λ̂ over the four quarters of the draws (still drifting or settled).
Appends to ``OUT/dln_samplers.md``.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from dln_scale import shape_for_size  # a sibling script: benchmarks/ is on the path

import slt_probe
from slt_probe import SGLD, RMSPropSGLD
from slt_probe.ground_truth import problems
from slt_probe.reports import append_table

HEADER = ["d", "n", "sampler", "ε", "γ", "burn-in + draws", "λ̂ ± s.e.", "vs λ",
          "vs λ − pull", "vs exact E[λ̂]", "excess ratio", "λ̂ by quarter of the draws", "s"]
SAMPLERS = {"sgld": SGLD, "rmsprop": RMSPropSGLD,
            "rmsprop-adaptive": functools.partial(RMSPropSGLD, adapt="always")}


def parse_run(text: str) -> tuple[str, float, float, int, int]:
    parts = text.split(":")
    if len(parts) != 5 or parts[0] not in SAMPLERS:
        raise SystemExit(f"a run is sampler:ε:γ:draws:burn-in with sampler one of "
                         f"{sorted(SAMPLERS)}, got {text!r}")
    return parts[0], float(parts[1]), float(parts[2]), int(parts[3]), int(parts[4])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1e4")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--widths", default=None, help="e.g. 2-3-4-2 (default: from --size)")
    parser.add_argument("--rank", type=int, default=None,
                        help="default: the rank --size gives (width // 4)")
    parser.add_argument("--regular", type=int, default=None, metavar="D",
                        help="a linear regression on D inputs instead (exact E[λ̂] known)")
    parser.add_argument("--settled", action="store_true",
                        help="estimate at the nearby minimum of L_n, not at the teacher")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--runs", required=True)
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    runs = [parse_run(text) for text in args.runs.split(",")]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    widths, rank = shape_for_size(float(args.size))
    if args.widths:
        widths = [int(w) for w in args.widths.split("-")]
        rank = max(1, min(widths) // 4)
    rank = args.rank if args.rank is not None else rank
    problem = (problems.regular(args.regular, 1, args.n, seed=0) if args.regular
               else problems.deep_linear(widths, rank, args.n, seed=0))
    if args.settled:
        problem.settle()
    truth, pull = float(problem.true_lambda), 0.0 if args.settled else None
    rows = []
    for kind, lr, gamma, draws, burnin in runs:
        started = time.perf_counter()
        r = slt_probe.estimate_llc(
            problem.model, (problem.x, problem.y), loss_fn="gaussian_nll",
            sampler=SAMPLERS[kind](lr=lr, localization=gamma), num_chains=args.chains,
            num_draws=draws, num_burnin=burnin, batch_size=500, seed=0,
            gradient_correction=False, verbose=False)
        seconds = time.perf_counter() - started
        pull = pull if pull is not None else problem.teacher_pull(r.nbeta)
        trace = np.asarray(r.llc_trace)
        quarters = np.array_split(trace, 4, axis=1)
        exact = problem.expected_llc(nbeta=r.nbeta, localization=gamma)
        ratio = r.diagnostics["excess_ratio"]  # None where w* is nearly a constant predictor
        rows.append([f"{problem.num_params:,}", f"{args.n:,}", kind, f"{lr:g}", f"{gamma:g}",
                     f"{burnin:,} + {draws:,}", f"{r.llc_mean:.4g} ± {r.llc_sem:.2g}",
                     f"{r.llc_mean / truth - 1:+.1%}", f"{r.llc_mean / (truth - pull) - 1:+.1%}",
                     "—" if exact is None else f"{r.llc_mean / exact - 1:+.1%} of {exact:.4g}",
                     "n/a" if ratio is None else f"{ratio:.3f}",
                     " ".join(f"{q.mean():.4g}" for q in quarters), f"{seconds:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    command = "python benchmarks/dln_samplers.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    text = append_table(
        Path(args.out) / "dln_samplers.md",
        f"Measured with `{command.strip()}` (CPU, one thread). {problem.name}, w* = "
        + ("the settled minimum of L_n nearby (pull 0), " if args.settled else "the teacher, ")
        + f"true λ = {truth:g}, pull = {pull:.4g} (λ − pull = {truth - pull:.4g}), "
        f"{args.chains} chains, batch 500, no correction.", HEADER, rows)
    print(text)


if __name__ == "__main__":
    main()
