"""Command line: ``slt-probe estimate`` (λ̂ on a bundled problem whose true λ is known) and
``slt-probe validate`` (the ground-truth suite under automatic calibration)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .api import estimate_llc
from .experiments.compare import run_comparison
from .experiments.grokking import run_grokking
from .experiments.presets import SETUPS
from .experiments.summary import report
from .ground_truth import problems
from .ground_truth.validate import validate
from .models import ACTIVATION_NAMES
from .samplers import SGLD


def _estimate(args) -> int:
    case = problems.CASES[args.case]
    problem = case.make().settle()
    started = time.perf_counter()
    result = estimate_llc(
        problem.model, (problem.x, problem.y), loss_fn=problem.loss_fn,
        sampler=SGLD(lr=args.lr or case.lr, localization=case.localization),
        num_chains=args.chains or case.num_chains, num_draws=args.draws or case.num_draws,
        num_burnin=case.num_burnin if args.burnin is None else args.burnin,
        batch_size=case.batch_size, seed=args.seed, estimator=args.estimator,
        verbose=not args.quiet)
    seconds = time.perf_counter() - started
    truth = float(problem.true_lambda)
    rel = (result.llc_mean - truth) / truth
    print(f"{problem.name}: d = {problem.num_params}, n = {len(problem.x)}, "
          f"nβ = {result.nbeta:.1f}")
    print(f"  true λ = {problem.true_lambda} = {truth:.4f}")
    print(f"  λ̂      = {result.llc_mean:.4f} ± {result.llc_std:.4f} (std over "
          f"{result.config['num_chains']} chains; s.e. {result.llc_sem:.4f})")
    print(f"  relative error {rel:+.1%}; effective parameters 2λ̂ = "
          f"{result.effective_params:.2f} of {problem.num_params}")
    print(f"  R-hat {result.diagnostics['rhat']:.3f}, ESS {result.diagnostics['ess']:.0f}, "
          f"healthy: {result.diagnostics['healthy']}, {seconds:.1f} s")
    for warning in result.diagnostics["warnings"]:
        print(f"  warning: {warning}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"case": args.case, "problem": problem.name, "true_lambda": truth,
                  "true_lambda_exact": str(problem.true_lambda), "relative_error": rel,
                  "command": " ".join(["slt-probe", *sys.argv[1:]]), **result.to_dict()}
        path = out / f"{args.case}.json"
        path.write_text(json.dumps(record, indent=1))
        print(f"  wrote {path}")
    return 0


def _validate(args) -> int:
    command = " ".join(["slt-probe", *sys.argv[1:]]) if sys.argv[1:] else "slt-probe validate"
    validate(quick=args.quick, out=args.out, command=command, verbose=True)
    return 0


def _grokking(args) -> int:
    out = args.out or f"results/grokking/{args.setup}{'-quick' if args.quick else ''}"
    command = " ".join(["slt-probe", *sys.argv[1:]])
    summary = run_grokking(args.setup, activation_name=args.activation, seed=args.seed,
                           quick=args.quick, out=out, mnist_dir=args.mnist_dir,
                           command=command, verbose=not args.quiet)
    keys = ("llc_init", "llc_peak", "llc_peak_step", "llc_final", "train_acc_100_step",
            "test_acc_50_step", "grok_step", "final_test_acc", "wall_seconds")
    for key in keys:
        value = summary.get(key)
        print(f"  {key:20s} {value:.4g}" if isinstance(value, float) else f"  {key:20s} {value}")
    print(f"  wrote {out}/llc.csv, summary.json, manifest.json, trajectory.png")
    return 0


def _compare(args) -> int:
    activations = [a.strip() for a in args.activations.split(",") if a.strip()]
    out = args.out or f"results/compare/{args.setup}{'-quick' if args.quick else ''}"
    command = " ".join(["slt-probe", *sys.argv[1:]])
    rows = run_comparison(args.setup, activations, args.seeds, quick=args.quick, out=out,
                          mnist_dir=args.mnist_dir, command=command, verbose=not args.quiet)
    for row in rows:
        print(f"  {row['activation']:8s} λ̂ init {row['llc_init']:.3g}  peak {row['llc_peak']:.3g}"
              f"  final {row['llc_final']:.3g}  grok step {row['grok_step']}  "
              f"disagreement {row['disagreement']}")
    print(f"  wrote {out}/summary.csv, summary.md, trajectories.png, redshift.png")
    return 0


def _grokking_report(args) -> int:
    table = report(args.root, replot=args.replot)
    path = Path(args.root) / "README.md"
    path.write_text("# Grokking runs\n\nRegenerate this table: `slt-probe grokking-report "
                    f"--root {args.root}`\n\n" + table)
    print(table)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slt-probe", description="Local learning "
                                     "coefficient (effective parameter count) estimates.")
    sub = parser.add_subparsers(dest="command", required=True)
    est = sub.add_parser("estimate", help="estimate λ̂ on a bundled problem with known λ")
    est.add_argument("--case", choices=sorted(problems.CASES), default="rrr-5-4-5-r0")
    est.add_argument("--lr", type=float, default=None, help="SGLD step (default: the case's)")
    est.add_argument("--chains", type=int, default=None)
    est.add_argument("--draws", type=int, default=None)
    est.add_argument("--burnin", type=int, default=None)
    est.add_argument("--seed", type=int, default=0)
    est.add_argument("--estimator", choices=["control_variate", "plain"],
                     default="control_variate")
    est.add_argument("--out", default="results/estimate", help="folder for the JSON result "
                     "('' to skip)")
    est.add_argument("--quiet", action="store_true", help="no progress bar")
    est.set_defaults(run=_estimate)
    val = sub.add_parser("validate", help="ground-truth suite with automatic calibration only")
    val.add_argument("--quick", action="store_true", help="the small cases only (< 5 min)")
    val.add_argument("--out", default="results/validation")
    val.set_defaults(run=_validate)
    grok = sub.add_parser("grokking", help="train a bundled grokking setup with the probe")
    grok.add_argument("--setup", choices=SETUPS, required=True)
    grok.add_argument("--activation", choices=ACTIVATION_NAMES, default=None,
                      help="default: the setup's published one (GELU for modadd-mlp, else ReLU)")
    grok.add_argument("--seed", type=int, default=0)
    grok.add_argument("--quick", action="store_true", help="the small preset (< 3 min)")
    grok.add_argument("--out", default=None, help="run folder (default results/grokking/SETUP)")
    grok.add_argument("--mnist-dir", default=None, help="folder with the MNIST IDX files "
                      "(default: $SLT_PROBE_MNIST_DIR)")
    grok.add_argument("--quiet", action="store_true", help="no progress bar")
    grok.set_defaults(run=_grokking)
    rep = sub.add_parser("grokking-report", help="table over finished grokking runs")
    rep.add_argument("--root", default="results/grokking")
    rep.add_argument("--replot", action="store_true", help="redraw each run's trajectory.png")
    rep.set_defaults(run=_grokking_report)
    comp = sub.add_parser("compare", help="LLC trajectories across activations and seeds")
    comp.add_argument("--setup", choices=SETUPS, required=True)
    comp.add_argument("--activations", default="relu,tanh,gelu",
                      help=f"comma-separated, from {','.join(ACTIVATION_NAMES)}")
    comp.add_argument("--seeds", type=int, default=3, help="number of seeds (0 … N-1)")
    comp.add_argument("--quick", action="store_true")
    comp.add_argument("--out", default=None, help="default results/compare/SETUP")
    comp.add_argument("--mnist-dir", default=None)
    comp.add_argument("--quiet", action="store_true")
    comp.set_defaults(run=_compare)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"slt-probe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
