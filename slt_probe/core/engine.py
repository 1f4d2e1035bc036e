"""Run one estimate on a prepared ``Target``: decide the gradient correction at the
sampler's γ, drive the chains (or the devinterp backend), accumulate, return an
``LLCResult`` with its ``EstimateRecord``.

Shared by ``estimate_llc``, the probe, trajectories and restricted estimates, so all of
them estimate the same way. Not here: choosing settings (``calibration``), building the
target (``target``), validating the user's request (``api``).
"""
from __future__ import annotations

import time

import torch

from .devinterp_backend import run_devinterp
from .driver import MALA_SAMPLES, ChainDriver
from .estimator import LLCAccumulator, LLCResult
from .record import ComputeRecord, CorrectionDecision, EstimateRecord
from .settings import EstimateSettings
from .target import Target


def run_estimate(target: Target, settings: EstimateSettings, *, verbose: bool = True,
                 desc: str = "LLC", mala_samples: int = MALA_SAMPLES) -> LLCResult:
    """Estimate at ``target`` with ``settings`` (whose sampler is already concrete)."""
    if settings.auto:
        raise ValueError("run_estimate needs a concrete sampler; calibrate first")
    target.check_settings(settings)
    started = time.perf_counter()
    model, source, point = target.model, target.source, target.point
    correction = correction_decision(target, settings)
    accumulator = point_accumulator(target, settings, correction.applied)
    if settings.backend == "devinterp":
        if not source.in_memory:
            raise ValueError("the devinterp backend needs the data in memory; pass tensors "
                             "or a map-style dataset without stream=True")
        diverged, diverged_at = run_devinterp(model, point.w_star, model.inputs(source.x),
                                              source.y, settings, target.nbeta,
                                              point.star_losses, point.mask, accumulator,
                                              verbose=verbose)
    else:
        generator = torch.Generator(device=model.device).manual_seed(settings.seed)
        driver = ChainDriver(model, source, sampler=settings.sampler, nbeta=target.nbeta,
                             point=point, num_chains=settings.num_chains,
                             batch_size=settings.batch_size, estimator=settings.estimator,
                             loss_on=settings.loss_on, generator=generator,
                             corrected=correction.applied)
        for record in driver.run(settings.num_draws, settings.num_burnin,
                                 num_warmup=settings.num_warmup,
                                 warmup_sampler=settings.warmup_sampler(), verbose=verbose,
                                 desc=desc, mala_samples=mala_samples):
            accumulator.update(record)
        diverged, diverged_at = driver.diverged, driver.diverged_at
    record = estimate_record(target, settings, correction,
                             seconds=time.perf_counter() - started)
    return accumulator.compute(diverged=diverged, diverged_at=diverged_at, record=record)


def correction_decision(target: Target, settings: EstimateSettings) -> CorrectionDecision:
    """The target's correction decision at the sampler's γ, with its evidence; the
    devinterp backend samples the loss as it is ("auto" only: True is refused there)."""
    gamma = settings.sampler.localization
    applied = target.correction_applies(settings.gradient_correction, gamma)
    note = ""
    if applied and settings.backend != "native":
        applied = False
        note = ("the devinterp backend cannot apply the gradient correction; the plain loss "
                "was sampled")
    return CorrectionDecision(applied=applied, setting=settings.gradient_correction,
                              evidence=target.gradient_summary(gamma), note=note)


def estimate_record(target: Target, settings: EstimateSettings,
                    correction: CorrectionDecision, seconds: float) -> EstimateRecord:
    """How an estimate at ``target`` with ``settings`` was made (after its chains ran:
    the computation path and its timings are known then)."""
    model, source, mask = target.model, target.source, target.point.mask
    compute = ComputeRecord(path=model.path, note=model.path_note,
                            seconds_per_step=dict(model.path_timings),
                            chains_at_once=model.group(settings.num_chains),
                            compiled=model.compiled, precision=model.precision,
                            device=str(model.device), memory_plan=model.memory_record())
    return EstimateRecord(
        settings=settings, num_examples=source.n,
        batch_size_drawn=source.drawn_batch_size(settings.batch_size), nbeta=target.nbeta,
        nbeta_source=target.nbeta_source, num_params=model.dim,
        num_sampled_params=int(mask.sum()) if mask is not None else model.dim,
        loss_fn=model.loss.name, data="in memory" if source.in_memory else "streamed",
        correction=correction, compute=compute, seconds=seconds)


def point_accumulator(target: Target, settings: EstimateSettings,
                      corrected: bool) -> LLCAccumulator:
    """The accumulator of an estimate at ``target``: its reference losses, and the pull
    of a real gradient that was not corrected (the verdict then names it)."""
    point = target.point
    distorting = (point.distorting_pull(target.nbeta, settings.sampler.localization)
                  if not corrected else None)
    return LLCAccumulator(settings.num_chains, settings.num_draws, target.nbeta,
                          point.init_loss, reference_loss=point.reference_loss,
                          max_excess_ratio=settings.max_excess_ratio, corrected=corrected,
                          gradient_pull=distorting,
                          gradient_ratio=point.evidence.ratio if distorting else None)
