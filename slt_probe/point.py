"""What an estimate needs to know about w* on the data, measured once per point: the
per-example losses (data in memory) or L_n(w*) (streamed data), the constant predictor's
loss, and ∇L_n(w*) with the evidence on whether it is real (``gradient_evidence``) when a
gradient correction may apply.

Not here: sampling (``driver``), the estimate (``engine``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .batched_model import BatchedModel
from .gradient_evidence import (
    GRADIENT_SUMMARY_KEYS,
    PULL_THRESHOLD,
    GradientEvidence,
    measure_gradient,
)
from .losses import ReferenceStats, check_output_and_targets, constant_predictor_loss


@dataclass
class Point:
    """w* on the data: its losses, the constant predictor's loss, the gradient and the
    evidence on it."""

    w_star: Tensor
    init_loss: float
    num_examples: int
    reference_loss: float | None
    evidence: GradientEvidence | None
    mask: Tensor | None
    star_losses: Tensor | None = None  # per example, for data in memory

    @property
    def gradient(self) -> Tensor | None:
        """∇L_n(w*) on the sampled coordinates (None when the correction is off)."""
        return None if self.evidence is None else self.evidence.gradient

    def correction_applies(self, setting, nbeta: float, localization: float) -> bool:
        """Whether ``gradient_correction=setting`` corrects here at this nβ and γ."""
        if self.evidence is None:  # a Point built by hand
            return False
        return self.evidence.applies(setting, nbeta, localization)

    def distorting_pull(self, nbeta: float, localization: float) -> float | None:
        """The pull of a real gradient on the plain estimate where it exceeds the
        threshold (w* is then not a critical point at this resolution), else None."""
        if self.evidence is None or not self.evidence.significant:
            return None
        pull = self.evidence.pull(nbeta, localization)
        return pull if pull > PULL_THRESHOLD else None

    def gradient_summary(self, nbeta: float, localization: float) -> dict:
        """The evidence the correction decision rests on (None where not measured)."""
        if self.evidence is None:
            return {key: None for key in GRADIENT_SUMMARY_KEYS}
        return self.evidence.summary(nbeta, localization)


def measure_point(model: BatchedModel, w_star: Tensor, source, settings) -> Point:
    """Losses at w*, L_ref and ∇L_n(w*) with its evidence, with two passes over streamed
    data (more with the curvature along a significant gradient)."""
    mask = model.layout.mask(settings.restrict_to)
    first_x, first_y = next(iter(source.chunks(2)))
    first_x = model.inputs(first_x)
    sample = model.output_sample(w_star, first_x)
    check_output_and_targets(model.loss, sample, first_y.to(model.device))
    if source.in_memory:
        x, y = model.inputs(source.x), source.y.to(model.device)
        check_output_and_targets(model.loss, sample, y)
        star_losses = model.per_example_losses(w_star, x, y)
        reference = constant_predictor_loss(model.loss, sample, y)
        init_loss = float(star_losses.mean())
    else:
        star_losses = None
        total, stats = 0.0, ReferenceStats(model.loss, sample)
        for xb, yb in source.chunks():
            xb, yb = model.inputs(xb), yb.to(model.device)
            check_output_and_targets(model.loss, sample, yb)
            total += float(model.per_example_losses(w_star, xb, yb).sum())
            stats.update(yb)
        init_loss = total / source.n
        reference = stats.value()
    if settings.reference_loss is not None:
        reference = settings.reference_loss
    if not math.isfinite(init_loss):
        raise ValueError("the loss at the given model is NaN or inf; check the model and data")
    # measured whatever the setting: a plain estimate at a point with a real gradient is
    # reported as not at a critical point (the curvature says how far it is pulled)
    evidence = measure_gradient(model, w_star, source, mask, seed=settings.seed,
                                curvature=settings.gradient_correction is not True)
    return Point(w_star=w_star, init_loss=init_loss, num_examples=source.n,
                 reference_loss=reference, evidence=evidence, mask=mask,
                 star_losses=star_losses)
