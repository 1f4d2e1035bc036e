"""Run one estimate at a given w* with an already-built ``BatchedModel``: resolve nβ, the
gradient correction and the locality reference, drive the chains (or the devinterp
backend), accumulate, return an ``LLCResult``.

Shared by ``estimate_llc``, the probe, trajectories and calibration, so all of them
estimate the same way. Not here: choosing settings (``calibration``), validating the
user's request (``api``).
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from .backends.devinterp_backend import run_devinterp
from .batched_model import BatchedModel
from .driver import MALA_SAMPLES, ChainDriver
from .estimator import LLCAccumulator, LLCResult
from .point import Point, measure_point
from .settings import EstimateSettings


def run_estimate(model: BatchedModel, w_star: Tensor, source, settings: EstimateSettings, *,
                 verbose: bool = True, desc: str = "LLC", mala_samples: int = MALA_SAMPLES,
                 point: Point | None = None) -> LLCResult:
    """Estimate at ``w_star`` on ``source`` (a ``data`` source) with ``settings`` (whose
    sampler is already concrete)."""
    if settings.auto:
        raise ValueError("run_estimate needs a concrete sampler; calibrate first")
    started = time.perf_counter()
    if source.in_memory:
        source = source.to(model.device)
    point = point or measure_point(model, w_star, source, settings)
    n = source.n
    sampler = settings.sampler
    nbeta, nbeta_source = settings.resolve_nbeta(n)
    corrected = point.correction_applies(settings.gradient_correction, nbeta,
                                         sampler.localization)
    correction_note = ""
    if corrected and settings.backend != "native":
        # "auto" only (True is refused with this backend): devinterp samples the loss as is
        corrected = False
        correction_note = ("the devinterp backend cannot apply the gradient correction; the "
                           "plain loss was sampled")
    mask = point.mask
    config = estimate_config(model, source, settings, point, nbeta, nbeta_source, corrected,
                             correction_note)
    accumulator = point_accumulator(point, settings, nbeta, corrected)
    if settings.backend == "devinterp":
        if not source.in_memory:
            raise ValueError("the devinterp backend needs the data in memory; pass tensors "
                             "or a map-style dataset without stream=True")
        diverged, diverged_at = run_devinterp(model, w_star, model.inputs(source.x), source.y,
                                              settings, nbeta, point.star_losses, mask,
                                              accumulator, verbose=verbose)
    else:
        generator = torch.Generator(device=model.device).manual_seed(settings.seed)
        driver = ChainDriver(model, source, sampler=sampler, nbeta=nbeta, point=point,
                             num_chains=settings.num_chains, batch_size=settings.batch_size,
                             estimator=settings.estimator, loss_on=settings.loss_on,
                             generator=generator, corrected=corrected)
        for record in driver.run(settings.num_draws, settings.num_burnin,
                                 num_warmup=settings.num_warmup,
                                 warmup_sampler=settings.warmup_sampler(), verbose=verbose,
                                 desc=desc, mala_samples=mala_samples):
            accumulator.update(record)
        diverged, diverged_at = driver.diverged, driver.diverged_at
    config["compiled"] = model.compiled
    config["compute_path"] = model.path
    config["compute_path_note"] = model.path_note
    config["compute_path_seconds_per_step"] = dict(model.path_timings)
    config["chains_at_once"] = model.group(settings.num_chains)
    config["memory_plan"] = model.memory_record()
    config["seconds"] = time.perf_counter() - started
    return accumulator.compute(diverged=diverged, diverged_at=diverged_at, config=config)


def estimate_config(model: BatchedModel, source, settings: EstimateSettings, point: Point,
                    nbeta: float, nbeta_source: str, corrected: bool,
                    correction_note: str = "") -> dict:
    """The ``config`` an estimate at ``point`` records before its chains run."""
    mask = point.mask
    return {**settings.to_dict(), "num_examples": source.n,
            "batch_size_drawn": source.drawn_batch_size(settings.batch_size), "nbeta": nbeta,
            "nbeta_source": nbeta_source,
            "num_params": model.dim,
            "num_sampled_params": int(mask.sum()) if mask is not None else model.dim,
            "loss_fn": model.loss.name, "compiled": model.compiled,
            "precision": model.precision, "device": str(model.device),
            "data": "in memory" if source.in_memory else "streamed",
            "gradient_correction": corrected,
            "gradient_correction_setting": settings.gradient_correction,
            "gradient_correction_note": correction_note,
            **point.gradient_summary(nbeta, settings.sampler.localization)}


def point_accumulator(point: Point, settings: EstimateSettings, nbeta: float,
                      corrected: bool) -> LLCAccumulator:
    """The accumulator of an estimate at ``point``: its reference losses, and the pull of
    a real gradient that was not corrected (the verdict then names it)."""
    distorting = (point.distorting_pull(nbeta, settings.sampler.localization)
                  if not corrected else None)
    return LLCAccumulator(settings.num_chains, settings.num_draws, nbeta, point.init_loss,
                          reference_loss=point.reference_loss,
                          max_excess_ratio=settings.max_excess_ratio, corrected=corrected,
                          gradient_pull=distorting,
                          gradient_ratio=point.evidence.ratio if distorting else None)
