"""The LLC estimator: per-draw records in, an ``LLCResult`` out.

``llc_from_losses`` is the one place the formula λ̂ = nβ·(E[L] − L*) lives (with the
first-order term g·(w − w*) subtracted when the gradient correction is on); the
accumulator and the calibration both call it. Not here: sampling or batching.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass

import numpy as np

from .diagnostics import diagnose
from .record import EstimateRecord

ESTIMATORS = ("control_variate", "plain")
LOSS_ON = ("minibatch", "full")


def llc_from_losses(nbeta: float, losses, reference, correction=None) -> np.ndarray:
    """λ̂ terms nβ·(L(w_t) − L_ref − g·(w_t − w*)); ``reference`` is L_n(w*) or, per draw,
    L_b(w*); ``correction`` is g·(w_t − w*) (None: no gradient correction).

    Examples:
        >>> llc_from_losses(10.0, [1.5, 2.0], [1.0, 1.0]).tolist()
        [5.0, 10.0]
    """
    terms = np.asarray(losses, dtype=float) - np.asarray(reference, dtype=float)
    if correction is not None:
        terms = terms - np.asarray(correction, dtype=float)
    return nbeta * terms


@dataclass
class DrawRecord:
    """One draw of all chains: loss at w_t and the reference loss it is compared with."""

    step: int
    loss: np.ndarray  # (chains,) L at w_t (minibatch or full data)
    reference: np.ndarray  # (chains,) L_b(w*) on the same minibatch, or L_n(w*)
    alive: np.ndarray  # (chains,) bool: chain has not diverged
    acceptance: np.ndarray | None = None  # (chains,) MALA acceptance of the last proposal
    correction: np.ndarray | None = None  # (chains,) g·(w_t − w*) when the correction is on


class LLCAccumulator:
    """torchmetrics-style ``update``/``compute`` over draws (``DrawRecord`` in,
    ``LLCResult`` out; ``reset`` starts over). A custom driver feeds it its own draws.

    Args:
        num_chains, num_draws: the shape of the traces.
        nbeta: nβ, the same the sampler used.
        init_loss: L_n(w*).
        reference_loss: the best constant predictor's loss (for the excess ratio).
        max_excess_ratio: the locality limit of the verdict.
        corrected: whether draws carry the gradient correction g·(w_t − w*).
        gradient_pull, gradient_ratio: where ∇L_n(w*) is real and not corrected, its pull
            on the plain estimate (nats) and noise ratio; the verdict then says w* is not
            a critical point.

    Raises:
        RuntimeError: from ``compute``, when every chain diverged.

    Examples:
        >>> acc = LLCAccumulator(num_chains=1, num_draws=2, nbeta=4.0, init_loss=0.5)
        >>> for loss in (0.75, 1.25):
        ...     acc.update(DrawRecord(0, np.array([loss]), np.array([0.5]), np.array([True])))
        >>> acc.compute(diverged=np.zeros(1, bool), diverged_at=[None]).llc_mean
        2.0
    """

    def __init__(self, num_chains: int, num_draws: int, nbeta: float, init_loss: float, *,
                 reference_loss: float | None = None, max_excess_ratio: float = 0.25,
                 corrected: bool = False, gradient_pull: float | None = None,
                 gradient_ratio: float | None = None):
        self.nbeta = nbeta
        self.gradient_pull = gradient_pull
        self.gradient_ratio = gradient_ratio
        self.init_loss = init_loss
        self.reference_loss = reference_loss
        self.max_excess_ratio = max_excess_ratio
        self.corrected = corrected
        self.loss = np.full((num_chains, num_draws), np.nan)
        self.reference = np.full((num_chains, num_draws), np.nan)
        self.correction = np.zeros((num_chains, num_draws))
        self.acceptance: list[np.ndarray] = []
        self.count = 0

    def reset(self) -> None:
        self.loss[:] = np.nan
        self.reference[:] = np.nan
        self.correction[:] = 0.0
        self.acceptance = []
        self.count = 0

    def update(self, record: DrawRecord) -> None:
        i = self.count
        self.loss[:, i] = np.where(record.alive, record.loss, np.nan)
        self.reference[:, i] = np.where(record.alive, record.reference, np.nan)
        if record.correction is not None:
            self.correction[:, i] = record.correction
        if record.acceptance is not None:
            self.acceptance.append(np.asarray(record.acceptance, dtype=float))
        self.count += 1

    def compute(self, *, diverged: np.ndarray, diverged_at: list,
                record: EstimateRecord | None = None) -> "LLCResult":
        loss = self.loss[:, :self.count]
        reference = self.reference[:, :self.count]
        llc_trace = llc_from_losses(self.nbeta, loss, reference, self.correction[:, :self.count])
        alive = ~np.asarray(diverged, dtype=bool)
        if not alive.any():
            lr = "" if record is None else f" (it was {record.sampler.lr:g})"
            raise RuntimeError(
                "all chains diverged (NaN/inf loss): the sampler is unstable at this step size; "
                f"use a smaller lr{lr} or a larger localization")
        per_chain = np.where(alive, np.nanmean(np.where(alive[:, None], llc_trace, 0.0), axis=1),
                             np.nan)
        if (~alive).any():
            warnings.warn(f"chains {np.flatnonzero(~alive).tolist()} diverged and are excluded "
                          "from the estimate; consider a smaller lr", RuntimeWarning, stacklevel=3)
        kept = per_chain[alive]
        acceptance = np.stack(self.acceptance) if self.acceptance else None
        diagnostics = diagnose(llc_trace, loss - reference, ~alive, diverged_at, acceptance,
                               init_loss=self.init_loss, reference_loss=self.reference_loss,
                               max_excess_ratio=self.max_excess_ratio, corrected=self.corrected,
                               gradient_pull=self.gradient_pull,
                               gradient_ratio=self.gradient_ratio)
        mean = float(kept.mean())
        std = float(kept.std(ddof=1)) if len(kept) > 1 else float("nan")
        return LLCResult(llc_mean=mean, llc_std=std, llc_per_chain=per_chain, loss_trace=loss,
                         reference_trace=reference, llc_trace=llc_trace,
                         init_loss=self.init_loss, nbeta=self.nbeta,
                         diagnostics=diagnostics, record=record)


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


@dataclass
class LLCResult:
    """An LLC estimate with its traces, settings and health report.

    ``llc_std`` is the spread across chains (ddof=1); the standard error of
    ``llc_mean`` is ``llc_std / sqrt(number of healthy chains)``. ``diagnostics`` holds
    the verdict (``healthy``, ``reasons``, ``warnings``), locality (``excess_ratio``,
    ``mean_sampled_loss``, ``local``), R-hat and ESS; ``record`` how it was made (an
    ``EstimateRecord``: settings, nβ, correction decision, computation path, calibration)
    and ``config`` the same record flattened into a dict (what the JSON holds).

    Examples:
        >>> acc = LLCAccumulator(num_chains=2, num_draws=1, nbeta=10.0, init_loss=1.0)
        >>> acc.update(DrawRecord(0, np.array([1.2, 1.4]), np.array([1.0, 1.0]),
        ...                       np.array([True, True])))
        >>> result = acc.compute(diverged=np.zeros(2, bool), diverged_at=[None, None])
        >>> round(result.llc_mean, 6), round(result.effective_params, 6)
        (3.0, 6.0)
    """

    llc_mean: float
    llc_std: float
    llc_per_chain: np.ndarray
    loss_trace: np.ndarray
    reference_trace: np.ndarray
    llc_trace: np.ndarray
    init_loss: float
    nbeta: float
    diagnostics: dict
    record: EstimateRecord | None = None

    @property
    def config(self) -> dict:
        """The record as a flat dict (a fresh copy: change ``record``, not this)."""
        return {} if self.record is None else self.record.to_dict()

    @property
    def effective_params(self) -> float:
        return 2.0 * self.llc_mean

    @property
    def llc_sem(self) -> float:
        kept = np.isfinite(self.llc_per_chain).sum()
        return self.llc_std / math.sqrt(kept) if kept > 1 else float("nan")

    def to_dict(self) -> dict:
        return _jsonable({
            "llc_mean": self.llc_mean, "llc_std": self.llc_std, "llc_sem": self.llc_sem,
            "effective_params": self.effective_params, "llc_per_chain": self.llc_per_chain,
            "init_loss": self.init_loss, "nbeta": self.nbeta,
            "loss_trace": self.loss_trace, "reference_trace": self.reference_trace,
            "diagnostics": self.diagnostics, "config": self.config,
        })

    def to_json(self, path) -> None:
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1)

    def __repr__(self) -> str:
        d = self.diagnostics
        ratio = d.get("excess_ratio")
        return (f"LLCResult(llc={self.llc_mean:.4g} ± {self.llc_std:.2g} (std over "
                f"{np.isfinite(self.llc_per_chain).sum()} chains), effective_params="
                f"{self.effective_params:.4g}, nbeta={self.nbeta:.4g}, "
                f"excess_ratio={'n/a' if ratio is None else format(ratio, '.3g')}, "
                f"healthy={d.get('healthy')})")
