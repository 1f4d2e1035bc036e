"""Automatic choice of the SGLD step ε, localisation γ, warm-up and burn-in, with the evidence.

λ̂ from SGLD has two errors that pull in opposite directions as ε shrinks: the step bias
(about linear in ε; it includes the minibatch-gradient noise) and under-relaxation
(chains start at w* and need *Langevin time* ε·t to spread along flat directions, so at a
fixed number of steps a smaller ε reads λ̂ too low). A sweep at equal steps confounds the
two, and MALA acceptance under minibatch gradients mostly measures gradient noise
(``benchmarks/relaxation.py`` shows both on deep linear 5-5-5-5). So they are separated:

1. stability: the largest ε of ``grid.lrs`` whose chains neither diverge nor read λ̂ ≤ 0
   in a short probe.
2. relaxation: chains run from w* at a step ε_w until they have covered Langevin time
   ``grid.min_relax_time``/γ and λ̂ over the last doubling of the run is within
   ``grid.tolerance`` of the doubling before. A larger ε_w covers more time per step,
   but a much too hot one also shifts the slow directions (towards more singular
   regions: measured on rrr 3-2-3), so ε_w is found in two passes: a hot warm-up one
   grid value below the largest stable ε and a ladder (step 3) from it find the first
   ε whose gap to 2ε is within ``grid.warmup_gap``; that is ε_w.
3. step bias: from relaxed positions, chains run at ε_w, ε_w/2, ε_w/4, … for the same
   number of steps with the same noise (common random numbers). The step bias is
   about linear in ε, so the gap between λ̂ at 2ε and at ε estimates the bias left at
   ε; the first ε whose gap is within ``grid.bias_tolerance`` is chosen.

The estimate warms up from w* at 2ε (the ladder level above ε: its bias was measured
small) for the Langevin time the warm-up at ε_w needed, burns in at ε for as long as a
ladder level settled, and draws at ε, with at least as many chains as the chosen level's
spread across chains says reach ``grid.target_relative_sem``. γ is the weakest of
``grid.localizations`` for which all three steps succeed within the step budget.

The warm-up's Langevin time, 0.1/γ, is a tenth of the time scale 1/γ on which the
localisation pulls flat directions back, so those are not fully relaxed, and a relaxed
λ̂ is not the target either: at n = 50,000 it depends strongly on γ. Deep linear
58-58-58-58 reads 0.65 λ at γ = 100 and 0.99 λ at γ = 10 (ε = 1.6e-6, ε·t = 1/γ), and
at γ = 1 is above 1.4 λ and still climbing at ε·t = 0.2 (ε = 3.1e-6); rrr 5-4-5
(r = 0, ε = 7.8e-6) reads 0.91 λ at γ = 10 and at γ = 1 is at 1.10 λ and still climbing
at ε·t = 1 (``results/benchmarks/relaxation_localisation.txt``). Compare estimates at
one γ.
Not here: the estimate itself.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from .batched_model import BatchedModel
from .data import as_tensors
from .driver import ChainDriver
from .estimator import llc_from_losses
from .losses import resolve_loss
from .samplers import SGLD
from .settings import EstimateSettings, default_nbeta, resolve_settings

DEFAULT_LRS = tuple(float(f"{m}e{e}") for e in range(-8, -1) for m in (1, 2, 5))
DEFAULT_LOCALIZATIONS = (1.0, 10.0, 100.0)
# MALA acceptance is read every this many steps of a ladder level (an extra forward each).
_MALA_EVERY = 25


@dataclass(frozen=True)
class CalibrationGrid:
    """What to search and how much sampling the search may spend.

    lrs: candidate ε for the stability probe, which runs ``probe_steps`` steps at each.
    localizations: γ, tried weakest first (weaker localisation biases λ̂ least).
    min_relax_time: least Langevin time of the warm-up at γ = 1, divided by γ for
        stronger localisation (which bounds how far chains spread). Measured on deep
        linear 5-5-5-5: λ̂ climbs for ε·t ≈ 0.05-0.1 at γ = 1 (and more slowly after;
        see the module docstring for why the warm-up stops short of 1/γ).
    tolerance: relative change of λ̂ between the last two doublings of the warm-up that
        still counts as relaxed (plus twice its standard error across chains).
    level_steps: steps of each ladder level: the first half settles, the second half is
        measured. Levels start from relaxed positions, so they need not cover equal
        Langevin time: only the directions stiff enough to carry step bias must settle
        to the new ε, and those settle within about 1/(ε·nβ·curvature) steps.
    warmup_gap: the warm-up runs at the first ε (halving from the hot warm-up's) whose
        gap to 2ε is within this.
    bias_tolerance: largest gap between λ̂ at 2ε and at ε for which ε is accepted.
        A gap is resolved when its standard error is at most half the tolerance; an
        unresolved pair is lengthened (both levels doubled) up to ``max_lengthenings``
        times, and then ε is accepted unless the gap is significantly (2 s.e.) above the
        tolerance (noisy, slowly mixing problems such as a two-parameter monomial would
        otherwise never resolve it).
    max_steps: sampling budget per γ, in steps summed over all runs (one step advances
        all ``num_chains`` chains).
    target_relative_sem: standard error of λ̂, relative to λ̂, that the estimate should
        reach. The chosen ladder level's spread across chains sets how many chains that
        takes; ``apply`` raises ``num_chains`` to that, at most to ``max_chains``. ``None``
        keeps the caller's chains. Chains, not draws, because chains are independent (the
        standard error falls as 1/√chains exactly, while slowly mixing chains' means
        converge more slowly than 1/√draws: measured on monomial w1 w2³) and they advance
        together in one batched computation (16 → 64 chains costs 2.1× per step there).
        Small λ is noisy relative to its size (monomial chains spread by about λ itself
        over 2,000 draws), so there this decides accuracy.
    """

    lrs: tuple[float, ...] = DEFAULT_LRS
    localizations: tuple[float, ...] = DEFAULT_LOCALIZATIONS
    num_chains: int = 8
    probe_steps: int = 200
    min_relax_time: float = 0.1
    min_steps: int = 500
    tolerance: float = 0.05
    level_steps: int = 1000
    bias_tolerance: float = 0.05
    warmup_gap: float = 0.25
    max_lengthenings: int = 3
    max_steps: int = 150_000
    target_relative_sem: float | None = 0.03
    max_chains: int = 256

    def __post_init__(self) -> None:
        if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
            raise ValueError(f"lrs must be positive numbers, got {self.lrs}")
        if not self.localizations or any(g < 0 for g in self.localizations):
            raise ValueError(f"localizations must be >= 0, got {self.localizations}")
        for name in ("tolerance", "bias_tolerance", "warmup_gap"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not (self.min_relax_time >= 0 and math.isfinite(self.min_relax_time)):
            raise ValueError(f"min_relax_time must be >= 0, got {self.min_relax_time}")
        if self.num_chains < 2:
            raise ValueError(f"num_chains must be >= 2 (standard errors need two chains), "
                             f"got {self.num_chains}")
        for name in ("probe_steps", "min_steps", "level_steps"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name} must be >= 8, got {getattr(self, name)}")
        if self.target_relative_sem is not None and not 0 < self.target_relative_sem < 1:
            raise ValueError(f"target_relative_sem must be in (0, 1) or None, got "
                             f"{self.target_relative_sem}")
        if self.max_chains < 1:
            raise ValueError(f"max_chains must be >= 1, got {self.max_chains}")
        if self.max_steps < self.min_steps:
            raise ValueError(f"max_steps ({self.max_steps}) must be >= min_steps "
                             f"({self.min_steps})")


class _Chains:
    """Chains at one (ε, γ), started at ``start`` (default w*) and extended on demand;
    keeps the per-step λ̂ of every chain."""

    def __init__(self, driver: ChainDriver, max_steps: int, start=None):
        self.sampler: SGLD = driver.sampler
        self.nbeta = driver.nbeta
        self.driver = driver
        self._records = driver.run(max_steps, 0, start=start, verbose=False,
                                   mala_samples=max(1, max_steps // _MALA_EVERY))
        self.llc: list[np.ndarray] = []
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
                    self.nbeta, record.loss, record.reference), np.nan))
                if record.acceptance is not None:
                    self.acceptance.append(record.acceptance)

    def window(self, start: int, stop: int) -> np.ndarray:
        """Per-chain mean λ̂ over steps [start, stop)."""
        return np.asarray(self.llc[start:stop]).mean(axis=0)

    def second_half(self) -> np.ndarray:
        return self.window(self.steps // 2, self.steps)

    def mala_acceptance(self) -> float:
        values = np.asarray(self.acceptance)
        return float(np.nanmean(values)) if values.size else float("nan")


def _mean_sem(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


def relative_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean a − mean b)/mean b from paired per-chain means, and its standard error.

    Pairing chains that share positions or noise cancels most of their common noise.
    """
    level = float(b.mean())
    diff = a - b
    return float(diff.mean()) / level, float(diff.std(ddof=1) / math.sqrt(diff.size)) / level


