"""The prepared problem: everything an estimate needs before its chains run, built once.

A ``Target`` holds the batched model, the data source (on the model's device when it is
in memory), w*, what is measured at w* on the data (a ``Point``: the per-example losses or
L_n(w*), the constant predictor's loss, ∇L_n(w*) and the evidence on whether it is real)
and nβ. Calibration, the estimate, the probe and checkpoint estimates all take one; a
weight restriction is the same target with its own mask (``Target.restricted``). Whether
the gradient correction applies is the target's decision (``correction_applies``), taken
at a γ.

Not here: sampling (``driver``), the estimate (``engine``), choosing settings
(``calibration``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from torch import Tensor

from .batched_model import BatchedModel
from .data import as_source
from .gradient_evidence import (
    GRADIENT_SUMMARY_KEYS,
    PULL_THRESHOLD,
    GradientEvidence,
    measure_gradient,
)
from .losses import (
    ReferenceStats,
    check_output_and_targets,
    constant_predictor_loss,
    resolve_loss,
)
from .settings import EstimateSettings


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


@dataclass(frozen=True)
class Target:
    """The prepared problem: batched model, data source, w*, its ``Point`` and nβ, with
    the settings it was measured with (their weight restriction, reference loss, seed and
    gradient-correction setting decide what the point holds)."""

    model: BatchedModel
    source: object
    point: Point
    nbeta: float
    nbeta_source: str
    settings: EstimateSettings

    @classmethod
    def prepare(cls, model: BatchedModel, source, settings: EstimateSettings,
                state: Mapping[str, Tensor]) -> "Target":
        """Move in-memory data to the model's device, load w* from ``state`` (a
        state_dict: its buffers come with it), resolve nβ and measure the point."""
        if source.in_memory:
            source = source.to(model.device)
        w_star = model.load_point(state)
        nbeta, nbeta_source = settings.resolve_nbeta(source.n)
        return cls(model, source, measure_point(model, w_star, source, settings), nbeta,
                   nbeta_source, settings)

    @classmethod
    def of(cls, model, data, settings: EstimateSettings, *, loss_fn, output=None,
           label_key: str | None = None, state: Mapping[str, Tensor] | None = None
           ) -> "Target":
        """The target of the user's ``model`` (at ``state``, default its own weights) on
        ``data``, as ``estimate_llc`` takes them: the loss resolved, the data wrapped, the
        batched model built, then ``prepare``."""
        source = as_source(data, stream=settings.stream, label_key=label_key)
        batched = BatchedModel.for_settings(model, resolve_loss(loss_fn), settings,
                                            output=output)
        return cls.prepare(batched, source, settings,
                           model.state_dict() if state is None else state)

    @property
    def w_star(self) -> Tensor:
        return self.point.w_star

    @property
    def num_examples(self) -> int:
        return self.source.n

    def restricted(self, restrict_to) -> "Target":
        """The same problem with only ``restrict_to``'s weights sampled."""
        settings = replace(self.settings, restrict_to=restrict_to)
        return replace(self, point=measure_point(self.model, self.w_star, self.source,
                                                 settings), settings=settings)

    def check_settings(self, settings: EstimateSettings) -> None:
        """Refuse settings this target was not prepared for (another nβ or weights)."""
        nbeta, _ = settings.resolve_nbeta(self.num_examples)
        if nbeta != self.nbeta:
            raise ValueError(f"the target was prepared at nβ = {self.nbeta:g}; these settings "
                             f"ask for nβ = {nbeta:g}")
        if settings.restrict_to is not self.settings.restrict_to:
            raise ValueError("the target was prepared for another weight restriction; use "
                             "Target.restricted")

    def correction_applies(self, setting, localization: float) -> bool:
        """Whether ``gradient_correction=setting`` corrects here at this γ."""
        return self.point.correction_applies(setting, self.nbeta, localization)

    def gradient_summary(self, localization: float) -> dict:
        return self.point.gradient_summary(self.nbeta, localization)
