"""Accuracy on known-λ problems, control variate vs plain, and SGLD's step-size bias.

    python benchmarks/accuracy.py [--out results/accuracy]

Runs every case in ``slt_probe.known_models.CASES`` with its stated settings (seed 0)
under both estimators, then sweeps ε on the regular d=20 model. Writes accuracy.md,
accuracy.csv and step_bias.csv.
"""
from __future__ import annotations

import argparse
import csv
import time
import warnings
from pathlib import Path

from slt_probe import SGLD, estimate_llc
from slt_probe import known_models as km


def run_case(case, estimator, lr=None, seed=0):
    problem = case.make().settle()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = estimate_llc(problem.model, (problem.x, problem.y), loss_fn=problem.loss_fn,
                              sampler=SGLD(lr=lr or case.lr, localization=case.localization),
                              num_chains=case.num_chains, num_draws=case.num_draws,
                              num_burnin=case.num_burnin, batch_size=case.batch_size,
                              estimator=estimator, seed=seed, verbose=False)
    truth = float(problem.true_lambda)
    return {"case": problem.name, "d": problem.num_params, "n": len(problem.x),
            "true_lambda": truth, "estimator": estimator, "lr": lr or case.lr,
            "chains": case.num_chains, "draws": case.num_draws, "burnin": case.num_burnin,
            "llc_mean": result.llc_mean, "llc_std": result.llc_std, "llc_sem": result.llc_sem,
            "relative_error": (result.llc_mean - truth) / truth,
            "rhat": result.diagnostics["rhat"], "healthy": result.diagnostics["healthy"],
            "seconds": time.perf_counter() - start}


def write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="results/accuracy")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in km.CASES.values():
        for estimator in ("control_variate", "plain"):
            rows.append(run_case(case, estimator))
            r = rows[-1]
            print(f"{r['case']:24s} {estimator:16s} true {r['true_lambda']:.4f} "
                  f"est {r['llc_mean']:.4f} ± {r['llc_std']:.4f} rel {r['relative_error']:+.3f} "
                  f"{r['seconds']:.1f}s", flush=True)
    write_csv(out / "accuracy.csv", rows)
    bias = [run_case(km.CASES["regular-20"], "control_variate", lr=lr)
            for lr in (3e-6, 1e-5, 3e-5, 1e-4, 3e-4)]
    write_csv(out / "step_bias.csv", bias)
    lines = ["Measured with `python benchmarks/accuracy.py` (seed 0; settings per case in "
             "`slt_probe.known_models.CASES`, γ = 1, batch 500).", "",
             "| case | d | true λ | estimator | ε | chains × draws (burn-in) | λ̂ ± std | "
             "s.e. | rel. error | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['d']} | {r['true_lambda']:.4f} | {r['estimator']} | "
                     f"{r['lr']:g} | {r['chains']} × {r['draws']} ({r['burnin']}) | "
                     f"{r['llc_mean']:.4f} ± {r['llc_std']:.4f} | {r['llc_sem']:.4f} | "
                     f"{r['relative_error']:+.1%} | {r['seconds']:.0f} |")
    lines += ["", "SGLD step-size bias on the regular model (d = 20, true λ = 10):", "",
              "| ε | λ̂ ± std | rel. error |", "|---|---|---|"]
    for r in bias:
        lines.append(f"| {r['lr']:g} | {r['llc_mean']:.3f} ± {r['llc_std']:.3f} | "
                     f"{r['relative_error']:+.1%} |")
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
