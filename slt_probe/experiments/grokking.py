"""One grokking run: train a preset (``training``), then estimate λ̂ at every saved
checkpoint in each LLC regime with one sampler for the whole run.

A run folder holds the training (``metrics.csv``, ``checkpoints/``, ``model.pt``,
``run.json``) and one subfolder per regime (``local/``, ``notebook/``) with ``llc.csv``
(the estimates beside the train/test metrics), ``manifest.json`` (settings, the
calibration and its evidence), ``summary.json`` and ``trajectory.png``. In the local
regime the calibration runs on the checkpoint at the end of memorisation: there the
network fits its training set (a near-minimum, as the calibration assumes) and λ̂ is near
its largest, so the excess ratio, which grows with λ̂ at a fixed loss gap, is near its
largest too; the ratio of every point is reported.

``run_grokking`` writes as it goes (an interrupted run reuses finished training and skips
estimated steps); ``grokking_task`` computes a whole run in memory for a sweep's worker
and ``write_run`` writes it from the driver. Not here: presets, summaries, comparisons.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calibration import Calibration
from ..probe import llc_trajectory, read_checkpoint
from ..quadratic_baseline import quadratic_llc
from ..reports import plot_grokking
from ..run_log import CSV_NAME, MANIFEST_NAME, write_csv_atomic, write_json_atomic
from .presets import REGIMES, RESOLUTIONS, GrokkingConfig, build_model, preset
from .summary import PLOT_NAME, SUMMARY_NAME, summarize
from .training import (
    CHECKPOINT_DIR,
    METRICS_NAME,
    MODEL_NAME,
    TRAINING_NAME,
    TrainedRun,
    checkpoint_path,
    train,
    training_identity,
)

RUN_NAME = "run.json"
# the curvature baseline along a trajectory: Hutchinson's estimator with this many probes
# (about 1 % standard error on the bundled MLP for 300 Hessian products per checkpoint)
BASELINE_PROBES = 16
BASELINE_REGIMES = ("local", *RESOLUTIONS)  # at the notebook's nβ = 2 it is ≈ 0: nothing to say


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def default_activation(config: GrokkingConfig) -> str:
    return "gelu" if config.model == "modadd-mlp" else "relu"


@dataclass
class RegimeResult:
    summary: dict
    rows: list[dict]
    manifest: dict


def estimate_regime(config: GrokkingConfig, run: TrainedRun, act: str, seed: int,
                    regime: str, *, out: Path | None = None,
                    calibration: Calibration | None = None, verbose: bool = True
                    ) -> RegimeResult:
    """λ̂ at every checkpoint of ``run`` in ``regime`` (``calibration`` holds a local
    regime's sampler fixed instead of calibrating on this run)."""
    settings = config.regime_settings(regime).with_overrides(seed=seed)
    if calibration is not None:
        settings = calibration.apply(settings)
    steps = sorted(run.checkpoints)
    reference = run.memorised_step()
    data = (run.task.x_train, run.task.targets(run.task.y_train, config.loss))
    trajectory = llc_trajectory(build_model(config, act, seed),
                                     [run.checkpoints[s] for s in steps], data, settings,
                                     steps=steps, loss_fn=config.loss,
                                     calibrate_on=steps.index(reference), log_dir=out,
                                     verbose=verbose)
    by_step = {r["step"]: dict(r) for r in run.metrics}
    for row in trajectory.rows:
        by_step.setdefault(row["step"], {}).update(row)
    rows = [by_step[s] for s in sorted(by_step)]
    if regime in BASELINE_REGIMES and config.quadratic_baseline:
        add_quadratic_baseline(rows, build_model(config, act, seed), run.checkpoints, data,
                               config.loss, out=out, verbose=verbose)
    manifest = trajectory.manifest()
    if calibration is not None and manifest["calibration"] is None:
        manifest["calibration"] = calibration.to_dict()  # held from elsewhere: say which
    summary = summarize(rows, grok_accuracy=config.grok_accuracy)
    summary.update(regime=regime, calibrated_on_step=(reference if settings.auto else None),
                   train_seconds=run.seconds, calibration=manifest["calibration"],
                   activation=act, seed=seed, setup=config.setup,
                   num_params=sum(p.numel() for p in run.model.parameters()))
    result = RegimeResult(summary, rows, manifest)
    if out is not None:
        _write_regime(out, config, act, seed, regime, result)
    return result


def add_quadratic_baseline(rows: list[dict], model, checkpoints: dict, data, loss_fn, *,
                           out: Path | None = None, verbose: bool = True) -> None:
    """The curvature baseline ½Σ nβh/(nβh + γ) at every estimated step, at that row's nβ
    and γ (columns ``quadratic_llc``, ``quadratic_llc_sem``, ``quadratic_min_eigenvalue``);
    rows that have it are kept, and ``llc.csv`` is rewritten after each step."""
    todo = [r for r in rows if r.get("llc_mean") is not None
            and r.get("quadratic_llc") in (None, "")]
    for row in tqdm(todo, desc="quadratic baseline", disable=not verbose):
        checkpoint = checkpoints[row["step"]]
        model.load_state_dict(read_checkpoint(checkpoint, row["step"]))
        q = quadratic_llc(model, data, loss_fn=loss_fn, nbeta=row["nbeta"],
                          localization=row["localization"], method="hutchinson",
                          num_probes=BASELINE_PROBES, seed=int(row["step"]), verbose=False)
        row.update(quadratic_llc=q.value, quadratic_llc_sem=q.standard_error,
                   quadratic_min_eigenvalue=q.min_eigenvalue, quadratic_seconds=q.seconds)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            write_csv_atomic(out / CSV_NAME, rows, ["step"])


def _write_regime(out: Path, config: GrokkingConfig, act: str, seed: int, regime: str,
                  result: RegimeResult) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / CSV_NAME, result.rows, ["step"])
    write_json_atomic(out / SUMMARY_NAME, result.summary)
    path = out / MANIFEST_NAME
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest.update({k: v for k, v in result.manifest.items() if v is not None})
    write_json_atomic(path, manifest)
    plot_grokking(result.rows, out / PLOT_NAME, title=f"{config.setup} ({act}, seed {seed}, "
                  f"{regime} LLC)", grok_step=result.summary["grok_step"],
                  grok_accuracy=config.grok_accuracy)


