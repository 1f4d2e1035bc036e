"""Run one estimate at a given w* with an already-built ``BatchedModel``: resolve nβ, the
gradient correction and the locality reference, drive the chains (or the devinterp
backend), accumulate, return an ``LLCResult``.

Shared by ``estimate_llc``, the probe, trajectories and calibration, so all of them
estimate the same way. Not here: choosing settings (``calibration``), validating the
user's request (``api``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .backends.devinterp_backend import run_devinterp
from .batched_model import BatchedModel, num_examples
from .driver import MALA_SAMPLES, ChainDriver
from .estimator import LLCAccumulator, LLCResult
from .losses import check_output_and_targets, constant_predictor_loss
from .settings import EstimateSettings, correction_applies, linear_bias_bound


@dataclass
class Point:
    """What an estimate needs to know about w* on the data, computed once per point:
    per-example losses, the constant predictor's loss, and (when a correction may
    apply) the full-data gradient."""

    w_star: Tensor
    star_losses: Tensor
    reference_loss: float | None
    gradient: Tensor | None
    mask: Tensor | None

    @property
    def init_loss(self) -> float:
        return float(self.star_losses.mean())

    def gradient_norm_sq(self) -> float:
        if self.gradient is None:
            return 0.0
        g = self.gradient if self.mask is None else self.gradient * self.mask.double()
        return float(g @ g)


def measure_point(model: BatchedModel, w_star: Tensor, x: Tensor, y: Tensor,
                  settings: EstimateSettings) -> Point:
    """Losses at w*, L_ref and (unless the correction is off) ∇L_n(w*)."""
    mask = model.layout.mask(settings.restrict_to)
    sample = model.output_sample(w_star, x)
    check_output_and_targets(model.loss, sample, y)
    star_losses = model.per_example_losses(w_star, x, y)
    reference = (settings.reference_loss if settings.reference_loss is not None
                 else constant_predictor_loss(model.loss, sample, y))
    gradient = (None if settings.gradient_correction is False
                else model.full_gradient(w_star, x, y))
    return Point(w_star=w_star, star_losses=star_losses, reference_loss=reference,
                 gradient=gradient, mask=mask)


def run_estimate(model: BatchedModel, w_star: Tensor, x: Tensor, y: Tensor,
                 settings: EstimateSettings, *, verbose: bool = True, desc: str = "LLC",
                 mala_samples: int = MALA_SAMPLES, point: Point | None = None) -> LLCResult:
    """Estimate at ``w_star`` with ``settings`` (whose sampler is already concrete)."""
    if settings.auto:
        raise ValueError("run_estimate needs a concrete sampler; calibrate first")
    started = time.perf_counter()
    x = model.inputs(x)
    y = y.to(model.device)
    point = point or measure_point(model, w_star, x, y, settings)
    n = num_examples(x)
    sampler = settings.sampler
    nbeta, nbeta_source = settings.resolve_nbeta(n)
    norm_sq = point.gradient_norm_sq()
    corrected = correction_applies(settings.gradient_correction, norm_sq, nbeta,
                                   sampler.localization)
    correction_note = ""
    if corrected and settings.backend != "native":
        # "auto" only (True is refused with this backend): devinterp samples the loss as is
        corrected = False
        correction_note = ("the devinterp backend cannot apply the gradient correction; the "
                           "plain loss was sampled")
    mask = point.mask
    config = {**settings.to_dict(), "num_examples": n, "nbeta": nbeta,
              "nbeta_source": nbeta_source,
              "num_params": model.dim,
              "num_sampled_params": int(mask.sum()) if mask is not None else model.dim,
              "loss_fn": model.loss.name, "compiled": model.compiled,
              "precision": model.precision, "device": str(model.device),
              "gradient_correction": corrected,
              "gradient_correction_setting": settings.gradient_correction,
              "gradient_correction_note": correction_note,
              "gradient_norm": norm_sq ** 0.5 if point.gradient is not None else None,
              "linear_bias_bound": (linear_bias_bound(norm_sq, nbeta, sampler.localization)
                                    if point.gradient is not None else None)}
    accumulator = LLCAccumulator(settings.num_chains, settings.num_draws, nbeta,
                                 point.init_loss, reference_loss=point.reference_loss,
                                 max_excess_ratio=settings.max_excess_ratio,
                                 corrected=corrected)
    if settings.backend == "devinterp":
        diverged, diverged_at = run_devinterp(model, w_star, x, y, settings, nbeta,
                                              point.star_losses, mask, accumulator,
                                              verbose=verbose)
    else:
        generator = torch.Generator(device=model.device).manual_seed(settings.seed)
        driver = ChainDriver(model, x, y, sampler=sampler, nbeta=nbeta,
                             w_star=w_star, star_losses=point.star_losses, mask=mask,
                             num_chains=settings.num_chains, batch_size=settings.batch_size,
                             estimator=settings.estimator, loss_on=settings.loss_on,
                             generator=generator,
                             gradient=point.gradient if corrected else None)
        for record in driver.run(settings.num_draws, settings.num_burnin,
                                 num_warmup=settings.num_warmup,
                                 warmup_sampler=settings.warmup_sampler(), verbose=verbose,
                                 desc=desc, mala_samples=mala_samples):
            accumulator.update(record)
        diverged, diverged_at = driver.diverged, driver.diverged_at
    config["compute_path"] = model.path
    config["compute_path_note"] = model.path_note
    config["seconds"] = time.perf_counter() - started
    return accumulator.compute(diverged=diverged, diverged_at=diverged_at, config=config)