@dataclass
class Calibration:
    """The recommended sampler, its warm-up and burn-in, and the search behind it."""

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

    def chains_for(self, num_draws: int) -> int:
        """Chains that reach the target standard error with ``num_draws`` draws each, capped
        at ``grid.max_chains`` (0 when there is no target). Draws beyond the level's own
        are not counted on to help: slowly mixing means converge slower than 1/√draws."""
        if not self.chain_draws_for_target:
            return 0
        per_chain = min(num_draws, self.measured_draws)
        return min(self.grid.max_chains, math.ceil(self.chain_draws_for_target / per_chain))

    def apply(self, settings: EstimateSettings) -> EstimateSettings:
        """``settings`` with this sampler, warm-up and (at least this) burn-in, and at least
        the chains that reach the target standard error with its number of draws."""
        return replace(settings, sampler=self.sampler, calibration_grid=None,
                       warmup_lr=self.warmup_lr,
                       num_warmup=self.num_warmup,
                       num_burnin=max(settings.num_burnin, self.num_burnin),
                       num_chains=max(settings.num_chains, self.chains_for(settings.num_draws)))

    def to_dict(self) -> dict:
        return {"sampler": self.sampler.to_dict(), "warmup_lr": self.warmup_lr,
                "num_warmup": self.num_warmup, "num_burnin": self.num_burnin,
                "measured_draws": self.measured_draws,
                "chain_draws_for_target": self.chain_draws_for_target,
                "reason": self.reason, "nbeta": self.nbeta, "grid": asdict(self.grid),
                "table": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                           for k, v in row.items()} for row in self.table]}