def estimate_regimes(config: GrokkingConfig, run: TrainedRun, act: str, seed: int, regimes, *,
                     folder: Path | None = None, calibrations: dict | None = None,
                     verbose: bool = True) -> dict[str, RegimeResult]:
    """Every regime of a run, the local one first: its calibration (calibrated here, given
    in ``calibrations``, or recorded in ``folder/local``) is the one the resolution regimes
    scale (``Calibration.at_resolution``)."""
    calibrations = dict(calibrations or {})
    ordered = sorted(regimes, key=lambda r: (r != "local", r in RESOLUTIONS, REGIMES.index(r)))
    results = {}
    for regime in ordered:
        if regime in RESOLUTIONS and regime not in calibrations:
            base = calibrations.get("local") or _local_calibration(results, folder)
            calibrations[regime] = base.at_resolution(RESOLUTIONS[regime])
        results[regime] = estimate_regime(
            config, run, act, seed, regime, out=folder / regime if folder else None,
            calibration=calibrations.get(regime), verbose=verbose)
    return {regime: results[regime] for regime in regimes}


def _local_calibration(results: dict, folder: Path | None) -> Calibration:
    recorded = results["local"].manifest.get("calibration") if "local" in results else None
    if recorded is None and folder is not None and (folder / "local" / MANIFEST_NAME).exists():
        recorded = json.loads((folder / "local" / MANIFEST_NAME).read_text()).get("calibration")
    if recorded is None:
        raise ValueError(f"the regimes {sorted(RESOLUTIONS)} scale the local regime's "
                         "calibration: estimate 'local' too (or first)")
    return Calibration.from_dict(recorded)


