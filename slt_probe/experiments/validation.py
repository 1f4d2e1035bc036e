"""Ground-truth validation: automatic calibration only, on problems whose answer is known.

``slt-probe validate`` runs every case with ``sampler="auto"`` (no per-case tuning) and
writes CSV, Markdown and a log-log scatter of λ̂ against the truth. Three kinds of case:

- known λ: monomials, reduced-rank regression, deep linear networks, and a tanh
  teacher-student network at an identifiable (regular) teacher, λ = d/2;
- additivity: a trained modular-addition MLP and an independent regular linear block on
  pure-noise targets, trained side by side with their losses summed; λ̂(pair) − λ̂(net) at
  one (nβ, γ), calibrated on the pair, must land on the block's λ (within 15 %);
- scale invariance: the loss times 2 with nβ halved is the same posterior, so λ̂ must not
  change (beyond rounding).

Cases run in parallel processes, one thread each. Cases that miss are kept and marked.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from torch import Tensor, nn

from ..api import estimate_llc
from ..calibration import CalibrationGrid
from ..core.losses import constant_predictor_loss, resolve_loss
from ..core.settings import EstimateSettings, default_nbeta
from ..ground_truth import problems
from ..reports import markdown_table, plot_validation
from ..run_log import read_rows, write_csv_atomic, write_text_atomic
from .presets import preset
from .training import train

DRAWS = 2000
BATCH = 500


@dataclass(frozen=True)
class ValidationCase:
    key: str
    run: Callable[..., dict]  # (case, *, grid, num_chains, num_draws, seed) -> row
    quick: bool
    tolerance: float = 0.10
    make: Callable | None = None  # () -> KnownProblem, for known-λ cases
    # estimated at the true parameter the data were generated from (the standard
    # benchmark), not at the settled minimum of L_n
    at_teacher: bool = False


def _auto(model, data, loss_fn, *, grid, num_chains, num_draws, seed, batch_size=BATCH,
          **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate_llc(model, data, loss_fn=loss_fn, sampler="auto",
                            calibration_grid=grid, num_chains=num_chains,
                            num_draws=num_draws, batch_size=batch_size, seed=seed,
                            verbose=False, **overrides)


def _row(case: ValidationCase, *, d: int, n: int, truth: float, truth_exact: str,
         llc: float, std: float, sem: float, expected: float | None, result,
         started: float, note: str = "", teacher_pull: float | None = None) -> dict:
    record, cal = result.record, result.record.calibration
    used = record.settings
    return {"case": case.key, "d": d, "n": n, "true_lambda": truth,
            "true_lambda_exact": truth_exact, "llc_mean": llc, "llc_std": std, "llc_sem": sem,
            "relative_error": (llc - truth) / truth, "tolerance": case.tolerance,
            "expected_llc": expected,
            "error_vs_expected": None if expected is None else (llc - expected) / expected,
            **_teacher_target(truth=truth, llc=llc, expected=expected, pull=teacher_pull),
            "healthy": result.diagnostics["healthy"],
            "reasons": ";".join(result.diagnostics["reasons"]),
            "excess_ratio": result.diagnostics["excess_ratio"],
            "lr": used.sampler.lr, "localization": used.sampler.localization,
            "nbeta": result.nbeta, "num_warmup": used.num_warmup,
            "warmup_lr": used.warmup_lr, "num_burnin": used.num_burnin,
            "num_draws": used.num_draws, "num_chains": used.num_chains,
            "mala_acceptance": result.diagnostics["mala_acceptance"],
            "calibration_seconds": None if cal is None else cal.seconds,
            "estimate_seconds": record.seconds,
            "target_relative_sem": None if cal is None else cal.grid.target_relative_sem,
            "calibration": "" if cal is None else cal.reason, "note": note,
            "seconds": time.perf_counter() - started}


def _teacher_target(*, truth: float, llc: float, expected: float | None,
                    pull: float | None) -> dict:
    """At a teacher: the exact E[λ̂] where known, else λ less the data's pull (λ̂ at the
    teacher reads that much below λ̂ at the settled minimum, for any sampler)."""
    target = None
    if pull is not None:
        target = expected if expected is not None else truth - pull
    return {"teacher_pull": pull, "teacher_target": target,
            "error_vs_target": None if target is None else (llc - target) / target}


def _problem(case: ValidationCase):
    """The case's problem at its teacher, or settled at the nearby minimum of L_n."""
    problem = case.make()
    return problem if case.at_teacher else problem.settle()