class _Search:
    """One γ's search: probe, warm up, descend the ladder. Rows go to ``table``; all runs
    share one step budget."""

    def __init__(self, make_driver, grid: CalibrationGrid, gamma: float, table: list, bar):
        self.make_driver = make_driver
        self.grid = grid
        self.gamma = gamma
        self.table = table
        self.bar = bar
        self.spent = 0
        self.warmup: _Chains | None = None

    def chains(self, lr: float, start=None, seed_offset: int = 0) -> _Chains:
        return _Chains(self.make_driver(lr, self.gamma, seed_offset), self.grid.max_steps,
                       start=start)

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

    def row(self, chains: _Chains, stage: str, **extra) -> dict:
        level, sem = (_mean_sem(chains.second_half()) if chains.healthy and chains.steps > 1
                      else (math.nan, math.nan))
        row = {"lr": chains.sampler.lr, "localization": self.gamma, "stage": stage,
               "steps": chains.steps, "langevin_time": chains.langevin_time,
               "llc_mean": level, "llc_sem": sem, "mala_acceptance": chains.mala_acceptance(),
               "num_diverged": int(chains.driver.diverged.sum()), "chosen": False, **extra}
        self.table.append(row)
        return row

    def fail(self, why: str) -> tuple[None, str]:
        return None, f"γ = {self.gamma:g}: {why}"

    def stable_lrs(self) -> list[float]:
        """Grid ε from the largest that passed the probe down (empty if none did)."""
        lrs = sorted(self.grid.lrs, reverse=True)
        for i, lr in enumerate(lrs):
            probe = self.chains(lr)
            if not self.extend(probe, self.grid.probe_steps):
                return []
            row = self.row(probe, "probe")
            if probe.healthy and row["llc_mean"] > 0:
                return lrs[i:]
        return []

    def relax(self, lr: float, stage: str) -> tuple[_Chains | None, str]:
        """Run from w* at ``lr`` until relaxed; (chains, "") or (None, why not)."""
        grid = self.grid
        min_time = grid.min_relax_time / max(self.gamma, 1.0)
        need = max(grid.min_steps, math.ceil(min_time / lr))
        if self.spent + need > grid.max_steps:
            return None, (f"the {stage} at ε = {lr:.3g} would need {need} steps to reach "
                          f"ε·t = {min_time:.3g}, over the step budget ({grid.max_steps}, "
                          f"{self.spent} spent)")
        chains = self.chains(lr)
        steps = grid.min_steps
        while True:
            if not self.extend(chains, steps):
                return None, (f"the {stage} at ε = {lr:.3g} did not relax within the step "
                              f"budget ({grid.max_steps}; reached ε·t = "
                              f"{chains.langevin_time:.3g})")
            if not chains.healthy:
                self.row(chains, stage)
                return None, f"chains diverged during the {stage} at ε = {lr:.3g}"
            level = chains.second_half()
            drift, drift_sem = relative_gap(level, chains.window(steps // 4, steps // 2))
            if (chains.langevin_time >= min_time and level.mean() > 0
                    and abs(drift) <= grid.tolerance + 2 * drift_sem):
                self.row(chains, stage, drift=drift, drift_sem=drift_sem)
                return chains, ""
            steps *= 2

    def descend(self, relaxed: _Chains, tolerance: float, stage: str
                ) -> tuple[dict | None, str]:
        """Halve ε from ``relaxed``'s step, every level starting at its positions with the
        same noise and running the same number of steps, until λ̂ at 2ε and at ε agree
        within ``tolerance``; (row of that ε, "") or (None, why not)."""
        grid = self.grid
        # Snapshot now: drivers are generators and copy their start only on first use.
        start = relaxed.driver.positions.clone()
        lr = relaxed.sampler.lr
        larger = self.chains(lr, start, seed_offset=1)
        level_steps = grid.level_steps
        if not self.extend(larger, level_steps) or not larger.healthy:
            return None, (f"the first {stage} level at ε = {lr:.3g} "
                          + ("diverged" if larger.steps else "did not fit the budget"))
        self.row(larger, stage)
        lr /= 2
        while lr >= min(grid.lrs) / 2:
            smaller = self.chains(lr, start, seed_offset=1)
            while True:
                if not (self.extend(larger, level_steps) and self.extend(smaller, level_steps)):
                    return None, (f"the step budget ({grid.max_steps}) ran out on the "
                                  f"{stage} at ε = {lr:.3g}")
                if not (larger.healthy and smaller.healthy):
                    return None, f"chains diverged on the {stage} at ε = {lr:.3g}"
                gap, gap_sem = relative_gap(larger.second_half(), smaller.second_half())
                resolved = gap_sem <= tolerance / 2
                if (abs(gap) - 2 * gap_sem > tolerance or resolved
                        or level_steps >= grid.level_steps * 2 ** grid.max_lengthenings):
                    break
                level_steps *= 2  # unresolved: lengthen both levels
            row = self.row(smaller, stage, gap_to_double_lr=gap, gap_sem=gap_sem,
                           resolved=resolved)
            # An unresolved gap that is not significantly above the tolerance is accepted:
            # the step bias is then below what the chains can measure.
            if abs(gap) <= tolerance or (not resolved and abs(gap) - 2 * gap_sem <= tolerance):
                return row, ""
            larger, lr = smaller, lr / 2
        return None, (f"on the {stage}, λ̂ still changes by more than {tolerance:.0%} per "
                      f"halving of ε at the grid's smallest ε ({min(grid.lrs):.3g})")

    def chain_draws_for_target(self, level: dict) -> int:
        """Draws summed over chains for the target standard error, from ``level``'s spread
        of per-chain means over its measured half."""
        target = self.grid.target_relative_sem
        if target is None:
            return 0
        relative_sem = level["llc_sem"] / abs(level["llc_mean"])
        return math.ceil(self.grid.num_chains * level["measured_draws"]
                         * (relative_sem / target) ** 2)

    def run(self) -> tuple[dict | None, str]:
        grid = self.grid
        lrs = self.stable_lrs()
        if len(lrs) < 2:
            return self.fail(f"every ε of the grid (but at most the smallest) diverged or "
                             f"read λ̂ ≤ 0 within {grid.probe_steps} steps")
        for lr in lrs[1:]:  # one grid value below the largest stable ε
            hot, why = self.relax(lr, "hot warm-up")
            if hot is not None:
                break
            if "diverged" not in why:
                return self.fail(why)
        else:
            return self.fail("every hot warm-up diverged")
        # A warm-up much hotter than the target also shifts the slow directions (towards
        # more singular regions; measured on rrr 3-2-3), so the warm-up proper runs at the
        # first ε whose step bias is moderate.
        moderate, why = self.descend(hot, grid.warmup_gap, "hot ladder")
        if moderate is None:
            return self.fail(why)
        self.warmup, why = self.relax(moderate["lr"], "warm-up")
        if self.warmup is None:
            return self.fail(why)
        chosen, why = self.descend(self.warmup, grid.bias_tolerance, "ladder")
        if chosen is None:
            return self.fail(why)
        chosen["chosen"] = True
        chosen["burnin_steps"] = chosen["steps"] // 2
        # The estimate warms up at 2ε, the ladder level just above: its step bias was
        # measured small, so it barely shifts the slow directions, and it covers the
        # warm-up's Langevin time in half the steps of ε itself.
        chosen["warmup_lr"] = 2 * chosen["lr"]
        chosen["warmup_steps"] = math.ceil(self.warmup.langevin_time / chosen["warmup_lr"])
        chosen["measured_draws"] = chosen["steps"] - chosen["steps"] // 2
        chosen["chain_draws_for_target"] = self.chain_draws_for_target(chosen)
        resolved = chosen["resolved"]
        return chosen, (
            f"λ̂ at ε = {chosen['lr']:.3g} and at 2ε agree within {grid.bias_tolerance:.0%} "
            f"(gap {chosen['gap_to_double_lr']:+.1%} ± {chosen['gap_sem']:.1%}"
            f"{'' if resolved else '; not resolved at the longest level, and not '}"
            f"{'' if resolved else 'significantly above the tolerance'}), both run from "
            f"positions relaxed by a warm-up at ε = {self.warmup.sampler.lr:.3g} to ε·t = "
            f"{self.warmup.langevin_time:.3g} (the first ε whose gap to 2ε was within "
            f"{grid.warmup_gap:.0%} after a hot warm-up at ε = {hot.sampler.lr:.3g}); the "
            "step bias is about linear in ε, so the gap estimates the bias left at ε. The "
            f"estimate warms up at 2ε for the same Langevin time. "
            f"γ = {self.gamma:g}, the weakest localisation for which all this fit the budget"
            + ("" if grid.target_relative_sem is None else
               f". The spread of its chains' means over {chosen['measured_draws']:,} draws "
               f"puts a {grid.target_relative_sem:.0%} standard error at "
               f"{math.ceil(chosen['chain_draws_for_target'] / chosen['measured_draws'])} "
               "chains"))


def calibrate(model, data, settings: EstimateSettings | None = None, *,
              loss_fn="cross_entropy", grid: CalibrationGrid | None = None,
              verbose: bool = True, batched: BatchedModel | None = None,
              **overrides) -> Calibration:
    """Choose ε, γ, the warm-up and the burn-in for SGLD at the model's weights (see the
    module docstring). ``Calibration.apply(settings)`` puts the choice into
    ``EstimateSettings``; ``estimate_llc(sampler="auto")`` and ``LLCProbe`` do so.

    ``settings`` supplies the batch size, seed, estimator and weight restriction
    (default ``EstimateSettings()``); ``grid`` defaults to ``settings.calibration_grid``.
    The model, its gradients and the global RNG are untouched (as for ``estimate_llc``).
    """
    settings = resolve_settings(settings, overrides)
    grid = grid or settings.calibration_grid or CalibrationGrid()
    x, y = as_tensors(data)
    stacked = batched or BatchedModel(model, resolve_loss(loss_fn))
    x, y = x.to(stacked.device), y.to(stacked.device)
    w_star = stacked.load_point(model.state_dict())
    star_losses = stacked.per_example_losses(w_star, x, y)
    mask = stacked.layout.mask(settings.restrict_to)
    nbeta = (settings.sampler.nbeta if not settings.auto and settings.sampler.nbeta is not None
             else default_nbeta(len(x)))
    batch_size, seed, estimator = settings.batch_size, settings.seed, settings.estimator

    def make_driver(lr: float, gamma: float, seed_offset: int) -> ChainDriver:
        generator = torch.Generator(device=stacked.device).manual_seed(seed * 1000 + seed_offset)
        return ChainDriver(stacked, x, y, sampler=SGLD(lr=lr, localization=gamma, nbeta=nbeta),
                           nbeta=nbeta, w_star=w_star, star_losses=star_losses, mask=mask,
                           num_chains=grid.num_chains, batch_size=batch_size,
                           estimator=estimator, loss_on="minibatch", generator=generator)

    table: list[dict] = []
    reasons = []
    best = search = None
    bar = tqdm(total=None, desc="calibrating", unit="step", disable=not verbose, leave=False)
    for gamma in sorted(grid.localizations):
        search = _Search(make_driver, grid, gamma, table, bar)
        best, reason = search.run()
        reasons.append(reason)
        if best is not None:
            break
    bar.close()
    if best is None:
        raise RuntimeError("calibration failed: " + "; ".join(reasons) + ". Check that the "
                           "model is at a trained minimum, or widen the grid")
    warmup = search.warmup
    return Calibration(sampler=SGLD(lr=best["lr"], localization=best["localization"],
                                    nbeta=nbeta),
                       warmup_lr=best["warmup_lr"], num_warmup=best["warmup_steps"],
                       num_burnin=best["burnin_steps"], table=table, reason="; ".join(reasons),
                       nbeta=nbeta, grid=grid,
                       measured_draws=best["measured_draws"],
                       chain_draws_for_target=best["chain_draws_for_target"],
                       traces={"warmup": np.asarray(warmup.llc), "warmup_lr": warmup.sampler.lr})
