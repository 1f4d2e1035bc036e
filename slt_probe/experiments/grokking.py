"""One grokking run: train a preset (``training``), then estimate λ̂ at every saved
checkpoint in each LLC regime with one sampler for the whole run.

A run folder holds the training (``metrics.csv``, ``checkpoints/``, ``model.pt``) and one
subfolder per regime (``local/``, ``notebook/``) with ``llc.csv`` (the estimates beside the
train/test metrics), ``manifest.json`` (settings, the calibration and its evidence),
``summary.json`` and ``trajectory.png``. In the local regime the calibration runs on the
checkpoint at the end of memorisation: there the network fits its training set (a
near-minimum, as the calibration assumes) and λ̂ is near its largest, so the excess ratio,
which grows with λ̂ at a fixed loss gap, is near its largest too; the ratio of every point
is reported. An interrupted run resumes: finished training is reused, estimated steps are
skipped. Not here: presets, summaries, comparisons.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from ..calibration import Calibration
from ..probe import llc_trajectory
from ..reports import plot_grokking
from ..run_log import (CSV_NAME, MANIFEST_NAME, read_rows, write_csv_atomic,
                       write_json_atomic)
from .presets import REGIMES, GrokkingConfig, build_model, preset
from .summary import PLOT_NAME, SUMMARY_NAME, summarize
from .training import TrainedRun, train

RUN_NAME = "run.json"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def default_activation(config: GrokkingConfig) -> str:
    return "gelu" if config.model == "modadd-mlp" else "relu"


def estimate_regime(config: GrokkingConfig, run: TrainedRun, act: str, seed: int,
                    regime: str, *, out: Path | None = None,
                    calibration: Calibration | None = None, verbose: bool = True
                    ) -> tuple[dict, list[dict]]:
    """λ̂ at every checkpoint of ``run`` in ``regime`` (``calibration`` holds a local
    regime's sampler fixed instead of calibrating on this run); (summary, rows)."""
    settings = config.regime_settings(regime).with_overrides(seed=seed)
    if calibration is not None:
        settings = calibration.apply(settings)
    steps = sorted(run.checkpoints)
    reference = run.memorised_step()
    data = (run.task.x_train, run.task.targets(run.task.y_train, config.loss))
    llc_rows = llc_trajectory(build_model(config, act, seed), [run.checkpoints[s] for s in steps],
                              data, settings, steps=steps, loss_fn=config.loss,
                              calibrate_on=steps.index(reference), log_dir=out,
                              verbose=verbose)
    by_step = {r["step"]: dict(r) for r in run.metrics}
    for row in llc_rows:
        by_step.setdefault(row["step"], {}).update(row)
    rows = [by_step[s] for s in sorted(by_step)]
    manifest = (read_manifest(out) if out is not None else {})
    summary = summarize(rows, grok_accuracy=config.grok_accuracy)
    summary.update(regime=regime, calibrated_on_step=(reference if settings.auto else None),
                   train_seconds=run.seconds,
                   calibration=manifest.get("calibration"))
    if out is not None:
        write_csv_atomic(out / CSV_NAME, rows, ["step"])
        write_json_atomic(out / SUMMARY_NAME, summary)
        plot_grokking(rows, out / PLOT_NAME, title=f"{config.setup} ({act}, seed {seed}, "
                      f"{regime} LLC)", grok_step=summary["grok_step"],
                      grok_accuracy=config.grok_accuracy)
    return summary, rows


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def run_grokking(setup: str, *, activation_name: str | None = None, seed: int = 0,
                 quick: bool = False, out: str | Path | None = None,
                 config: GrokkingConfig | None = None, regimes=REGIMES,
                 calibrations: dict[str, Calibration] | None = None, mnist_dir=None,
                 command: str | None = None, verbose: bool = True) -> dict[str, dict]:
    """Train one setup and estimate its trajectory in each of ``regimes``; returns
    ``{regime: summary}`` (also written under ``out``)."""
    config = config or preset(setup, quick)
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown:
        raise ValueError(f"regimes must be among {REGIMES}, got {unknown}")
    act = activation_name or default_activation(config)
    build_model(config, act, seed)  # names a bad activation before any work
    folder = Path(out) if out is not None else None
    commit = git_commit()  # the code that trains, not whatever is checked out when it ends
    run = train(config, act, seed, out=folder, mnist_dir=mnist_dir, verbose=verbose)
    summaries = {}
    for regime in regimes:
        sub = folder / regime if folder is not None else None
        summary, _ = estimate_regime(config, run, act, seed, regime, out=sub,
                                     calibration=(calibrations or {}).get(regime),
                                     verbose=verbose)
        summary.update(setup=setup, activation=act, seed=seed, quick=quick,
                       num_params=sum(p.numel() for p in run.model.parameters()))
        if sub is not None:
            write_json_atomic(sub / SUMMARY_NAME, summary)
        summaries[regime] = summary
    if folder is not None:
        write_json_atomic(folder / RUN_NAME, {
            "command": command or " ".join(sys.argv), "config": config.to_dict(),
            "activation": act, "seed": seed, "quick": quick, "regimes": list(regimes),
            "git_commit": commit, "machine": platform.platform(),
            "torch_threads": torch.get_num_threads()})
    return summaries
