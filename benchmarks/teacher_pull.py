"""Deep linear networks at their teachers: the data's pull, and what a long run reads.

    python benchmarks/teacher_pull.py [--out results/benchmarks] [--warmup 40000]
                                      [--draws 10000]

For the validation suite's deep linear networks at their teachers (n = 20,000, unit
noise, nβ = n/log n), the pull nβ·(L_n(teacher) − L_n(w_s)), w_s the settled minimum
nearby, and explicit SGLD at γ = 3 and 10 from the teacher and from w_s on the same
Brownian path (8 chains, batch 500): a warm-up of ``--warmup`` steps at ε = 3·10⁻⁵ (a
Langevin time of 3.6/γ at γ = 3), 3,000 steps of burn-in and ``--draws`` draws at
ε = 3.9·10⁻⁶ (where the step bias is a few per cent). If the localised posterior is one
distribution, λ̂(w_s) − λ̂(teacher) is the pull; λ̂(w_s) itself shows what γ and the
step leave of λ once the chains have relaxed. One thread; writes ``OUT/teacher_pull.md``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch

import slt_probe
from slt_probe.core.settings import default_nbeta
from slt_probe.experiments import validation
from slt_probe.reports import markdown_table
from slt_probe.run_log import write_text_atomic

# the validation suite's deep linear networks at their teachers
CASES = [case for case in validation.CASES
         if case.at_teacher and case.key.startswith("deep linear")]
GAMMAS = (3.0, 10.0)
WARMUP_LR, LR, CHAINS = 3e-5, 3.9e-6, 8
HEADER = ["truth", "d", "λ", "pull", "λ − pull", "γ", "λ̂ at the teacher ± s.e.",
          "λ̂ at w_s ± s.e.", "difference", "teacher vs λ − pull", "w_s vs λ", "s"]


def relaxed_llc(model, data, gamma: float, warmup: int, draws: int) -> tuple[float, float]:
    """λ̂ of one explicit run after a long warm-up, and its s.e. across chains."""
    result = slt_probe.estimate_llc(
        model, data, loss_fn="gaussian_nll",
        sampler=slt_probe.SGLD(lr=LR, localization=gamma), num_chains=CHAINS,
        warmup_lr=WARMUP_LR, num_warmup=warmup, num_burnin=3000, num_draws=draws,
        batch_size=500, seed=0, gradient_correction=False, verbose=False)
    return result.llc_mean, result.llc_sem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/benchmarks")
    parser.add_argument("--warmup", type=int, default=40_000)
    parser.add_argument("--draws", type=int, default=10_000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    for case in CASES:
        name = case.key.removesuffix(" at its teacher")
        teacher = case.make()
        settled = copy.deepcopy(teacher).settle()
        nbeta = default_nbeta(len(teacher.x))
        pull = teacher.teacher_pull(nbeta, settled)
        truth = float(teacher.true_lambda)
        for gamma in GAMMAS:
            started = time.perf_counter()
            at_teacher = relaxed_llc(teacher.model, (teacher.x, teacher.y), gamma,
                                     args.warmup, args.draws)
            at_settled = relaxed_llc(settled.model, (teacher.x, teacher.y), gamma,
                                     args.warmup, args.draws)
            rows.append([name, teacher.num_params, f"{truth:g}", f"{pull:.3f}",
                         f"{truth - pull:.3f}", f"{gamma:g}",
                         f"{at_teacher[0]:.2f} ± {at_teacher[1]:.2f}",
                         f"{at_settled[0]:.2f} ± {at_settled[1]:.2f}",
                         f"{at_settled[0] - at_teacher[0]:.3f}",
                         f"{at_teacher[0] / (truth - pull) - 1:+.1%}",
                         f"{at_settled[0] / truth - 1:+.1%}",
                         f"{time.perf_counter() - started:.0f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    command = "python benchmarks/teacher_pull.py" + ("" if argv is None and len(sys.argv) == 1
                                                     else " " + " ".join(sys.argv[1:]))
    text = "\n".join([
        f"Measured with `{command}` (one thread): explicit SGLD, {CHAINS} chains, a warm-up "
        f"of {args.warmup:,} steps at ε = {WARMUP_LR:g}, 3,000 burn-in and {args.draws:,} "
        f"draws at ε = {LR:g}; nβ = n/log n; the teacher and the settled minimum w_s on the "
        "same Brownian path. pull = nβ·(L_n(teacher) − L_n(w_s)).", "",
        *markdown_table(HEADER, rows)]) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "teacher_pull.md", text)
    print(f"wrote {out / 'teacher_pull.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