def _run_record(config, act, seed, quick, regimes, command, commit) -> dict:
    return {"command": command or " ".join(sys.argv), "config": config.to_dict(),
            "activation": act, "seed": seed, "quick": quick, "regimes": list(regimes),
            "git_commit": commit, "machine": platform.platform(),
            "torch_threads": torch.get_num_threads()}


def _checked_regimes(regimes) -> None:
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown:
        raise ValueError(f"regimes must be among {REGIMES}, got {unknown}")


def run_grokking(setup: str, *, activation_name: str | None = None, seed: int = 0,
                 quick: bool = False, out: str | Path | None = None,
                 config: GrokkingConfig | None = None, regimes=REGIMES,
                 calibrations: dict[str, Calibration] | None = None, mnist_dir=None,
                 command: str | None = None, verbose: bool = True) -> dict[str, dict]:
    """Train one setup and estimate its trajectory in each of ``regimes``, writing as it
    goes to ``out``; returns ``{regime: summary}``."""
    config = config or preset(setup, quick)
    _checked_regimes(regimes)
    act = activation_name or default_activation(config)
    build_model(config, act, seed)  # names a bad activation before any work
    folder = Path(out) if out is not None else None
    if (any(r in RESOLUTIONS for r in regimes) and "local" not in regimes
            and "local" not in (calibrations or {})):
        _local_calibration({}, folder)  # names a missing local regime before training
    commit = git_commit()  # the code that trains, not whatever is checked out when it ends
    run = train(config, act, seed, out=folder, mnist_dir=mnist_dir, verbose=verbose)
    summaries = {}
    results = estimate_regimes(config, run, act, seed, regimes, folder=folder,
                               calibrations=calibrations, verbose=verbose)
    for regime, result in results.items():
        summaries[regime] = {**result.summary, "quick": quick}
        if folder is not None:
            write_json_atomic(folder / regime / SUMMARY_NAME, summaries[regime])
    if folder is not None:
        write_json_atomic(folder / RUN_NAME, _run_record(config, act, seed, quick, regimes,
                                                         command, commit))
    return summaries


@dataclass
class RunOutput:
    """A whole grokking run, computed in memory by a sweep's worker."""

    config: GrokkingConfig
    activation: str
    seed: int
    quick: bool
    training: TrainedRun
    regimes: dict[str, RegimeResult]
    record: dict


def grokking_task(setup: str, activation: str, seed: int, quick: bool,
                  config: GrokkingConfig, regimes, calibrations: dict | None = None,
                  mnist_dir=None, command: str | None = None, commit: str | None = None
                  ) -> RunOutput:
    """One run of a sweep, in memory (writes nothing): training, checkpoints, every
    regime's rows, summary and calibration."""
    _checked_regimes(regimes)
    run = train(config, activation, seed, mnist_dir=mnist_dir, verbose=False)
    results = estimate_regimes(config, run, activation, seed, regimes,
                               calibrations=calibrations, verbose=False)
    for result in results.values():
        result.summary["quick"] = quick
    return RunOutput(config, activation, seed, quick, run, results,
                     _run_record(config, activation, seed, quick, regimes, command, commit))


def write_run(folder: str | Path, output: RunOutput) -> None:
    """Write what ``grokking_task`` computed, as ``run_grokking`` would have (the driver
    process is the only writer)."""
    folder = Path(folder)
    (folder / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    run = output.training
    for step, state in run.checkpoints.items():
        torch.save(state, checkpoint_path(folder, step))
    torch.save(run.model.state_dict(), folder / MODEL_NAME)
    write_csv_atomic(folder / METRICS_NAME, run.metrics)
    write_json_atomic(folder / TRAINING_NAME, {**training_identity(output.config,
                                                                   output.activation,
                                                                   output.seed),
                                               "seconds": run.seconds})
    for regime, result in output.regimes.items():
        _write_regime(folder / regime, output.config, output.activation, output.seed, regime,
                      result)
    write_json_atomic(folder / RUN_NAME, output.record)
