"""Command line: ``slt-probe estimate`` (λ̂ on a bundled problem whose true λ is known),
``validate`` (the ground-truth suite under automatic calibration), ``grokking`` and
``grokking-report`` (the bundled grokking runs), ``compare`` (activations × seeds).

Every option is checked when the command line is read, before any work starts, and every
expected failure (bad input, a missing or unwritable file, a full disk, a calibration
that finds nothing) ends with one line naming it and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from .api import estimate_llc
from .calibration import CalibrationError
from .core.samplers import SGLD
from .executors import EXECUTORS, make_executor
from .experiments.compare import run_comparison
from .experiments.grokking import default_activation, run_grokking
from .experiments.homogeneity import SETUPS as HOMOGENEITY_SETUPS
from .experiments.homogeneity import preset as homogeneity_preset
from .experiments.homogeneity import run_homogeneity
from .experiments.models import ACTIVATION_NAMES
from .experiments.presets import REGIMES, SETUPS, preset
from .experiments.summary import (
    MIN_FALL,
    RISE_FACTOR,
    SMALL_AT_INIT,
    load_run,
    report,
    resolution_report,
)
from .experiments.sweeps import grokking_sweep
from .experiments.validation import rejudge, validate
from .ground_truth import problems
from .run_log import write_json_atomic, write_text_atomic

RUNS_DIR = "runs"  # where a user's runs go by default: not tracked (see .gitignore)


def _number(kind, low, inclusive: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value != value or (value < low if inclusive else value <= low):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


positive_int = _number(int, 0, False, "a whole number > 0")
non_negative_int = _number(int, 0, True, "a whole number >= 0")
positive_float = _number(float, 0.0, False, "a number > 0")


def _names(allowed, what: str):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"no {what} given")
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from "
                                             f"{','.join(allowed)}")
        return names
    return parse


def _distinct_ints(text: str, what: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         f"{what}") from None
    if not values or any(v < minimum for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct {what} >= {minimum}")
    return values


def _seed_list(text: str) -> list[int]:
    return _distinct_ints(text, "seeds", 0)


def _command() -> str:
    return " ".join(["slt-probe", *sys.argv[1:]])


def _estimate(args) -> int:
    case = problems.CASES[args.case]
    problem = case.make().settle()
    started = time.perf_counter()
    result = estimate_llc(
        problem.model, (problem.x, problem.y), loss_fn=problem.loss_fn,
        sampler=SGLD(lr=args.lr if args.lr is not None else case.lr,
                     localization=case.localization),
        num_chains=args.chains if args.chains is not None else case.num_chains,
        num_draws=args.draws if args.draws is not None else case.num_draws,
        num_burnin=args.burnin if args.burnin is not None else case.num_burnin,
        batch_size=case.batch_size, seed=args.seed, estimator=args.estimator,
        verbose=not args.quiet)
    seconds = time.perf_counter() - started
    truth = float(problem.true_lambda)
    rel = (result.llc_mean - truth) / truth
    d = result.diagnostics
    print(f"{problem.name}: d = {problem.num_params}, n = {len(problem.x)}, "
          f"nβ = {result.nbeta:.1f}, SGLD ε = {result.record.sampler.lr:g}, "
          f"γ = {result.record.sampler.localization:g}")
    print(f"  true λ = {problem.true_lambda} = {truth:.4f}")
    print(f"  λ̂      = {result.llc_mean:.4f} ± {result.llc_std:.4f} (std over "
          f"{result.record.settings.num_chains} chains; s.e. {result.llc_sem:.4f})")
    print(f"  relative error {rel:+.1%}; effective parameters 2λ̂ = "
          f"{result.effective_params:.2f} of {problem.num_params}")
    ratio = d["excess_ratio"]
    print(f"  R-hat {d['rhat']:.3f}, ESS {d['ess']:.0f}, excess ratio "
          f"{'n/a (' + d['locality_note'] + ')' if ratio is None else format(ratio, '.3g')}, "
          f"healthy: {d['healthy']}, {seconds:.1f} s")
    for warning in d["warnings"]:
        print(f"  warning: {warning}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"case": args.case, "problem": problem.name, "true_lambda": truth,
                  "true_lambda_exact": str(problem.true_lambda), "relative_error": rel,
                  "command": _command(), **result.to_dict()}
        path = out / f"{args.case}.json"
        write_json_atomic(path, record)
        print(f"  wrote {path}")
    return 0


def _validate(args) -> int:
    if args.rejudge:
        rejudge(quick=args.quick, out=args.out, command=_command())
        return 0
    validate(quick=args.quick, out=args.out, command=_command(), jobs=args.jobs, verbose=True)
    return 0


def _setup_folder(args, kind: str) -> Path:
    return Path(args.out or f"{RUNS_DIR}/{kind}/{args.setup}{'-quick' if args.quick else ''}")


def _executor(args):
    return make_executor(args.executor, address=args.ray_address)


def _grokking(args) -> int:
    root = _setup_folder(args, "grokking")
    seeds = args.seeds if args.seeds is not None else [args.seed]
    if args.seeds is None and args.executor == "serial":
        # one run in this process, written as it goes (resumable inside the run)
        run_grokking(args.setup, activation_name=args.activation, seed=args.seed,
                     quick=args.quick, out=root / f"seed{args.seed}", regimes=args.regimes,
                     mnist_dir=args.mnist_dir, command=_command(), verbose=not args.quiet)
    else:
        config = preset(args.setup, args.quick)
        act = args.activation or default_activation(config)
        grokking_sweep(args.setup, [(act, seed, root / f"seed{seed}") for seed in seeds],
                       quick=args.quick, config=config, regimes=args.regimes,
                       mnist_dir=args.mnist_dir, executor=_executor(args),
                       command=_command(), verbose=not args.quiet)
    for seed in seeds:
        out = root / f"seed{seed}"
        summaries = {regime: load_run(out / regime)[0] for regime in args.regimes}
        for regime, summary in summaries.items():
            print(f"seed {seed}, {regime} LLC: λ̂ init {summary['llc_init']:.4g}, peak "
                  f"{summary['llc_peak']:.4g} at step {summary['llc_peak_step']}, final "
                  f"{summary['llc_final']:.4g}; grokking step {summary['grok_step']}, final "
                  f"test accuracy {summary['final_test_acc']:.3f}; "
                  f"{summary['not_local_points']}/{summary['num_llc_points']} estimates not "
                  "local")
        print(f"  wrote {out}/ (metrics.csv, model.pt, and per regime llc.csv, summary.json, "
              "manifest.json, trajectory.png)")
    return 0


def _compare(args) -> int:
    out = _setup_folder(args, "compare")
    rows = run_comparison(args.setup, args.activations, args.seeds, quick=args.quick, out=out,
                          regimes=args.regimes, mnist_dir=args.mnist_dir,
                          executor=_executor(args), command=_command(),
                          verbose=not args.quiet)
    for row in rows:
        print(f"  {row['activation']:8s} {row['regime']:8s} λ̂ init {row['llc_init']:.3g}  "
              f"peak {row['llc_peak']:.3g}  final {row['llc_final']:.3g}  grok step "
              f"{row['grok_step']}  disagreement {row['disagreement']}")
    print(f"  wrote {out}/summary.csv, summary.md, trajectories_*.png, redshift.png")
    return 0


def _widths(text: str) -> tuple[int, ...]:
    return tuple(_distinct_ints(text, "widths", 1))


def _width_line(row: dict) -> str:
    """One width of a homogeneity sweep; λ̂ is over the networks that stayed local."""
    llc = ("no network stayed local" if row["llc_mean"] is None else
           f"{row['llc_mean']:.3g}" + ("" if row["llc_std"] is None
                                       else f" ± {row['llc_std']:.2g}"))
    return (f"  width {row['width']:4d}: train err {row['train_error']:.3f}, test err "
            f"{row['test_error']:.3f}, variance init {row['init_variance']:.3g} / data "
            f"{row['data_variance']:.3g}, λ̂ {llc}")


def _homogeneity(args) -> int:
    out = _setup_folder(args, "homogeneity")
    config = homogeneity_preset(args.setup, args.quick)
    changes = {k: v for k, v in (("widths", args.widths), ("init_seeds", args.init_seeds),
                                 ("data_seeds", args.data_seeds)) if v is not None}
    if changes:
        config = replace(config, **changes)
    rows = run_homogeneity(args.setup, quick=args.quick, config=config, out=out,
                           mnist_dir=args.mnist_dir, executor=_executor(args),
                           command=_command(), hold_gamma=args.hold_gamma,
                           verbose=not args.quiet)
    for row in rows:
        print(_width_line(row))
    print(f"  wrote {out}/homogeneity.csv, summary.md, manifest.json, homogeneity.png")
    return 0


def _grokking_report(args) -> int:
    root = Path(args.root)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder {root}: run `slt-probe grokking` first")
    table = report(root, replot=args.replot)
    by_resolution = resolution_report(root)
    if by_resolution:
        table += ("\n## Claims at each resolution\n\nIn how many seeds each claim holds, for "
                  "λ̂ and for the curvature baseline ½Σ nβh/(nβh + γ) read at λ̂'s steps "
                  f"(small at init: ≤ {SMALL_AT_INIT:g} × peak; rises: peak ≥ "
                  f"{RISE_FACTOR:g} × init, before grokking; falls: ≥ {MIN_FALL:.0%} below "
                  "the peak at the end, after grokking); figures: `<setup>/resolutions.png`."
                  "\n\n" + by_resolution)
    path = root / "README.md"
    write_text_atomic(path, "# Grokking runs\n\nRegenerate this page: `slt-probe "
                      f"grokking-report --root {args.root}`\n\n" + table)
    print(table)
    print(f"wrote {path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad option reported in one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slt-probe", description="Local learning coefficient (effective "
                     "parameter count) estimates.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    est = sub.add_parser("estimate", help="estimate λ̂ on a bundled problem with known λ")
    est.add_argument("--case", choices=sorted(problems.CASES), default="rrr-5-4-5-r0")
    est.add_argument("--lr", type=positive_float, default=None,
                     help="SGLD step (default: the case's)")
    est.add_argument("--chains", type=positive_int, default=None)
    est.add_argument("--draws", type=positive_int, default=None)
    est.add_argument("--burnin", type=non_negative_int, default=None)
    est.add_argument("--seed", type=non_negative_int, default=0)
    est.add_argument("--estimator", choices=["control_variate", "plain"],
                     default="control_variate")
    est.add_argument("--out", default=f"{RUNS_DIR}/estimate", help="folder for the JSON "
                     f"result (default {RUNS_DIR}/estimate, not tracked by git; '' to skip)")
    est.add_argument("--quiet", action="store_true", help="no progress bar")
    est.set_defaults(run=_estimate)
    val = sub.add_parser("validate", help="ground-truth suite with automatic calibration only")
    val.add_argument("--quick", action="store_true", help="the small cases only (< 3 min)")
    val.add_argument("--out", default="results/validation")
    val.add_argument("--jobs", type=positive_int, default=2,
                     help="cases run at once, one process (and one thread) each")
    val.add_argument("--rejudge", action="store_true",
                     help="recompute the targets at the teachers for the finished run in "
                          "--out (no sampling) and rewrite its table and figure")
    val.set_defaults(run=_validate)
    for name, helptext in (("grokking", "train a bundled grokking setup and estimate its "
                                        "LLC trajectory"),
                           ("compare", "LLC trajectories across activations and seeds")):
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("--setup", choices=SETUPS, required=True)
        cmd.add_argument("--quick", action="store_true", help="the small preset (minutes)")
        cmd.add_argument("--out", default=None, help=f"folder (default {RUNS_DIR}/{name}/SETUP, "
                         f"or {RUNS_DIR}/{name}/SETUP-quick with --quick; not tracked by git)")
        cmd.add_argument("--regimes", type=_names(REGIMES, "regimes"), default=list(REGIMES),
                         help=f"comma-separated from {','.join(REGIMES)} (default all)")
        cmd.add_argument("--mnist-dir", default=None, help="folder with the MNIST IDX files "
                         "(default: $SLT_PROBE_MNIST_DIR)")
        cmd.add_argument("--quiet", action="store_true", help="no progress bars")
        cmd.add_argument("--executor", choices=EXECUTORS, default="serial",
                         help="where the runs go: one after another here, or Ray tasks")
        cmd.add_argument("--ray-address", default=None,
                         help="a Ray cluster to use ('auto', or ray://HOST:10001; default: "
                              "a local Ray instance on this machine)")
        if name == "grokking":
            cmd.add_argument("--activation", choices=ACTIVATION_NAMES, default=None,
                             help="default: the setup's published one (GELU for modadd-mlp, "
                                  "else ReLU)")
            cmd.add_argument("--seed", type=non_negative_int, default=0)
            cmd.add_argument("--seeds", type=_seed_list, default=None,
                             help="several seeds, comma-separated (one run folder each)")
            cmd.set_defaults(run=_grokking)
        else:
            cmd.add_argument("--activations", type=_names(ACTIVATION_NAMES, "activations"),
                             default=["relu", "tanh", "gelu"],
                             help=f"comma-separated, from {','.join(ACTIVATION_NAMES)}")
            cmd.add_argument("--seeds", type=_seed_list, default=[0, 1, 2],
                             help="seeds, comma-separated (default 0,1,2)")
            cmd.set_defaults(run=_compare)
    hom = sub.add_parser("homogeneity", help="run-to-run variance and λ̂ against width")
    hom.add_argument("--setup", choices=HOMOGENEITY_SETUPS, required=True)
    hom.add_argument("--widths", type=_widths, default=None,
                     help="comma-separated hidden widths (default: the preset's)")
    hom.add_argument("--init-seeds", type=_number(int, 2, True, "a whole number >= 2"),
                     default=None,
                     help="how many initialisation seeds per width (default 4; quick 2)")
    hom.add_argument("--data-seeds", type=_number(int, 2, True, "a whole number >= 2"),
                     default=None, help="training subsets per width (default 4; quick 2)")
    hom.add_argument("--quick", action="store_true", help="4 widths, 2 + 2 seeds (minutes)")
    hom.add_argument("--hold-gamma", action="store_true",
                     help="one calibration (on the widest network) held for every width, so "
                          "λ̂ reads across widths")
    hom.add_argument("--out", default=None, help=f"folder (default {RUNS_DIR}/homogeneity/"
                     "SETUP, or SETUP-quick with --quick)")
    hom.add_argument("--mnist-dir", default=None)
    hom.add_argument("--executor", choices=EXECUTORS, default="serial")
    hom.add_argument("--ray-address", default=None)
    hom.add_argument("--quiet", action="store_true")
    hom.set_defaults(run=_homogeneity)
    rep = sub.add_parser("grokking-report", help="table over finished grokking runs")
    rep.add_argument("--root", default="results/grokking")
    rep.add_argument("--replot", action="store_true", help="redraw each run's trajectory.png")
    rep.set_defaults(run=_grokking_report)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "ray_address", None) is not None and args.executor != "ray":
        build_parser().error("--ray-address needs --executor ray")
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, CalibrationError, json.JSONDecodeError) as err:
        print(f"slt-probe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
