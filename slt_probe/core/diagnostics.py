"""Chain health: rank-normalised R-hat and ESS, locality, settling, and the verdict.

R-hat and ESS follow Vehtari et al. (2021): split chains, rank-normalise (Blom's
offset 3/8), R-hat as the larger of the bulk and the folded (tail) value, bulk ESS on the
rank-normalised draws and tail ESS as the smaller ESS of the 5 % and 95 % quantile
indicators, with Geyer's initial monotone sequence. They agree with ArviZ on fixed
arrays (tested).

The verdict lists *issues*, each naming one cause and one remedy; an estimate is healthy
when it has none. Not here: the λ̂ arithmetic (``estimator``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import fft, stats

RHAT_LIMIT = 1.1
# λ̂ of the second half of the draws differing from the first by more than this (and by
# more than two standard errors) means the chains are still moving.
DRIFT_LIMIT = 0.1
# Where w* improves on the constant predictor by less than this fraction of its loss,
# w* is itself (nearly) a constant predictor and the excess ratio cannot tell whether
# the chains stayed near it (its denominator is noise).
MIN_RELATIVE_GAP = 0.01


def _split(trace: np.ndarray) -> np.ndarray:
    half = trace.shape[1] // 2
    return np.concatenate([trace[:, :half], trace[:, -half:]], axis=0)


def _z_scale(values: np.ndarray) -> np.ndarray:
    ranks = stats.rankdata(values, method="average").reshape(values.shape)
    return stats.norm.ppf((ranks - 3 / 8) / (values.size - 2 * 3 / 8 + 1))


def _basic_rhat(chains: np.ndarray) -> float:
    n = chains.shape[1]
    within = chains.var(axis=1, ddof=1).mean()
    between = n * chains.mean(axis=1).var(ddof=1)
    if within == 0:
        return float("nan")
    return float(np.sqrt((between / within + n - 1) / n))


def _valid(trace, min_chains: int) -> np.ndarray | None:
    trace = np.asarray(trace, dtype=float)
    if trace.ndim != 2 or trace.shape[0] < min_chains or trace.shape[1] < 4:
        return None
    if not np.isfinite(trace).all():
        return None
    return trace


def rank_rhat(trace) -> float:
    """Rank-normalised split R-hat (max of bulk and tail) of a (chains, draws) array; NaN
    if it cannot be computed (fewer than 2 chains or 4 draws, non-finite values).

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> round(rank_rhat(rng.normal(size=(4, 1000))), 2)
        1.0
    """
    trace = _valid(trace, 2)
    if trace is None:
        return float("nan")
    split = _split(trace)
    bulk = _basic_rhat(_z_scale(split))
    tail = _basic_rhat(_z_scale(np.abs(split - np.median(split))))
    return float(max(bulk, tail))


def _autocovariance(trace: np.ndarray) -> np.ndarray:
    n = trace.shape[1]
    size = fft.next_fast_len(2 * n)
    centred = trace - trace.mean(axis=1, keepdims=True)
    spectrum = np.fft.rfft(centred, n=size, axis=1)
    return np.fft.irfft(spectrum * np.conjugate(spectrum), n=size, axis=1)[:, :n] / n


def _ess(trace: np.ndarray) -> float:
    if trace.max() - trace.min() < np.finfo(float).resolution:
        return float(trace.size)
    num_chains, n = trace.shape
    acov = _autocovariance(trace)
    mean_var = acov[:, 0].mean() * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n
    if num_chains > 1:
        var_plus += trace.mean(axis=1).var(ddof=1)
    rho = np.zeros(n)
    rho[0] = even = 1.0
    rho[1] = odd = 1.0 - (mean_var - acov[:, 1].mean()) / var_plus
    t = 1
    # Geyer's initial positive sequence, then its monotone version.
    while t < n - 3 and even + odd > 0.0:
        even = 1.0 - (mean_var - acov[:, t + 1].mean()) / var_plus
        odd = 1.0 - (mean_var - acov[:, t + 2].mean()) / var_plus
        if even + odd >= 0:
            rho[t + 1], rho[t + 2] = even, odd
        t += 2
    max_t = t - 2
    if even > 0:
        rho[max_t + 1] = even
    t = 1
    while t <= max_t - 2:
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2.0
        t += 2
    total = num_chains * n
    tau = -1.0 + 2.0 * rho[:max_t + 1].sum() + rho[max_t + 1:max_t + 2].sum()
    tau = max(tau, 1 / np.log10(total))
    return float("nan") if np.isnan(rho).any() else float(total / tau)


def ess_bulk(trace) -> float:
    """Bulk effective sample size (rank-normalised split chains) of (chains, draws)."""
    trace = _valid(trace, 1)
    return float("nan") if trace is None else _ess(_z_scale(_split(trace)))


def ess_tail(trace) -> float:
    """Tail effective sample size: the smaller ESS of the 5 % and 95 % quantile indicators."""
    trace = _valid(trace, 1)
    if trace is None:
        return float("nan")
    low, high = stats.mstats.mquantiles(trace, [0.05, 0.95], alphap=1, betap=1)
    return min(_ess(_split((trace <= low).astype(float))),
               _ess(_split((trace <= high).astype(float))))


@dataclass(frozen=True)
class Issue:
    """One reason an estimate is not healthy: a short code and a sentence with the cause
    and the remedy."""

    code: str
    message: str


def excess_ratio(mean_excess: float, init_loss: float, reference_loss: float | None
                 ) -> tuple[float | None, str | None]:
    """(r, None) with r = mean excess loss of the chains / (L_ref − L_n(w*)), or
    (None, why) where the ratio cannot say whether the chains stayed near w*.

    Examples:
        >>> excess_ratio(0.5, 1.0, 3.0)
        (0.25, None)
    """
    if reference_loss is None or not math.isfinite(reference_loss):
        return None, "no constant-predictor loss is known for this loss and target"
    gap = reference_loss - init_loss
    if gap <= 0:
        return None, (f"w* fits worse ({init_loss:.4g}) than the constant predictor "
                      f"({reference_loss:.4g})")
    if gap < MIN_RELATIVE_GAP * abs(reference_loss):
        return None, (f"w* improves on the constant predictor by only {gap:.3g} "
                      f"({gap / abs(reference_loss):.2%} of its loss), so it is nearly one "
                      "itself")
    return mean_excess / gap, None


def _drift(llc_trace: np.ndarray) -> tuple[float, float, float, float]:
    """(mean λ̂ of the first half, of the second half, relative change, its s.e.) pooled
    over chains; the s.e. comes from the chains' spread of their own changes."""
    half = llc_trace.shape[1] // 2
    first = llc_trace[:, :half].mean(axis=1)
    second = llc_trace[:, half:].mean(axis=1)
    scale = max(abs(float(llc_trace.mean())), 1e-12)
    change = second - first
    sem = float(change.std(ddof=1) / math.sqrt(len(change))) if len(change) > 1 else math.inf
    return float(first.mean()), float(second.mean()), float(change.mean()) / scale, sem / scale


