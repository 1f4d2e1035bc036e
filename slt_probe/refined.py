"""Refined λ̂: one estimate per weight restriction (an attention head, a layer, any mask),
all restrictions' chains advanced together in one batched run.

``estimate_restricted(model, data, {"head0": r0, "head1": r1, …})`` samples each
restriction's weights with the others held at w*, exactly as
``estimate_llc(model, data, restrict_to=r)`` would at the same seed (each restriction has
its own random stream), but with every restriction's chains in one batched forward and
backward pass per step. With ``sampler="auto"`` one calibration, on the whole model, sets
the sampler for every restriction (recorded in each result's ``config``). The data-refined
λ̂ is ``estimate_llc`` on the other data at the same weights (see the docs). Not here:
finding the heads' masks (``restrictions``).
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from .api import prepare
from .core.driver import ChainDriver, ChainGroup, check_groupable
from .core.engine import correction_decision, estimate_record, point_accumulator
from .core.estimator import DrawRecord, LLCResult
from .core.settings import EstimateSettings, resolve_settings
from .core.target import Target


def estimate_restricted(model: nn.Module, data, restrictions: Mapping[str, object],
                        settings: EstimateSettings | None = None, *,
                        loss_fn="cross_entropy", output=None, label_key: str | None = None,
                        verbose: bool = True, **overrides) -> dict[str, LLCResult]:
    """λ̂ of each restriction in ``restrictions`` (name → what ``restrict_to`` takes), in
    one batched run.

    Args:
        model, data, settings, loss_fn, output, label_key, verbose, **overrides: as for
            ``estimate_llc`` (``num_chains`` is per restriction; ``restrict_to`` is not
            allowed: the restrictions are the argument).
        restrictions: e.g. ``slt_probe.restrictions.attention_heads(model)``.

    Returns:
        ``{name: LLCResult}``, each as ``estimate_llc(..., restrict_to=...)`` would give
        at the same seed; ``config["restriction"]`` names it and
        ``config["restrictions_in_run"]`` counts the run's restrictions.

    Raises:
        ValueError: no restrictions, ``restrict_to`` in the settings, the devinterp
            backend, or SGNHT (whose thermostat couples a run's chains).
    """
    settings = resolve_settings(settings, overrides)
    if not restrictions:
        raise ValueError("restrictions is empty: give name → restrict_to value")
    if settings.restrict_to is not None:
        raise ValueError("estimate_restricted takes its restrictions as an argument; "
                         "leave restrict_to unset")
    if settings.backend != "native":
        raise ValueError("estimate_restricted runs on the native backend only")
    started = time.perf_counter()
    prepared = prepare(model, data, settings, loss_fn=loss_fn, output=output,
                       label_key=label_key, verbose=verbose)
    return run_restricted(prepared.target, prepared.settings, restrictions,
                          calibration=prepared.calibration, verbose=verbose, started=started)


def run_restricted(target: Target, settings: EstimateSettings,
                   restrictions: Mapping[str, object], *, calibration=None,
                   verbose: bool = True, started: float | None = None,
                   desc: str | None = None) -> dict[str, LLCResult]:
    """``estimate_restricted`` on a prepared target with a fixed sampler (the probe's
    form: its batched model and data are built once)."""
    started = time.perf_counter() if started is None else started
    check_groupable(settings.sampler)  # before any point is measured
    target.check_settings(settings)
    names = list(restrictions)
    own = {name: replace(settings, restrict_to=restrictions[name]) for name in names}
    targets = {name: target.restricted(restrictions[name]) for name in names}
    decisions = {name: correction_decision(targets[name], own[name]) for name in names}
    groups = [ChainGroup(targets[name].point, decisions[name].applied,
                         torch.Generator(device=target.model.device).manual_seed(settings.seed))
              for name in names]
    driver = ChainDriver(target.model, target.source, sampler=settings.sampler,
                         nbeta=target.nbeta, num_chains=settings.num_chains,
                         batch_size=settings.batch_size, estimator=settings.estimator,
                         loss_on=settings.loss_on, groups=groups)
    accumulators = {name: point_accumulator(targets[name], own[name], decisions[name].applied)
                    for name in names}
    chains = settings.num_chains
    for record in driver.run(settings.num_draws, settings.num_burnin,
                             num_warmup=settings.num_warmup,
                             warmup_sampler=settings.warmup_sampler(), verbose=verbose,
                             desc=desc or f"LLC of {len(names)} restrictions"):
        for k, name in enumerate(names):
            accumulators[name].update(_rows_of(record, slice(k * chains, (k + 1) * chains)))
    seconds = time.perf_counter() - started
    results = {}
    for k, name in enumerate(names):
        rows = slice(k * chains, (k + 1) * chains)
        record = estimate_record(targets[name], own[name], decisions[name], seconds)
        record.restriction, record.restrictions_in_run = name, len(names)
        if calibration is not None:
            record.calibration, record.calibrated_on = calibration, "the whole model"
        results[name] = accumulators[name].compute(
            diverged=driver.diverged[rows], diverged_at=driver.diverged_at[rows],
            record=record)
    return results


def _rows_of(record: DrawRecord, rows: slice) -> DrawRecord:
    take = lambda a: None if a is None else a[rows]  # noqa: E731
    return DrawRecord(step=record.step, loss=record.loss[rows],
                      reference=record.reference[rows], alive=record.alive[rows],
                      acceptance=take(record.acceptance), correction=take(record.correction))
