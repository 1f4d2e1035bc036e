"""Run one estimate at a given w* with an already-built ``BatchedModel``: resolve nβ, drive
the chains (or the devinterp backend), accumulate, return an ``LLCResult``.

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
from .settings import EstimateSettings, default_nbeta


def run_estimate(model: BatchedModel, w_star: Tensor, x: Tensor, y: Tensor,
                 settings: EstimateSettings, *, verbose: bool = True, desc: str = "LLC",
                 mala_samples: int = MALA_SAMPLES) -> LLCResult:
    """Estimate at ``w_star`` with ``settings`` (whose sampler is already concrete)."""
    if settings.auto:
        raise ValueError("run_estimate needs a concrete sampler; calibrate first")
    started = time.perf_counter()
    x = x.to(model.device)
    y = y.to(model.device)
    mask = model.layout.mask(settings.restrict_to)
    star_losses = model.per_example_losses(w_star, x, y)
    n = len(x)
    sampler = settings.sampler
    nbeta = sampler.nbeta if sampler.nbeta is not None else default_nbeta(n)
    config = {**settings.to_dict(), "num_examples": n, "nbeta": nbeta,
              "nbeta_source": "sampler" if sampler.nbeta is not None else "n/log n",
              "num_params": model.dim,
              "num_sampled_params": int(mask.sum()) if mask is not None else model.dim,
              "loss_fn": model.loss.name, "compiled": model.compiled}
    accumulator = LLCAccumulator(settings.num_chains, settings.num_draws, nbeta,
                                 float(star_losses.mean()))
    if settings.backend == "devinterp":
        diverged, diverged_at = run_devinterp(model, w_star, x, y, settings, nbeta,
                                              star_losses, mask, accumulator, verbose=verbose)
    else:
        generator = torch.Generator(device=model.device).manual_seed(settings.seed)
        driver = ChainDriver(model, x, y, sampler=sampler, nbeta=nbeta,
                             w_star=w_star, star_losses=star_losses, mask=mask,
                             num_chains=settings.num_chains, batch_size=settings.batch_size,
                             estimator=settings.estimator, loss_on=settings.loss_on,
                             generator=generator)
        for record in driver.run(settings.num_draws, settings.num_burnin,
                                 num_warmup=settings.num_warmup,
                                 warmup_sampler=settings.warmup_sampler(), verbose=verbose,
                                 desc=desc, mala_samples=mala_samples):
            accumulator.update(record)
        diverged, diverged_at = driver.diverged, driver.diverged_at
    config["seconds"] = time.perf_counter() - started
    return accumulator.compute(diverged=diverged, diverged_at=diverged_at, config=config)