def diagnose(llc_trace: np.ndarray, excess: np.ndarray, diverged: np.ndarray,
             diverged_at: list, acceptance: np.ndarray | None, *, init_loss: float, reference_loss: float | None, max_excess_ratio: float,
             corrected: bool, gradient_pull: float | None = None,
             gradient_ratio: float | None = None) -> dict:
    """Everything ``LLCResult.diagnostics`` holds, with a ``healthy`` verdict.

    Args:
        llc_trace: (chains, draws) per-draw λ̂ terms (NaN for diverged chains).
        excess: (chains, draws) L(w_t) − L(w*) on the same data, without any correction.
        diverged, diverged_at: per chain.
        acceptance: (samples, chains) MALA acceptance or None.
        init_loss: L_n(w*).
        reference_loss: the best constant predictor's loss L_ref (None if unknown).
        max_excess_ratio: the locality limit.
        corrected: whether the gradient correction was applied.
        gradient_pull, gradient_ratio: where ∇L_n(w*) is real and was not corrected, the
            nats by which it pulls the plain estimate and its noise ratio T (else None).
    """
    alive = ~np.asarray(diverged, dtype=bool)
    live = llc_trace[alive]
    live_excess = excess[alive]
    with np.errstate(invalid="ignore"):
        below = np.nanmean(excess < 0, axis=1)
    chains = []
    for c in range(llc_trace.shape[0]):
        accept = (float(np.nanmean(acceptance[:, c])) if acceptance is not None
                  and len(acceptance) and np.isfinite(acceptance[:, c]).any() else float("nan"))
        chains.append({"chain": c, "diverged": bool(diverged[c]),
                       "diverged_at_step": diverged_at[c], "frac_below_init": float(below[c]),
                       "llc": float(np.mean(llc_trace[c])) if alive[c] else float("nan"),
                       "mala_acceptance": accept})
    accept_all = (float(np.nanmean(acceptance)) if acceptance is not None and len(acceptance)
                  and np.isfinite(acceptance).any() else float("nan"))
    mean_excess = float(live_excess.mean()) if live_excess.size else float("nan")
    ratio, ratio_note = excess_ratio(mean_excess, init_loss, reference_loss)
    llc = float(live.mean(axis=1).mean()) if live.size else float("nan")
    per_chain = live.mean(axis=1) if live.size else np.array([])
    sem = (float(per_chain.std(ddof=1) / math.sqrt(len(per_chain))) if len(per_chain) > 1
           else float("nan"))
    first, second, drift, drift_sem = (_drift(live) if live.shape[0] and live.shape[1] >= 4
                                       else (math.nan,) * 4)
    rhat = rank_rhat(live)
    issues: list[Issue] = []
    num_diverged = int((~alive).sum())
    if num_diverged:
        issues.append(Issue("diverged", (
            f"{num_diverged} of {len(alive)} chains diverged (NaN/inf or exploding loss, "
            f"first at step {min(s for s in diverged_at if s is not None)}) and were "
            "excluded: the step size is too large here; lower lr (or use sampler='auto')")))
    local = None if ratio is None else ratio <= max_excess_ratio
    if local is False:
        issues.append(Issue("not_local", (
            f"the chains left the neighbourhood of w*: their mean loss "
            f"{init_loss + mean_excess:.4g} gave back {ratio:.0%} of the gap between "
            f"L_n(w*) = {init_loss:.4g} and the constant predictor's {reference_loss:.4g} "
            f"(limit {max_excess_ratio:.0%}), so λ̂ reflects the landscape far from w*, not "
            "its effective parameter count; increase localization γ (or nβ)")))
    if math.isfinite(sem) and llc < -2 * sem:
        if corrected:
            issues.append(Issue("saddle", (
                f"λ̂ = {llc:.3g} < 0 even with the gradient correction: the chains run "
                "down negative curvature near w* (a saddle the localisation does not hold); "
                "increase localization γ")))
        else:
            issues.append(Issue("not_a_minimum", (
                f"λ̂ = {llc:.3g} < 0: the chains find lower loss near w*, so w* is not a "
                "local minimum; pass gradient_correction=True (or 'auto') for points that "
                "are not minima")))
    if gradient_pull is not None:
        issues.append(Issue("not_a_critical_point", (
            f"∇L_n(w*) is real (T = {gradient_ratio:.3g} above its noise threshold) and pulls "
            f"the plain estimate by about {gradient_pull:.3g} nats at this nβ and γ: w* is not "
            "a critical point, so λ̂ here is not the learning coefficient of a minimum; pass "
            "gradient_correction=True to remove the linear term, or estimate at a settled "
            "point")))
    settled_issue = (math.isfinite(drift) and abs(drift) > DRIFT_LIMIT
                     and abs(drift) > 2 * drift_sem)
    if settled_issue:
        issues.append(Issue("not_settled", (
            f"λ̂ still changes between the first and second half of the draws "
            f"({first:.4g} → {second:.4g}, {drift:+.0%} ± {drift_sem:.0%}): the chains have "
            "not settled; increase num_burnin (or let sampler='auto' set a warm-up)")))
    elif math.isfinite(rhat) and rhat > RHAT_LIMIT:
        issues.append(Issue("chains_disagree", (
            f"the chains disagree (rank-normalised R-hat {rhat:.2f} > {RHAT_LIMIT}): each "
            "chain's mean still depends on where it went; increase num_draws")))
    return {
        "chains": chains,
        "num_diverged": num_diverged,
        "rhat": rhat,
        "ess": ess_bulk(live),
        "ess_tail": ess_tail(live),
        "drift": drift,
        "drift_sem": drift_sem,
        "frac_below_init": float(np.nanmean(live_excess < 0)) if live_excess.size else math.nan,
        "mala_acceptance": accept_all,
        "mean_sampled_loss": init_loss + mean_excess,
        "constant_predictor_loss": reference_loss,
        "excess_ratio": ratio,
        "local": local,
        "locality_note": ratio_note,
        "healthy": not issues,
        "reasons": [i.code for i in issues],
        "warnings": [i.message for i in issues],
    }
