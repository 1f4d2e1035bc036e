"""``estimate_llc``: validate the request, resolve nβ once, run a backend, return an LLCResult."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from .batching import as_tensors
from .driver import MALA_SAMPLES, ChainDriver
from .estimator import ESTIMATORS, LOSS_ON, LLCAccumulator, LLCResult
from .losses import resolve_loss
from .samplers import SGLD, Sampler, _check_positive
from .stacked import StackedModel

BACKENDS = ("native", "devinterp")


def default_nbeta(num_examples: int) -> float:
    """n / log n (β = 1/log n), the WBIC temperature."""
    if num_examples < 2:
        raise ValueError("nbeta = n/log n needs at least 2 examples; pass sampler nbeta=...")
    return num_examples / math.log(num_examples)


@dataclass(frozen=True)
class EstimateSettings:
    """Everything about an estimate except the model, data and loss."""

    sampler: Sampler
    num_chains: int = 4
    num_draws: int = 200
    num_burnin: int = 0
    batch_size: int = 128
    seed: int = 0
    estimator: str = "control_variate"
    loss_on: str = "minibatch"
    backend: str = "native"
    # Warm-up: steps at a coarser step size ``warmup_lr`` before the burn-in (see
    # ``ChainDriver.run``); ``slt_probe.calibrate`` sets both.
    warmup_lr: float | None = None
    num_warmup: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.sampler, Sampler):
            raise TypeError("sampler must be a slt_probe sampler such as slt_probe.SGLD(...); "
                            f"got {type(self.sampler).__name__}")
        for name, low in (("num_chains", 1), ("num_draws", 1), ("num_burnin", 0),
                          ("batch_size", 1), ("num_warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.warmup_lr is not None:
            _check_positive("warmup_lr", self.warmup_lr)
        if self.num_warmup and self.warmup_lr is None:
            raise ValueError("num_warmup > 0 needs warmup_lr (the warm-up's step size)")
        if self.num_warmup and self.backend != "native":
            raise ValueError("a warm-up (num_warmup > 0) runs on the native backend only")

    def warmup_sampler(self) -> Sampler | None:
        """The sampler with its step size replaced by ``warmup_lr`` (None without one)."""
        return replace(self.sampler, lr=self.warmup_lr) if self.num_warmup else None

    def to_dict(self) -> dict:
        return {"sampler": self.sampler.to_dict(), "num_chains": self.num_chains,
                "num_draws": self.num_draws, "num_burnin": self.num_burnin,
                "batch_size": self.batch_size, "seed": self.seed, "estimator": self.estimator,
                "loss_on": self.loss_on, "backend": self.backend, "warmup_lr": self.warmup_lr,
                "num_warmup": self.num_warmup}


def estimate_llc(model: nn.Module, data, *, loss_fn="cross_entropy",
                 sampler: Sampler | str | None = None, num_chains: int = 4, num_draws: int = 200,
                 num_burnin: int = 0, batch_size: int = 128, seed: int = 0,
                 estimator: str = "control_variate", loss_on: str = "minibatch",
                 restrict_to=None, backend: str = "native", compile: bool = False,
                 warmup_lr: float | None = None, num_warmup: int = 0,
                 calibration_grid=None, verbose: bool = True) -> LLCResult:
    """Estimate the local learning coefficient λ̂ of ``model`` at its current weights w*.

    λ̂ = nβ·(E[L_n(w)] − L_n(w*)) under the localised tempered posterior, sampled by
    ``sampler`` (default ``SGLD(lr=1e-4, localization=100)``, nβ = n/log n unless the
    sampler sets ``nbeta``). All chains advance together in one batched computation.
    ``sampler="auto"`` first runs ``slt_probe.calibrate`` (short chains over ε × γ) and
    records the choice and its evidence in ``result.config["calibration"]``; it also raises
    ``num_chains`` to what a 3 % standard error needs (``CalibrationGrid``), and
    ``result.config["num_chains"]`` holds the number used.
    ``calibration_grid`` (a ``CalibrationGrid``) changes what ``"auto"`` searches and its
    standard-error target; it is an error without ``sampler="auto"``.

    estimator: ``"control_variate"`` averages nβ·(L_b(w_t) − L_b(w*)) on the same minibatch
        b (same expectation as ``"plain"``, far less minibatch noise); ``"plain"`` is
        devinterp's nβ·(mean L_b(w_t) − L_n(w*)).
    loss_on: ``"full"`` evaluates L_n on all the data at every draw (small datasets).
    restrict_to: parameter names (or name → boolean mask) to sample; the rest stay at w*.
    warmup_lr, num_warmup: run ``num_warmup`` steps at the coarser step ``warmup_lr``
        before the burn-in, so chains spread along flat directions in fewer steps
        (``sampler="auto"`` chooses both).
    compile: compile the batched gradient with ``torch.compile`` (falls back to eager).

    The model is evaluated in eval mode on a private copy; the user's model, its
    gradients and the global RNG are left exactly as they were.
    """
    auto = isinstance(sampler, str) and sampler == "auto"
    if isinstance(sampler, str) and not auto:
        raise ValueError(f"sampler must be a slt_probe sampler or 'auto', got {sampler!r}")
    if calibration_grid is not None and not auto:
        raise ValueError("calibration_grid applies only to sampler='auto'")
    settings = EstimateSettings(sampler=SGLD() if sampler is None or auto else sampler,
                                num_chains=num_chains, num_draws=num_draws,
                                num_burnin=num_burnin, batch_size=batch_size, seed=seed,
                                estimator=estimator, loss_on=loss_on, backend=backend,
                                warmup_lr=warmup_lr, num_warmup=num_warmup)
    loss = resolve_loss(loss_fn)
    x, y = as_tensors(data)
    stacked = StackedModel(model, loss, compile=compile and backend == "native")
    w_star = stacked.flatten(model)
    calibration = None
    if auto:
        from .calibration import calibrate

        calibration = calibrate(model, (x, y), grid=calibration_grid, batch_size=batch_size,
                                seed=seed, estimator=estimator, restrict_to=restrict_to,
                                verbose=verbose, stacked=stacked)
        settings = calibration.apply(settings)
    result = run_estimate(stacked, w_star, x, y, settings, restrict_to=restrict_to,
                          verbose=verbose, model=model)
    if calibration is not None:
        result.config["calibration"] = calibration.to_dict()
    return result


def run_estimate(stacked: StackedModel, w_star: torch.Tensor, x, y, settings: EstimateSettings,
                 *, restrict_to=None, verbose: bool = True, model: nn.Module | None = None,
                 desc: str = "LLC", mala_samples: int = MALA_SAMPLES) -> LLCResult:
    """Estimate at ``w_star`` with an already-built ``StackedModel`` (reused by trajectories)."""
    started = time.perf_counter()
    x = x.to(stacked.device)
    y = y.to(stacked.device)
    mask = stacked.mask_for(restrict_to)
    star_losses = stacked.per_example_losses(w_star, x, y)
    n = len(x)
    nbeta = settings.sampler.nbeta if settings.sampler.nbeta is not None else default_nbeta(n)
    config = {**settings.to_dict(), "num_examples": n, "nbeta": nbeta,
              "nbeta_source": "sampler" if settings.sampler.nbeta is not None else "n/log n",
              "num_params": stacked.dim,
              "num_sampled_params": int(mask.sum()) if mask is not None else stacked.dim,
              "restrict_to": sorted(restrict_to) if restrict_to is not None else None,
              "loss_fn": stacked.loss.name, "compiled": stacked.compiled}
    accumulator = LLCAccumulator(settings.num_chains, settings.num_draws, nbeta,
                                 float(star_losses.mean()))
    if settings.backend == "devinterp":
        from .backends.devinterp_backend import run_devinterp

        diverged, diverged_at = run_devinterp(model, stacked, w_star, x, y, settings, nbeta,
                                              star_losses, mask, accumulator, verbose=verbose)
    else:
        generator = torch.Generator(device=stacked.device).manual_seed(settings.seed)
        driver = ChainDriver(stacked, x, y, sampler=settings.sampler, nbeta=nbeta,
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
