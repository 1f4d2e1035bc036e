"""Automatic choice of the SGLD step ε, the localisation γ, the warm-up, burn-in and chains.

Stages, each returning a typed ``Stage`` (``docs/calibration.md`` explains why):

1. stability: the largest ε of ``grid.lrs`` whose chains do not diverge in a short probe
   at the first γ; chains relax one grid value below it ("hot relaxation").
2. warm-up step: from those positions, a ladder at ε, ε/2, … (the same steps and noise
   for every level) finds the first ε_w whose λ̂ is within ``grid.warmup_gap`` of 2ε's.
3. locality: at ε_w, from w*, chains relax at γ = ``grid.start_localization``
   (Langevin time ``grid.relax_time``/γ, until λ̂ stops drifting) and their excess ratio is
   measured; γ is weakened while the chains stay local and relax within
   ``grid.max_relax_steps``, strengthened if the first γ is not local.
4. step bias at the chosen γ: the ladder again, from the relaxed positions, down to the
   first ε within ``grid.bias_tolerance`` of 2ε; if the chains are not local at that ε
   (a hot ε_w can hide it), γ is strengthened, the chains relax there from w* at ε, and
   this stage repeats.
5. chains: the chosen level's spread across chains sets how many reach
   ``grid.target_relative_sem``.

The estimate warms up from w* at ε_w for the Langevin time the sweep took to relax, burns
in at ε long enough to settle the stiffest directions, and draws. Not here: the estimate itself (``engine``).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from .core.diagnostics import excess_ratio
from .core.driver import ChainDriver
from .core.estimator import llc_from_losses
from .core.samplers import SGLD
from .core.settings import EstimateSettings, resolve_settings
from .core.target import Target

DEFAULT_LRS = tuple(float(f"{m}e{e}") for e in range(-8, -1) for m in (1, 2, 5))
# γ from 1 to 10⁶ by half-decades: a large-weight network can need 10⁵ to stay local
# (measured on the Omnigrok MNIST MLP at the end of memorisation)
DEFAULT_LOCALIZATIONS = (1e6, 3e5, 1e5, 3e4, 1e4, 3e3, 1e3, 300.0, 100.0, 30.0, 10.0, 3.0,
                         1.0)
# MALA acceptance is read every this many steps of a ladder level (an extra forward each).
_MALA_EVERY = 25


@dataclass(frozen=True)
class CalibrationGrid:
    """What to search and how much sampling the search may spend.

    Examples:
        >>> CalibrationGrid(start_localization=1000.0).localizations[:3]
        (1000000.0, 300000.0, 100000.0)

    Args:
        lrs: candidate ε for the stability probe (``probe_steps`` steps each, largest
            first).
        localizations: candidate γ; the sweep walks them from ``start_localization``.
        start_localization: the first γ tried.
        num_chains: chains of every calibration run (default: the estimate's own chains,
            at least 4, so calibrating costs what the estimate costs per step).
        relax_time: Langevin time a relaxation at γ covers at least, in units of 1/γ
            (the localisation pulls flat directions back on the time scale 2/γ).
        min_steps: least steps of any relaxation.
        tolerance: relative change of λ̂ between the last two doublings of a relaxation
            that still counts as relaxed (plus twice its standard error).
        max_relax_steps: a γ whose relaxation would need more steps than this at the
            warm-up step ε_w is not tried: it bounds the warm-up of every estimate made
            with the result.
        max_excess_ratio: the locality limit (default: the settings' own).
        locality_margin: the calibration accepts a γ only if the excess ratio is below
            this fraction of the limit, so the estimate, with its own noise, stays local.
        level_steps: least steps of each step-bias ladder level (half settle, half
            measured).
        warmup_gap: the sweep over γ (and the estimate's warm-up) runs at the first ε,
            halving from a hot relaxation, whose λ̂ is within this of 2ε's.
        settle: a level at ε runs at least ``settle`` × min(ε_stable/ε, 1/(γε)) steps
            (ε_stable: the stability probe's ε): the stiffest directions, whose curvature
            the probe's stability limit measures, relax in about ε_stable/ε steps, and every
            direction within 1/(γε); so levels at small ε settle them before they are
            measured.
        bias_tolerance: largest gap between λ̂ at 2ε and at ε for which ε is accepted; an
            unresolved gap (s.e. above half the tolerance) doubles both levels up to
            ``max_lengthenings`` times and is then accepted unless significantly (2 s.e.)
            above the tolerance.
        max_steps: budget of the whole calibration in steps (one step advances all
            chains); exceeding it is an error.
        target_relative_sem: standard error of λ̂ relative to λ̂ the estimate should
            reach (None: keep the caller's chains); ``max_chains`` caps the chains.
    """

    lrs: tuple[float, ...] = DEFAULT_LRS
    localizations: tuple[float, ...] = DEFAULT_LOCALIZATIONS
    start_localization: float = 100.0
    num_chains: int | None = None
    probe_steps: int = 50
    relax_time: float = 1.0
    min_steps: int = 100
    tolerance: float = 0.05
    max_relax_steps: int = 50_000
    max_excess_ratio: float | None = None
    locality_margin: float = 0.8
    level_steps: int = 300
    warmup_gap: float = 0.25
    settle: float = 10.0
    bias_tolerance: float = 0.05
    max_lengthenings: int = 2
    max_steps: int = 150_000
    target_relative_sem: float | None = 0.03
    max_chains: int = 64

    def __post_init__(self) -> None:
        if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
            raise ValueError(f"lrs must be positive numbers, got {self.lrs}")
        if not self.localizations or any(not (g > 0 and math.isfinite(g))
                                         for g in self.localizations):
            raise ValueError(f"localizations must be positive numbers, got "
                             f"{self.localizations}")
        if self.start_localization not in self.localizations:
            raise ValueError(f"start_localization ({self.start_localization}) must be one of "
                             f"localizations {self.localizations}")
        for name in ("tolerance", "bias_tolerance", "warmup_gap"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not (self.settle >= 0 and math.isfinite(self.settle)):
            raise ValueError(f"settle must be >= 0, got {self.settle}")
        if not (self.relax_time > 0 and math.isfinite(self.relax_time)):
            raise ValueError(f"relax_time must be > 0, got {self.relax_time}")
        if self.num_chains is not None and self.num_chains < 2:
            raise ValueError(f"num_chains must be >= 2 (standard errors need two chains), "
                             f"got {self.num_chains}")
        for name in ("probe_steps", "min_steps", "level_steps"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name} must be >= 8, got {getattr(self, name)}")
        if self.max_relax_steps < self.min_steps:
            raise ValueError(f"max_relax_steps ({self.max_relax_steps}) must be >= min_steps "
                             f"({self.min_steps})")
        if not 0 < self.locality_margin <= 1:
            raise ValueError(f"locality_margin must be in (0, 1], got {self.locality_margin}")
        if self.max_excess_ratio is not None and not self.max_excess_ratio > 0:
            raise ValueError(f"max_excess_ratio must be > 0, got {self.max_excess_ratio}")
        if self.target_relative_sem is not None and not 0 < self.target_relative_sem < 1:
            raise ValueError(f"target_relative_sem must be in (0, 1) or None, got "
                             f"{self.target_relative_sem}")
        if self.max_chains < 1:
            raise ValueError(f"max_chains must be >= 1, got {self.max_chains}")
        if self.max_steps < self.min_steps:
            raise ValueError(f"max_steps ({self.max_steps}) must be >= min_steps "
                             f"({self.min_steps})")


class CalibrationError(RuntimeError):
    """No setting passed the calibration; the message says which stage failed and why."""


class _Chains:
    """Chains at one (ε, γ), started at ``start`` (default w*) and extended on demand;
    keeps per-step λ̂ and raw excess loss of every chain."""

    def __init__(self, driver: ChainDriver, max_steps: int, start=None):
        self.sampler: SGLD = driver.sampler
        self.driver = driver
        self._records = driver.run(max_steps, 0, start=start, verbose=False,
                                   mala_samples=max(1, max_steps // _MALA_EVERY))
        self.llc: list[np.ndarray] = []
        self.excess: list[np.ndarray] = []
        self.acceptance: list[np.ndarray] = []
        self.exhausted = False

    @property
    def steps(self) -> int:
        return len(self.llc)

    @property
    def langevin_time(self) -> float:
        return self.sampler.lr * self.steps

    @property
    def healthy(self) -> bool:
        return not (self.exhausted or self.driver.diverged.any())

    def extend_to(self, steps: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            while self.steps < steps and not self.exhausted:
                record = next(self._records, None)
                if record is None:  # every chain diverged
                    self.exhausted = True
                    break
                self.llc.append(np.where(record.alive, llc_from_losses(
                    self.driver.nbeta, record.loss, record.reference, record.correction),
                    np.nan))
                self.excess.append(record.loss - record.reference)
                if record.acceptance is not None:
                    self.acceptance.append(record.acceptance)

    def window(self, start: int, stop: int) -> np.ndarray:
        """Per-chain mean λ̂ over steps [start, stop)."""
        return np.asarray(self.llc[start:stop]).mean(axis=0)

    def second_half(self) -> np.ndarray:
        return self.window(self.steps // 2, self.steps)

    def mean_excess(self) -> float:
        """Mean raw excess loss L(w_t) − L(w*) over the second half."""
        return float(np.mean(self.excess[self.steps // 2:]))

    def mala_acceptance(self) -> float:
        values = np.asarray(self.acceptance)
        return float(np.nanmean(values)) if values.size else float("nan")


def _mean_sem(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


def relative_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean a − mean b)/mean b from paired per-chain means, and its standard error.

    Pairing chains that share positions or noise cancels most of their common noise.

    Examples:
        >>> round(relative_gap(np.array([1.1, 2.2]), np.array([1.0, 2.0]))[0], 6)
        0.1
    """
    level = float(b.mean())
    diff = a - b
    return float(diff.mean()) / level, float(diff.std(ddof=1) / math.sqrt(diff.size)) / level



def gap_not_shrinking(gaps: list[tuple[float, float]], tolerance: float,
                      shrink: float = 0.9) -> bool:
    """Whether halving ε has stopped shrinking the λ̂ gap between 2ε and ε.

    A step-size bias shrinks with ε (about in proportion for SGLD). When the last three
    gaps (gap, s.e.), one per halving, are all significantly above ``tolerance`` and none
    is below ``shrink`` × the one before, the change is not a bias that smaller steps
    remove, and halving on would only double the cost of every level.

    Examples:
        >>> gap_not_shrinking([(-0.19, 0.04), (-0.18, 0.04), (-0.20, 0.05)], 0.05)
        True
        >>> gap_not_shrinking([(-0.36, 0.02), (-0.18, 0.02), (-0.09, 0.02)], 0.05)
        False
    """
    if len(gaps) < 3:
        return False
    last = gaps[-3:]
    significant = all(abs(gap) - 2 * sem > tolerance for gap, sem in last)
    return significant and all(abs(later[0]) >= shrink * abs(earlier[0])
                               for earlier, later in zip(last, last[1:]))


@dataclass
class Stage:
    """The outcome of one calibration stage: ``chains`` (or a ladder ``row``) on success,
    else ``reason`` (``diverged``, ``budget``, ``not_local``, ``no_level``)."""

    ok: bool
    reason: str = ""
    detail: str = ""
    chains: _Chains | None = None
    row: dict | None = None


@dataclass
class Calibration:
    """The recommended sampler, its warm-up and burn-in, and the search behind it.

    ``apply(settings)`` puts the choice into an ``EstimateSettings``; ``to_dict`` and
    ``from_dict`` round-trip it through JSON (a resumed run holds the same settings).

    Examples:
        >>> cal = Calibration(sampler=SGLD(lr=1e-4, localization=100.0), warmup_lr=2e-4,
        ...                   num_warmup=500, num_burnin=200, table=[], reason="", nbeta=150.0)
        >>> cal.apply(EstimateSettings(num_chains=8)).num_warmup
        500
        >>> Calibration.from_dict(cal.to_dict()).sampler == cal.sampler
        True
    """

    sampler: SGLD
    warmup_lr: float
    num_warmup: int
    num_burnin: int
    table: list[dict]
    reason: str
    nbeta: float
    grid: CalibrationGrid = field(default_factory=CalibrationGrid)
    traces: dict = field(default_factory=dict, repr=False)
    # Draws per chain the chosen ladder level measured its spread over, and draws summed
    # over chains that reach ``grid.target_relative_sem`` at that spread (0: no target).
    measured_draws: int = 0
    chain_draws_for_target: int = 0
    excess_ratio: float | None = None
    # the estimator the calibration chose, held by every estimate made with it
    gradient_correction: bool = False
    gradient_evidence: dict = field(default_factory=dict)
    seconds: float = 0.0
    steps: int = 0

    def chains_for(self, num_draws: int) -> int:
        """Chains that reach the target standard error with ``num_draws`` draws each, capped
        at ``grid.max_chains`` (0 when there is no target). Draws beyond the level's own
        are not counted on to help: slowly mixing means converge slower than 1/√draws."""
        if not self.chain_draws_for_target:
            return 0
        per_chain = min(num_draws, self.measured_draws)
        return min(self.grid.max_chains, math.ceil(self.chain_draws_for_target / per_chain))

    def at_resolution(self, factor: float) -> "Calibration":
        """This calibration at γ × ``factor`` with ε and the warm-up's ε divided by it:
        the same εγ (the step's share of the confinement) and so the same steps per
        relaxation of the flattest direction, whose rate is γ/2 per unit of Langevin time;
        stiff directions are sampled with a finer step. Used to read a trajectory at a
        coarser resolution γ/nβ with the sampler the calibration chose."""
        if not factor > 0:
            raise ValueError(f"factor must be positive, got {factor!r}")
        sampler = replace(self.sampler, lr=self.sampler.lr / factor,
                          localization=self.sampler.localization * factor)
        return replace(self, sampler=sampler, warmup_lr=self.warmup_lr / factor,
                       reason=f"{self.reason} — then γ × {factor:g} and ε / {factor:g}")

    def apply(self, settings: EstimateSettings) -> EstimateSettings:
        """``settings`` with this sampler, warm-up and (at least this) burn-in, at least
        the chains that reach the target standard error with its number of draws, and the
        gradient correction decided here in place of ``"auto"`` (one estimator for every
        point estimated with it)."""
        correction = (self.gradient_correction if settings.gradient_correction == "auto"
                      else settings.gradient_correction)
        return replace(settings, sampler=self.sampler, calibration_grid=None,
                       gradient_correction=correction,
                       warmup_lr=self.warmup_lr, num_warmup=self.num_warmup,
                       num_burnin=max(settings.num_burnin, self.num_burnin),
                       num_chains=max(settings.num_chains, self.chains_for(settings.num_draws)))

    @classmethod
    def from_dict(cls, record: dict) -> "Calibration":
        """The calibration ``to_dict`` wrote (a resumed run holds the same settings)."""
        sampler = {k: v for k, v in record["sampler"].items() if k != "type"}
        grid = {k: tuple(v) if isinstance(v, list) else v for k, v in record["grid"].items()}
        return cls(sampler=SGLD(**sampler), warmup_lr=record["warmup_lr"],
                   num_warmup=record["num_warmup"], num_burnin=record["num_burnin"],
                   table=record["table"], reason=record["reason"], nbeta=record["nbeta"],
                   grid=CalibrationGrid(**grid), measured_draws=record["measured_draws"],
                   chain_draws_for_target=record["chain_draws_for_target"],
                   excess_ratio=record.get("excess_ratio"),
                   gradient_correction=record.get("gradient_correction", False),
                   gradient_evidence=record.get("gradient_evidence", {}),
                   seconds=record.get("seconds", 0.0), steps=record.get("steps", 0))

    def to_dict(self) -> dict:
        return {"sampler": self.sampler.to_dict(), "warmup_lr": self.warmup_lr,
                "num_warmup": self.num_warmup, "num_burnin": self.num_burnin,
                "measured_draws": self.measured_draws,
                "chain_draws_for_target": self.chain_draws_for_target,
                "excess_ratio": self.excess_ratio,
                "gradient_correction": self.gradient_correction,
                "gradient_evidence": self.gradient_evidence,
                "seconds": self.seconds, "steps": self.steps,
                "reason": self.reason, "nbeta": self.nbeta, "grid": asdict(self.grid),
                "table": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                           for k, v in row.items()} for row in self.table]}


class _Search:
    """The stages; rows go to ``table``; all runs share one step budget."""

    def __init__(self, make_driver, grid: CalibrationGrid, target: Target, max_ratio: float,
                 bar):
        self.make_driver = make_driver
        self.grid = grid
        self.point = target.point
        self.max_ratio = max_ratio
        self.bar = bar
        self.table: list[dict] = []
        self.spent = 0
        self.stable = math.inf  # the stability probe's ε, once known

    def chains(self, lr: float, gamma: float, start=None, seed_offset: int = 0,
               noise_substeps: int | None = None) -> _Chains:
        return _Chains(self.make_driver(lr, gamma, seed_offset, noise_substeps),
                       self.grid.max_steps, start=start)

    def extend(self, chains: _Chains, steps: int) -> bool:
        """Extend within the budget; False when the budget cannot cover it."""
        need = steps - chains.steps
        if need <= 0:
            return True
        if self.spent + need > self.grid.max_steps:
            return False
        chains.extend_to(steps)
        self.spent += need
        self.bar.update(need)
        return True

    def ratio(self, chains: _Chains) -> float | None:
        return excess_ratio(chains.mean_excess(), self.point.init_loss,
                            self.point.reference_loss)[0]

    def row(self, chains: _Chains, stage: str, **extra) -> dict:
        level, sem = (_mean_sem(chains.second_half()) if chains.healthy and chains.steps > 1
                      else (math.nan, math.nan))
        ratio = self.ratio(chains) if chains.healthy and chains.steps > 1 else None
        row = {"lr": chains.sampler.lr, "localization": chains.sampler.localization,
               "stage": stage, "steps": chains.steps, "langevin_time": chains.langevin_time,
               "llc_mean": level, "llc_sem": sem, "excess_ratio": ratio,
               "mala_acceptance": chains.mala_acceptance(),
               "num_diverged": int(chains.driver.diverged.sum()), "chosen": False, **extra}
        self.table.append(row)
        return row

    # -- stage 1 ----------------------------------------------------------------------
    def stable_lr(self) -> Stage:
        """The largest grid ε whose chains survive ``probe_steps`` at the first γ."""
        gamma = self.grid.start_localization
        for lr in sorted(self.grid.lrs, reverse=True):
            if lr * gamma > 1:  # the pull alone would move chains past w*
                continue
            probe = self.chains(lr, gamma)
            if not self.extend(probe, self.grid.probe_steps):
                return Stage(False, "budget", "the stability probe exhausted the step budget")
            self.row(probe, "probe")
            if probe.healthy:
                self.stable = lr
                return Stage(True, row={"lr": lr})
        return Stage(False, "diverged", f"every ε of the grid diverged within "
                                        f"{self.grid.probe_steps} steps")

    # -- stage 2 ----------------------------------------------------------------------
    def relax(self, lr: float, gamma: float, start, stage: str = "locality",
              check_locality: bool = True) -> Stage:
        """Run at (ε, γ) from ``start`` until relaxed: covered ``relax_time``/γ and λ̂ over
        the last doubling within ``tolerance`` of the one before; fail early once the
        chains are not local (relaxing further only spreads them more)."""
        grid = self.grid
        lr = min(lr, 1.0 / gamma)  # a strong pull needs a step that does not overshoot w*
        need = max(grid.min_steps, self.settle_steps(lr, gamma),
                   math.ceil(grid.relax_time / (gamma * lr)))
        if need > grid.max_relax_steps:
            return Stage(False, "budget", f"relaxing at γ = {gamma:g} would take {need:,} "
                                          f"steps at ε = {lr:.3g}, over max_relax_steps "
                                          f"({grid.max_relax_steps:,})")
        chains = self.chains(lr, gamma, start)
        steps = grid.min_steps
        while True:
            if steps > grid.max_relax_steps or not self.extend(chains, steps):
                self.row(chains, stage, relaxed=False)
                return Stage(False, "budget", f"λ̂ at γ = {gamma:g} still drifted after "
                                              f"{chains.steps:,} steps", chains=chains)
            if not chains.healthy:
                self.row(chains, stage, relaxed=False)
                return Stage(False, "diverged", f"chains diverged at γ = {gamma:g}, "
                                                f"ε = {lr:.3g}", chains=chains)
            ratio = self.ratio(chains) if check_locality else None
            if ratio is not None and ratio > self.max_ratio:
                self.row(chains, stage, relaxed=False)
                return Stage(False, "not_local", f"at γ = {gamma:g} the chains gave back "
                                                 f"{ratio:.0%} of the loss gap (limit "
                                                 f"{self.max_ratio:.0%})", chains=chains)
            level = chains.second_half()
            drift, drift_sem = relative_gap(level, chains.window(steps // 4, steps // 2))
            if steps >= need and abs(drift) <= grid.tolerance + 2 * drift_sem:
                self.row(chains, stage, relaxed=True, drift=drift)
                return Stage(True, chains=chains)
            steps *= 2

    def sweep(self, lr: float) -> tuple[Stage, list[str], float]:
        """Walk γ from ``start_localization`` at step ``lr``, starting from w*: weaker
        (continuing from the last relaxed positions) while the chains stay local and
        relax in time; if the first γ fails, stronger (from w* again) until one passes.
        Returns (the weakest passing stage, why the others failed, the Langevin time from
        w* to reach it)."""
        order = sorted(self.grid.localizations, reverse=True)  # strongest first
        index = order.index(self.grid.start_localization)
        step = 1  # towards weaker γ
        notes: list[str] = []
        start, best, time_to_best, elapsed = None, None, 0.0, 0.0
        while 0 <= index < len(order):
            stage = self.relax(lr, order[index], start)
            if stage.ok:
                elapsed += stage.chains.langevin_time
                best, time_to_best = stage, elapsed
                if step < 0:  # a weaker γ already failed
                    break
                start = stage.chains.driver.positions.clone()
                index += step
                continue
            notes.append(stage.detail)
            if best is not None:
                break
            step, index, start, elapsed = -1, index - 1, None, 0.0  # stronger, from w*
        if best is None:
            return Stage(False, "not_local", "; ".join(notes)), notes, 0.0
        return best, notes, time_to_best

    # -- stage 3 ----------------------------------------------------------------------
    def descend(self, relaxed: _Chains, tolerance: float, stage: str,
                first_lr: float | None = None, level_steps: int | None = None,
                stop_unless_shrinking: bool = False) -> Stage:
        """Halve ε from ``first_lr`` (default ``relaxed``'s step), every level starting at
        ``relaxed``'s positions, until λ̂ at 2ε and at ε agree within ``tolerance``.

        Each comparison runs ε for S steps and 2ε for S/2 steps on the same Brownian path
        (coupled noise) and compares them over the same Langevin time, the second half.
        Compared over the same number of steps, the 2ε level covered twice the time, and
        where the start still drifts (slow, flat directions) that drift read as a step bias
        that does not shrink with ε. A level whose chains diverge is dropped (its ε is too
        large) and the descent goes on below it. With ``stop_unless_shrinking`` it fails as
        soon as halving ε stops shrinking the gap (``gap_not_shrinking``)."""
        grid = self.grid
        gamma = relaxed.sampler.localization
        start = relaxed.driver.positions.clone()
        lr = first_lr or relaxed.sampler.lr
        above_is_stable, gaps = False, []
        base = level_steps or grid.level_steps
        while lr >= min(grid.lrs) / 2:
            steps = first_steps = 2 * math.ceil(max(base, self.settle_steps(lr, gamma)) / 2)
            smaller = self.chains(lr, gamma, start, seed_offset=1, noise_substeps=1)
            larger = (self.chains(2 * lr, gamma, start, seed_offset=1, noise_substeps=2)
                      if above_is_stable else None)
            while True:
                if not ((larger is None or self.extend(larger, steps // 2))
                        and self.extend(smaller, steps)):
                    return Stage(False, "budget", f"the step budget ({grid.max_steps:,}) ran "
                                                  f"out on the ladder at ε = {lr:.3g}")
                if larger is not None and not larger.healthy:
                    larger = None  # diverged: this pair cannot be compared
                if not smaller.healthy or larger is None:
                    break
                gap, gap_sem = relative_gap(larger.window(steps // 4, steps // 2),
                                            smaller.window(steps // 2, steps))
                resolved = gap_sem <= tolerance / 2
                if (abs(gap) - 2 * gap_sem > tolerance or resolved
                        or steps >= first_steps * 2 ** grid.max_lengthenings):
                    break
                steps *= 2  # unresolved: lengthen both levels
            above_is_stable = smaller.healthy
            if larger is None:
                self.row(smaller, stage)
                lr /= 2
                continue
            row = self.row(smaller, stage, gap_to_double_lr=gap, gap_sem=gap_sem,
                           resolved=resolved)
            gaps.append((gap, gap_sem))
            if stop_unless_shrinking and gap_not_shrinking(gaps, tolerance):
                return Stage(False, "no_level", (
                    "λ̂ changes by " + ", ".join(f"{g:+.0%}" for g, _ in gaps[-3:]) +
                    f" over the last three halvings of ε (down to {lr:.3g}): the change "
                    "does not shrink with the step, so smaller steps will not settle it "
                    "(seen on models with kinks such as max-pooling); give a sampler by "
                    "hand and compare its estimates at two step sizes"))
            if abs(gap) <= tolerance or (
                    not resolved and abs(gap) - 2 * gap_sem <= tolerance):
                return Stage(True, row=row, chains=smaller)
            lr /= 2
        return Stage(False, "no_level", f"λ̂ still changes by more than "
                                        f"{tolerance:.0%} per halving of ε at the "
                                        f"grid's smallest ε ({min(grid.lrs):.3g})")

    def settle_steps(self, lr: float, gamma: float) -> int:
        """Steps for the stiff directions to settle at step ``lr``: about ε_stable/ε for the
        stiffest loss direction, and never more than 1/(γε), within which the
        localisation alone pulls every direction back."""
        if not math.isfinite(self.stable):
            return 0
        return math.ceil(self.grid.settle * min(self.stable / lr, 1.0 / (gamma * lr)))

    def chain_draws_for_target(self, level: dict, num_chains: int) -> int:
        target = self.grid.target_relative_sem
        if target is None or not level["llc_mean"]:
            return 0
        relative_sem = level["llc_sem"] / abs(level["llc_mean"])
        return math.ceil(num_chains * level["measured_draws"] * (relative_sem / target) ** 2)


def calibrate(model, data, settings: EstimateSettings | None = None, *,
              loss_fn="cross_entropy", grid: CalibrationGrid | None = None,
              output=None, verbose: bool = True, **overrides) -> Calibration:
    """Choose ε, γ, the warm-up, burn-in and chains for SGLD at the model's weights.

    Args:
        model: the model at w*.
        data: as for ``estimate_llc``.
        settings: supplies the batch size, seed, estimator, weight restriction, gradient
            correction, nβ (the sampler's, when it is a sampler) and the locality limit;
            keyword ``**overrides`` replace its fields.
        loss_fn, output: as for ``estimate_llc``.
        grid: what to search (default ``settings.calibration_grid`` or
            ``CalibrationGrid()``).
        verbose: a progress bar with the step budget as its total.

    Returns:
        A ``Calibration``; ``Calibration.apply(settings)`` puts it into settings.

    Raises:
        CalibrationError: no γ keeps the chains local, or no ε is stable, or the budget ran
            out; the message names the stage.

    The model, its gradients and the global RNG are untouched (as for ``estimate_llc``).

    Examples:
        >>> import torch, slt_probe
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(2000, 3); y = x @ torch.ones(3, 1) + torch.randn(2000, 1)
        >>> net = torch.nn.Linear(3, 1, bias=False)
        >>> _ = net.weight.data.copy_(torch.linalg.lstsq(x, y).solution.T)
        >>> grid = slt_probe.CalibrationGrid(max_relax_steps=5000)
        >>> cal = slt_probe.calibrate(net, (x, y), loss_fn="gaussian_nll", grid=grid,
        ...                           batch_size=500, verbose=False)
        >>> cal.sampler.localization in grid.localizations and cal.sampler.lr > 0
        True
        >>> settings = cal.apply(slt_probe.EstimateSettings(batch_size=500, num_draws=500))
        >>> r = slt_probe.estimate_llc(net, (x, y), settings, loss_fn="gaussian_nll",
        ...                            verbose=False)
        >>> 1.2 < r.llc_mean < 1.8   # λ = d/2 = 3/2
        True
    """
    settings = resolve_settings(settings, overrides)
    return calibrate_target(Target.of(model, data, settings, loss_fn=loss_fn, output=output),
                            settings, grid=grid, verbose=verbose)


def calibrate_target(target: Target, settings: EstimateSettings, *,
                     grid: CalibrationGrid | None = None, verbose: bool = True) -> Calibration:
    """``calibrate`` on a prepared target (its model, data, w* and point are reused)."""
    started = time.perf_counter()
    target.check_settings(settings)
    grid = grid or settings.calibration_grid or CalibrationGrid()
    max_ratio = grid.locality_margin * (grid.max_excess_ratio or settings.max_excess_ratio)
    batched, source, point, nbeta = target.model, target.source, target.point, target.nbeta
    # the chosen sampler carries nβ only where the caller set it, so an estimate records
    # where nβ came from (and a default n/log n follows the data it is applied to)
    sampler_nbeta = nbeta if target.nbeta_source == "sampler" else None
    num_chains = grid.num_chains or max(4, settings.num_chains)

    def make_driver(lr: float, gamma: float, seed_offset: int,
                    noise_substeps: int | None = None) -> ChainDriver:
        generator = torch.Generator(device=batched.device).manual_seed(
            settings.seed * 1000 + seed_offset)
        corrected = target.correction_applies(settings.gradient_correction, gamma)
        return ChainDriver(batched, source, sampler=SGLD(lr=lr, localization=gamma, nbeta=nbeta),
                           nbeta=nbeta, point=point, num_chains=num_chains,
                           batch_size=settings.batch_size, estimator=settings.estimator,
                           loss_on="minibatch", generator=generator, corrected=corrected,
                           noise_substeps=noise_substeps)

    bar = tqdm(total=grid.max_steps, desc="calibrating (steps, at most)", unit="step",
               disable=not verbose, leave=False)
    search = _Search(make_driver, grid, target, max_ratio, bar)
    try:
        stable = search.stable_lr()
        if not stable.ok:
            raise CalibrationError(f"calibration failed at the stability probe: {stable.detail}")
        lrs = sorted(grid.lrs, reverse=True)
        hot_lr = lrs[min(lrs.index(stable.row["lr"]) + 1, len(lrs) - 1)]  # a notch below
        hot = search.relax(hot_lr, grid.start_localization, None, stage="hot relaxation",
                           check_locality=False)
        if not hot.ok:
            raise CalibrationError(f"calibration failed relaxing at ε = {hot_lr:.3g}: "
                                   f"{hot.detail}")
        # the sweep runs at the first ε within warmup_gap of 2ε: cheap per unit of Langevin
        # time, not so hot that it moves the flat directions far
        first = search.descend(hot.chains, grid.warmup_gap, "hot ladder")
        if not first.ok:
            raise CalibrationError(f"calibration failed finding a step size: {first.detail}")
        sweep_lr = first.row["lr"]
        local, notes, sweep_time = search.sweep(sweep_lr)
        if not local.ok:
            raise CalibrationError(
                "calibration failed: no localisation γ of the grid keeps the chains near w* ("
                + local.detail + "); w* may not be a trained point, or widen "
                "CalibrationGrid.localizations")
        order = sorted(grid.localizations, reverse=True)
        while True:
            gamma = local.chains.sampler.localization
            ladder = search.descend(local.chains, grid.bias_tolerance, "ladder",
                                    stop_unless_shrinking=True)
            if not ladder.ok:
                raise CalibrationError(f"calibration failed on the step-bias ladder at γ = "
                                       f"{gamma:g}: {ladder.detail}")
            ratio = search.ratio(ladder.chains)
            stronger = order.index(gamma) - 1
            if ratio is None or ratio <= max_ratio or stronger < 0:
                break
            # not local at the final, smaller ε (a hot ε can hide it): one γ stronger,
            # relaxed from w* at the final ε
            notes.append(f"at γ = {gamma:g} the chains gave back {ratio:.0%} of the loss gap "
                         f"at the final ε = {ladder.row['lr']:.3g}")
            local = search.relax(ladder.row["lr"], order[stronger], None)
            if not local.ok:
                raise CalibrationError(f"calibration failed: {notes[-1]}, and at γ = "
                                       f"{order[stronger]:g}: {local.detail}")
            sweep_time = local.chains.langevin_time
        for row in search.table:
            if row["stage"] == "locality" and row["localization"] == gamma and row.get("relaxed"):
                row["chosen"] = True
    finally:
        bar.close()
    chosen = ladder.row
    chosen["chosen"] = True
    lr = chosen["lr"]
    chosen["measured_draws"] = chosen["steps"] - chosen["steps"] // 2
    draws_for_target = search.chain_draws_for_target(chosen, num_chains)
    # the estimate warms up from w* at the step the sweep relaxed with at this γ (the
    # sweep's ε, capped so that the pull γε does not overshoot w*) for the Langevin time
    # the sweep took, then burns in at ε long enough to settle the stiff directions
    warmup_lr = max(local.chains.sampler.lr, lr)
    warmup_steps = math.ceil(sweep_time / warmup_lr)
    burnin = max(chosen["steps"] // 2, search.settle_steps(lr, gamma))
    weaker = [g for g in grid.localizations if g < gamma]
    why_not_weaker = (f"the next weaker γ failed: {notes[-1]}" if notes and weaker
                      else "it is the weakest on the grid")
    reason = (f"γ = {gamma:g}: the weakest localisation of the grid whose chains stayed local "
              f"(excess ratio {ratio:.3g} ≤ {max_ratio:g} at the chosen ε)"
              if ratio is not None and ratio <= max_ratio else
              f"γ = {gamma:g}: the strongest localisation of the grid, and still not local "
              f"(excess ratio {ratio:.3g} > {max_ratio:g})" if ratio is not None else
              f"γ = {gamma:g}: the weakest localisation of the grid that relaxed (locality "
              "cannot be judged against the constant predictor here)")
    agreement = (f"agree within {grid.bias_tolerance:.0%} (gap "
                 f"{chosen['gap_to_double_lr']:+.1%} ± {chosen['gap_sem']:.1%})"
                 if abs(chosen["gap_to_double_lr"]) <= grid.bias_tolerance else
                 f"differ by {chosen['gap_to_double_lr']:+.1%} ± {chosen['gap_sem']:.1%}, not "
                 f"significantly more than {grid.bias_tolerance:.0%} at the longest level")
    reason += (f"; {why_not_weaker}. ε = {lr:.3g}: λ̂ at ε and 2ε {agreement} from relaxed "
               f"positions. The sweep over γ ran at ε_w = {sweep_lr:.3g}, the first ε within "
               f"{grid.warmup_gap:.0%} of 2ε's λ̂ after a hot relaxation at {hot_lr:.3g}; the "
               f"estimate warms up from w* at ε_w for the Langevin time the sweep took to "
               f"relax, ε·t = {sweep_time:.3g} ({warmup_steps:,} steps), and burns in "
               f"{burnin:,} steps at ε")
    return Calibration(
        sampler=SGLD(lr=lr, localization=gamma, nbeta=sampler_nbeta), warmup_lr=warmup_lr,
        num_warmup=warmup_steps, num_burnin=burnin, table=search.table,
        reason=reason, nbeta=nbeta, grid=grid, measured_draws=chosen["measured_draws"],
        chain_draws_for_target=draws_for_target, excess_ratio=ratio,
        gradient_correction=target.correction_applies(settings.gradient_correction, gamma),
        gradient_evidence=target.gradient_summary(gamma),
        seconds=time.perf_counter() - started, steps=search.spent,
        traces={"warmup": np.asarray(local.chains.llc), "warmup_lr": local.chains.sampler.lr})
