"""Deep linear networks at their teachers: the data's pull, and what a long run reads.

    python benchmarks/teacher_pull.py [--out results/benchmarks] [--steps 40000]

For the validation suite's deep linear networks at their teachers (n = 20,000, unit
noise, nβ = n/log n), the pull nβ·(L_n(teacher) − L_n(w_s)), w_s the settled minimum
nearby, and explicit SGLD at γ = 3 and 10 from the teacher and from w_s on the same
Brownian path (8 chains, ε = 3·10⁻⁵, batch 500, the second half of ``--steps`` steps
averaged). If the localised posterior is one distribution, λ̂(w_s) − λ̂(teacher) is the
pull; λ̂(w_s) itself shows what γ and the step leave of λ once the chains have relaxed
(γ·ε·steps ≥ 3.6 at γ = 3). One thread; writes ``OUT/teacher_pull.md``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import slt_probe
from slt_probe.ground_truth import problems
from slt_probe.reports import markdown_table
from slt_probe.run_log import write_text_atomic
from slt_probe.settings import default_nbeta

CASES = [
    ("deep linear 6-4-4-6 r=1", lambda: problems.deep_linear([6, 4, 4, 6], 1, 20_000)),
    ("deep linear 5-12-8-4-7 r=1",
     lambda: problems.deep_linear([5, 12, 8, 4, 7], 1, 20_000, seed=2)),
]
GAMMAS = (3.0, 10.0)
LR, CHAINS = 3e-5, 8
HEADER = ["truth", "d", "λ", "pull", "λ − pull", "γ", "λ̂ at the teacher ± s.e.",
          "λ̂ at w_s ± s.e.", "difference", "teacher vs λ − pull", "w_s vs λ", "s"]


def late_mean(model, data, gamma: float, steps: int) -> tuple[float, float]:
    """λ̂ over the second half of one explicit run, and its s.e. across chains."""
    result = slt_probe.estimate_llc(
        model, data, loss_fn="gaussian_nll",
        sampler=slt_probe.SGLD(lr=LR, localization=gamma), num_chains=CHAINS,
        num_draws=steps, batch_size=500, seed=0, gradient_correction=False, verbose=False)
    per_chain = np.asarray(result.llc_trace)[:, steps // 2:].mean(axis=1)
    return float(per_chain.mean()), float(per_chain.std(ddof=1) / np.sqrt(CHAINS))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/benchmarks")
    parser.add_argument("--steps", type=int, default=40_000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    for name, make in CASES:
        teacher = make()
        settled = copy.deepcopy(teacher).settle()
        nbeta = default_nbeta(len(teacher.x))
        pull = teacher.teacher_pull(nbeta)
        truth = float(teacher.true_lambda)
        for gamma in GAMMAS:
            started = time.perf_counter()
            at_teacher = late_mean(teacher.model, (teacher.x, teacher.y), gamma, args.steps)
            at_settled = late_mean(settled.model, (teacher.x, teacher.y), gamma, args.steps)
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
        f"Measured with `{command}` (one thread): explicit SGLD, {CHAINS} chains, ε = {LR:g}, "
        f"{args.steps:,} steps from the point, the second half averaged; nβ = n/log n; the "
        "teacher and the settled minimum w_s on the same Brownian path. pull = "
        "nβ·(L_n(teacher) − L_n(w_s)).", "", *markdown_table(HEADER, rows)]) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "teacher_pull.md", text)
    print(f"wrote {out / 'teacher_pull.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