def run_known(case: ValidationCase, *, grid, num_chains, num_draws, seed=0) -> dict:
    started = time.perf_counter()
    problem = _problem(case)
    result = _auto(problem.model, (problem.x, problem.y), problem.loss_fn, grid=grid,
                   num_chains=num_chains, num_draws=num_draws, seed=seed)
    expected = problem.expected_llc(nbeta=result.nbeta,
                                    localization=result.record.sampler.localization)
    pull = problem.teacher_pull(result.nbeta) if case.at_teacher else None
    return _row(case, d=problem.num_params, n=len(problem.x),
                truth=float(problem.true_lambda), truth_exact=str(problem.true_lambda),
                llc=result.llc_mean, std=result.llc_std, sem=result.llc_sem,
                expected=expected, result=result, started=started, teacher_pull=pull)


class SideBySide(nn.Module):
    """A network on token pairs and a linear block on their own inputs, one forward:
    inputs are [a, b, x_block…] (tokens as floats), outputs [logits…, block outputs…]."""

    def __init__(self, network: nn.Module, block: nn.Module):
        super().__init__()
        self.network = network
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.network(x[:, :2].long()), self.block(x[:, 2:])], dim=1)


def summed_loss(classes: int):
    """Per-example cross-entropy of the network's logits plus the block's Gaussian NLL."""
    gaussian = resolve_loss("gaussian_nll").per_example

    def loss(output: Tensor, target: Tensor) -> Tensor:
        ce = nn.functional.cross_entropy(output[:, :classes], target[:, 0].long(),
                                         reduction="none")
        return ce + gaussian(output[:, classes:], target[:, 1:])
    return loss


BLOCK_INPUTS, BLOCK_OUTPUTS, BLOCK_SCALE = 20, 2, 3.0


def run_additivity(case: ValidationCase, *, grid, num_chains, num_draws, seed=0) -> dict:
    started = time.perf_counter()
    config = preset("modadd-mlp", quick=True)
    trained = train(config, "gelu", 0, verbose=False)
    network = trained.model.eval()
    x_net, y_net = trained.task.x_train, trained.task.y_train
    n, classes = len(x_net), config.model_kwargs["p"]
    g = torch.Generator().manual_seed(1)
    x_block = BLOCK_SCALE * torch.randn(n, BLOCK_INPUTS, generator=g)
    y_block = torch.randn(n, BLOCK_OUTPUTS, generator=g)  # pure noise: no signal to fit
    block = nn.Linear(BLOCK_INPUTS, BLOCK_OUTPUTS, bias=False)
    with torch.no_grad():
        block.weight.copy_(torch.linalg.lstsq(x_block, y_block).solution.T)
    pair = SideBySide(network, block)
    x = torch.cat([x_net.double(), x_block.double()], dim=1).float()
    y = torch.cat([y_net[:, None].float(), y_block], dim=1)
    # the constant predictor of the pair is each part's: the label log-frequencies and the
    # mean block target
    reference = (constant_predictor_loss(resolve_loss("cross_entropy"), network(x_net[:2]), y_net)
                 + constant_predictor_loss(resolve_loss("gaussian_nll"), y_block[:2], y_block))
    paired = _auto(pair, (x, y), summed_loss(classes), grid=grid, num_chains=num_chains,
                   num_draws=num_draws, seed=seed, batch_size=128, reference_loss=reference)
    cal = paired.record.calibration
    # the network alone at the pair's (nβ, γ, ε, warm-up, chains): λ̂ depends on γ, so the
    # two are compared at one setting
    same = cal.apply(EstimateSettings(num_chains=paired.record.settings.num_chains,
                                      num_draws=num_draws, batch_size=128, seed=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = estimate_llc(network, (x_net, y_net), same, loss_fn="cross_entropy",
                             verbose=False)
    gamma = same.sampler.localization
    nbeta = default_nbeta(n)
    h = torch.linalg.eigvalsh(x_block.double().T @ x_block.double() / n)
    expected = BLOCK_OUTPUTS * float((0.5 * nbeta * h / (nbeta * h + gamma)).sum())
    d_block = BLOCK_INPUTS * BLOCK_OUTPUTS
    difference = paired.llc_mean - alone.llc_mean
    return _row(case, d=sum(p.numel() for p in pair.parameters()), n=n,
                truth=d_block / 2, truth_exact=str(d_block // 2),
                llc=difference, std=math.hypot(paired.llc_std, alone.llc_std),
                sem=math.hypot(paired.llc_sem, alone.llc_sem), expected=expected,
                result=paired, started=started,
                note=f"λ̂(pair) {paired.llc_mean:.4g} − λ̂(net) {alone.llc_mean:.4g} "
                     f"(net alone: healthy {alone.diagnostics['healthy']}, excess ratio "
                     f"{alone.diagnostics['excess_ratio']:.3g}); calibrated on the pair: "
                     f"{cal.reason[:80]}…")


def run_scale(case: ValidationCase, *, grid, num_chains, num_draws, seed=0) -> dict:
    started = time.perf_counter()
    problem = _problem(case)
    data = (problem.x, problem.y)
    plain = _auto(problem.model, data, problem.loss_fn, grid=grid, num_chains=num_chains,
                  num_draws=num_draws, seed=seed)
    gaussian = resolve_loss("gaussian_nll").per_example
    doubled = _auto(problem.model, data, lambda out, target: 2.0 * gaussian(out, target),
                    grid=grid, num_chains=num_chains, num_draws=num_draws, seed=seed,
                    nbeta=default_nbeta(len(problem.x)) / 2)
    same_choice = ((plain.record.sampler.lr, plain.record.sampler.localization)
                   == (doubled.record.sampler.lr, doubled.record.sampler.localization))
    return _row(case, d=problem.num_params, n=len(problem.x), truth=plain.llc_mean,
                truth_exact=f"λ̂ at loss ×1, nβ: {plain.llc_mean:.4g}", llc=doubled.llc_mean,
                std=doubled.llc_std, sem=doubled.llc_sem, expected=None, result=doubled,
                started=started,
                note=f"the same ε and γ chosen: {same_choice}; true λ {problem.true_lambda}")


CASES = [
    ValidationCase("monomial w1 w2^2", run_known, True, make=lambda: problems.monomial(1, 2, 20_000)),
    ValidationCase("regular d=20", run_known, True, make=lambda: problems.regular(20, 1, 20_000)),
    ValidationCase("rrr 5-4-5 r=0", run_known, False,
                   make=lambda: problems.deep_linear([5, 4, 5], 0, 50_000)),
    ValidationCase("rrr 3-2-3 r=1", run_known, False,
                   make=lambda: problems.deep_linear([3, 2, 3], 1, 50_000)),
    ValidationCase("deep linear 2-3-4-2 r=1", run_known, True,
                   make=lambda: problems.deep_linear([2, 3, 4, 2], 1, 50_000)),
    ValidationCase("deep linear 5-5-5-5 r=2", run_known, False,
                   make=lambda: problems.deep_linear([5, 5, 5, 5], 2, 50_000)),
    ValidationCase("monomial w1 w2^3", run_known, False, make=lambda: problems.monomial(1, 3, 20_000)),
    ValidationCase("rrr 4-3-2 r=1", run_known, False,
                   make=lambda: problems.deep_linear([4, 3, 2], 1, 50_000)),
    ValidationCase("rrr 10-6-8 r=2", run_known, False,
                   make=lambda: problems.deep_linear([10, 6, 8], 2, 50_000)),
    ValidationCase("deep linear 6-4-5-3 r=2", run_known, False,
                   make=lambda: problems.deep_linear([6, 4, 5, 3], 2, 50_000)),
    ValidationCase("deep linear 10-8-8-10 r=3", run_known, False,
                   make=lambda: problems.deep_linear([10, 8, 8, 10], 3, 50_000)),
    ValidationCase("deep linear 58-58-58-58 r=4", run_known, False,
                   make=lambda: problems.deep_linear([58, 58, 58, 58], 4, 50_000)),
    ValidationCase("tanh teacher-student 2-3-1", run_known, False,
                   make=problems.tanh_teacher_student),
    ValidationCase("regular d=20 at its teacher", run_known, True, at_teacher=True,
                   make=lambda: problems.regular(20, 1, 20_000, seed=1)),
    ValidationCase("deep linear 6-4-4-6 r=1 at its teacher", run_known, False, at_teacher=True,
                   make=lambda: problems.deep_linear([6, 4, 4, 6], 1, 20_000)),
    ValidationCase("deep linear 5-12-8-4-7 r=1 at its teacher", run_known, False,
                   at_teacher=True,
                   make=lambda: problems.deep_linear([5, 12, 8, 4, 7], 1, 20_000, seed=2)),
    ValidationCase("additivity: modadd MLP + linear block d=40", run_additivity, False,
                   tolerance=0.15),
    ValidationCase("scale invariance: rrr 3-2-3, loss ×2, nβ/2", run_scale, False,
                   tolerance=0.02, make=lambda: problems.deep_linear([3, 2, 3], 1, 50_000)),
]
BY_KEY = {case.key: case for case in CASES}

# --quick aims at a looser standard error to stay within 3 minutes on 2 cores.
QUICK_GRID = CalibrationGrid(target_relative_sem=0.05)


def run_case(key: str, *, quick: bool, num_chains: int = 8, num_draws: int = DRAWS,
             seed: int = 0) -> dict:
    case = BY_KEY[key]
    grid = QUICK_GRID if quick else CalibrationGrid()
    return case.run(case, grid=grid, num_chains=num_chains, num_draws=num_draws, seed=seed)


def _single_thread() -> None:
    torch.set_num_threads(1)


def _warmup(row: dict) -> str:
    steps = row.get("num_warmup") or 0
    return f"{steps:,} × {row['warmup_lr']:.2g}" if steps else "none"


def _expected(row: dict) -> str:
    if row.get("expected_llc") is not None:
        return f"{row['expected_llc']:.4g} (λ̂ {row['error_vs_expected']:+.1%})"
    if row.get("teacher_target") is not None:
        return (f"λ − pull {row['teacher_pull']:.3g} = {row['teacher_target']:.4g} "
                f"(λ̂ {row['error_vs_target']:+.1%})")
    return "—"


def judged_error(row: dict) -> float:
    """The error a case is judged by: for a case at a teacher, against its finite-n target
    (the exact E[λ̂] where known, else λ less the data's pull, ``teacher_pull``: both are
    what a perfect sampler reports there), else against the true λ."""
    case = BY_KEY.get(row["case"])
    if case is not None and case.at_teacher and row.get("error_vs_target") is not None:
        return row["error_vs_target"]
    return row["relative_error"]


def markdown(rows: list[dict], command: str) -> str:
    target = rows[0].get("target_relative_sem") or CalibrationGrid.target_relative_sem
    lines = [f"Measured with `{command}`: automatic calibration only (`sampler=\"auto\"`; "
             f"it also sets the chains, for a {target:.0%} standard error), "
             f"{rows[0]['num_draws']:,} draws, seed 0. ✗ marks a relative error above the "
             "case's tolerance (10 %, additivity 15 %, scale invariance 2 %), judged against "
             "the true λ, or for a case at its teacher against its finite-n target: the "
             "exact E[λ̂] where it is known, else λ less the data's pull nβ·(L_n(teacher) − "
             "L_n(settled minimum)), by which λ̂ at the teacher reads below λ̂ at the "
             "settled minimum for any sampler; ± std is the "
             "spread across chains. Exact E[λ̂] is what a perfect sampler would report at "
             "this n, nβ and the chosen γ (monomials by quadrature; regular models, the tanh "
             "network and the additivity block from the Hessian); the true λ is its "
             "large-n limit. r is the excess ratio (n/a where w* is itself nearly a constant "
             "predictor). Calibration and estimate seconds are one thread each.", ""]
    header = ["case", "d", "true λ", "exact E[λ̂] at n, γ, or target at the teacher",
              "λ̂ ± std", "chains", "rel. error ± s.e.", "healthy", "r", "ε, γ (auto)",
              "warm-up: steps × ε", "calibration s", "estimate s"]
    table = []
    for r in rows:
        mark = "" if abs(judged_error(r)) <= r["tolerance"] else " ✗"
        ratio = "n/a" if r["excess_ratio"] is None else f"{r['excess_ratio']:.2g}"
        table.append([r["case"], r["d"], r["true_lambda_exact"], _expected(r),
                      f"{r['llc_mean']:.4g} ± {r['llc_std']:.2g}", r["num_chains"],
                      f"{r['relative_error']:+.1%} ± {r['llc_sem'] / abs(r['true_lambda']):.1%}"
                      f"{mark}", "yes" if r["healthy"] else f"no ({r['reasons']})", ratio,
                      f"{r['lr']:.2g}, {r['localization']:g}", _warmup(r),
                      f"{r['calibration_seconds']:.0f}", f"{r['estimate_seconds']:.0f}"])
    lines += markdown_table(header, table)
    hits = sum(abs(judged_error(r)) <= r["tolerance"] for r in rows)
    lines += ["", f"{hits} of {len(rows)} cases within their tolerance."]
    notes = [f"- {r['case']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def rejudge(*, quick: bool, out: str | Path, command: str) -> list[dict]:
    """Recompute the targets at the teachers for a finished run in ``out`` and rewrite its
    Markdown and figure; the estimates are the run's own (the target is a property of the
    data and nβ, no sampling)."""
    out = Path(out)
    name = "quick" if quick else "full"
    rows = read_rows(out / f"validation_{name}.csv")
    for row in rows:
        case = BY_KEY.get(row["case"])
        if case is None or not case.at_teacher:
            continue
        pull = case.make().teacher_pull(row["nbeta"])
        row.update(_teacher_target(truth=row["true_lambda"], llc=row["llc_mean"],
                                   expected=row.get("expected_llc"), pull=pull))
    previous = (out / f"validation_{name}.md").read_text().splitlines()
    measured = previous[0].split("`")[1]
    tail = [line for line in previous if line.startswith("Wall time")]
    write_csv_atomic(out / f"validation_{name}.csv", rows)
    write_text_atomic(out / f"validation_{name}.md", markdown(rows, measured) + (
        f"\n{tail[-1]}\n" if tail else "") + f"\nTargets at the teachers computed with "
        f"`{command}` from the same estimates.\n")
    plot_validation(rows, out / f"validation_{name}.png")
    return rows


def validate(*, quick: bool, out: str | Path, command: str, jobs: int = 2,
             verbose: bool = True, num_chains: int = 8, num_draws: int = DRAWS) -> list[dict]:
    """Run the suite (``quick``: the small cases) with ``jobs`` processes; write
    ``validation_{quick,full}.{csv,md,png}`` to ``out`` and return the rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = [c.key for c in CASES if c.quick or not quick]
    started = time.perf_counter()
    rows: dict[str, dict] = {}
    if verbose:
        print(f"{'case':44s} {'true λ':>9s} {'λ̂ ± std':>18s} {'rel.err':>8s} healthy  s",
              flush=True)
    with ProcessPoolExecutor(max_workers=min(jobs, len(keys)), mp_context=get_context("spawn"),
                             initializer=_single_thread) as pool:
        futures = {pool.submit(run_case, key, quick=quick, num_chains=num_chains,
                               num_draws=num_draws): key for key in keys}
        for future in as_completed(futures):
            row = future.result()
            rows[row["case"]] = row
            if verbose:
                print(f"{row['case']:44s} {row['true_lambda']:9.4g} {row['llc_mean']:9.4g} ± "
                      f"{row['llc_std']:<7.2g} {row['relative_error']:+8.1%} "
                      f"{'yes' if row['healthy'] else 'no ':7s} {row['seconds']:4.0f}",
                      flush=True)
    ordered = [rows[k] for k in keys]
    name = "quick" if quick else "full"
    write_csv_atomic(out / f"validation_{name}.csv", ordered)
    write_text_atomic(out / f"validation_{name}.md", markdown(
        ordered, command) + f"\nWall time {time.perf_counter() - started:.0f} s with "
        f"{min(jobs, len(keys))} processes.\n")
    plot_validation(ordered, out / f"validation_{name}.png")
    if verbose:
        print(f"wrote {out}/validation_{name}.{{csv,md,png}} "
              f"({time.perf_counter() - started:.0f} s)")
    return ordered
