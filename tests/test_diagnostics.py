import warnings

import numpy as np
import pytest
import torch

import slt_probe
from slt_probe.core.diagnostics import (
    diagnose,
    ess_bulk,
    ess_tail,
    excess_ratio,
    rank_rhat,
)
from slt_probe.core.estimator import DrawRecord, LLCAccumulator


def _ar1(phi, chains, draws, seed):
    rng = np.random.default_rng(seed)
    out = np.empty((chains, draws))
    out[:, 0] = rng.standard_normal(chains) / np.sqrt(1 - phi ** 2)
    for t in range(1, draws):
        out[:, t] = phi * out[:, t - 1] + rng.standard_normal(chains)
    return out


def _fixed_arrays():
    rng = np.random.default_rng(42)
    mixed = _ar1(0.7, 4, 500, 3)
    return {
        "ar1": mixed,
        "shifted": mixed + np.arange(4)[:, None] * 0.8,
        "heavy_tailed": rng.standard_t(3, size=(6, 301)),
        "trend": mixed + np.linspace(0, 3, 500)[None, :],
        "scales": rng.normal(size=(4, 400)) * np.array([1, 1, 1, 4])[:, None],
    }


@pytest.mark.parametrize("name", list(_fixed_arrays()))
def test_rhat_and_ess_agree_with_arviz(name):
    arviz = pytest.importorskip("arviz")
    trace = _fixed_arrays()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rank_rhat(trace) == pytest.approx(float(arviz.rhat(trace, method="rank")),
                                                 rel=1e-9)
        assert ess_bulk(trace) == pytest.approx(float(arviz.ess(trace, method="bulk")), rel=1e-9)
        assert ess_tail(trace) == pytest.approx(float(arviz.ess(trace, method="tail")), rel=1e-9)


def test_rhat_is_one_for_mixed_chains_and_large_for_stuck_or_rescaled_ones():
    mixed = _ar1(0.5, 4, 2000, 0)
    assert abs(rank_rhat(mixed) - 1.0) < 0.01
    assert rank_rhat(mixed + np.arange(4)[:, None] * 3.0) > 1.5  # different locations (bulk)
    rescaled = mixed * np.array([1, 1, 1, 6])[:, None]
    assert rank_rhat(rescaled) > 1.1  # same location, different scale: only the tail sees it


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_bulk_ess_matches_ar1_theory(phi):
    trace = _ar1(phi, 4, 5000, 1)
    expected = trace.size * (1 - phi) / (1 + phi)
    assert ess_bulk(trace) == pytest.approx(expected, rel=0.15)


def test_diagnostics_need_enough_draws_and_finite_values():
    assert np.isnan(rank_rhat(np.zeros((1, 100))))  # one chain
    assert np.isnan(rank_rhat(np.ones((4, 3))))  # too few draws
    bad = _ar1(0.5, 4, 100, 0)
    bad[0, 5] = np.nan
    assert np.isnan(ess_bulk(bad))


def test_excess_ratio_and_when_it_cannot_be_judged():
    assert excess_ratio(0.5, 1.0, 3.0) == (0.25, None)
    ratio, why = excess_ratio(0.5, 3.0, 2.0)
    assert ratio is None and "worse" in why
    ratio, why = excess_ratio(1e-3, 2.4999, 2.5)  # w* no better than the constant predictor
    assert ratio is None and "nearly one itself" in why
    assert excess_ratio(0.1, 1.0, None)[0] is None


def _trace(level, chains=4, draws=400, seed=0, trend=0.0):
    rng = np.random.default_rng(seed)
    base = level + trend * np.linspace(-0.5, 0.5, draws)[None, :]
    return base + rng.normal(scale=0.5, size=(chains, draws))


def _diagnose(llc, excess, **kwargs):
    chains = llc.shape[0]
    options = dict(init_loss=1.0, reference_loss=3.0, max_excess_ratio=0.25, corrected=False)
    options.update(kwargs)
    return diagnose(llc, excess, np.zeros(chains, bool), [None] * chains, None, **options)


def test_a_local_settled_estimate_is_healthy():
    d = _diagnose(_trace(10.0), np.full((4, 400), 0.1))
    assert d["healthy"] and d["reasons"] == [] and d["local"] is True
    assert d["excess_ratio"] == pytest.approx(0.05)
    assert d["mean_sampled_loss"] == pytest.approx(1.1)


def test_chains_that_left_w_star_are_not_local_and_the_warning_names_the_remedy():
    d = _diagnose(_trace(10.0), np.full((4, 400), 1.5))  # gave back 75 % of the gap
    assert d["local"] is False and d["reasons"] == ["not_local"]
    assert "left the neighbourhood of w*" in d["warnings"][0]
    assert "increase localization" in d["warnings"][0]
    looser = _diagnose(_trace(10.0), np.full((4, 400), 1.5), max_excess_ratio=0.8)
    assert looser["healthy"]


def test_each_issue_names_one_cause_and_one_remedy():
    drifting = _diagnose(_trace(10.0, trend=6.0), np.full((4, 400), 0.1))
    assert drifting["reasons"] == ["not_settled"]
    assert "num_burnin" in drifting["warnings"][0] and "lr" not in drifting["warnings"][0]
    negative = _diagnose(_trace(-5.0), np.full((4, 400), -0.1))
    assert negative["reasons"] == ["not_a_minimum"]
    assert "gradient_correction" in negative["warnings"][0]
    saddle = _diagnose(_trace(-5.0), np.full((4, 400), -0.1), corrected=True)
    assert saddle["reasons"] == ["saddle"] and "localization" in saddle["warnings"][0]
    disagree = _trace(10.0) + np.array([0, 0, 0, 3.0])[:, None]
    d = _diagnose(disagree, np.full((4, 400), 0.1))
    assert d["reasons"] == ["chains_disagree"] and "num_draws" in d["warnings"][0]


def test_accumulator_excludes_diverged_chains():
    acc = LLCAccumulator(num_chains=3, num_draws=2, nbeta=2.0, init_loss=1.0)
    alive = np.array([True, True, False])
    acc.update(DrawRecord(0, np.array([2.0, 3.0, np.nan]), np.array([1.0, 1.0, 1.0]), alive))
    acc.update(DrawRecord(1, np.array([2.0, 3.0, np.nan]), np.array([1.0, 1.0, 1.0]), alive))
    with pytest.warns(RuntimeWarning, match="chains \\[2\\] diverged"):
        result = acc.compute(diverged=~alive, diverged_at=[None, None, 0])
    assert result.llc_mean == pytest.approx(3.0)  # mean of 2 and 4; chain 2 excluded
    assert np.isnan(result.llc_per_chain[2])
    assert result.diagnostics["num_diverged"] == 1
    assert result.diagnostics["reasons"][0] == "diverged"


def test_accumulator_subtracts_the_linear_term_but_judges_locality_on_the_raw_loss():
    acc = LLCAccumulator(num_chains=2, num_draws=2, nbeta=2.0, init_loss=1.0,
                         reference_loss=2.0, corrected=True)
    alive = np.array([True, True])
    for step in range(2):
        acc.update(DrawRecord(step, np.array([1.5, 1.5]), np.array([1.0, 1.0]), alive,
                              correction=np.array([0.25, 0.25])))
    result = acc.compute(diverged=~alive, diverged_at=[None, None])
    assert result.llc_mean == pytest.approx(2.0 * (0.5 - 0.25))
    assert result.diagnostics["excess_ratio"] == pytest.approx(0.5)


def test_all_chains_diverged_raises_and_suggests_smaller_lr():
    acc = LLCAccumulator(num_chains=2, num_draws=1, nbeta=2.0, init_loss=1.0)
    with pytest.raises(RuntimeError, match="smaller lr"):
        acc.compute(diverged=np.array([True, True]), diverged_at=[0, 0])


def test_an_estimate_whose_chains_all_diverge_names_its_step_size():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = torch.randint(0, 2, (64,))
    with pytest.raises(RuntimeError, match=r"smaller lr \(it was 1e\+06\)"):
        slt_probe.estimate_llc(torch.nn.Linear(3, 2), (x, y), num_draws=20, num_chains=2,
                               sampler=slt_probe.SGLD(lr=1e6, localization=1.0),
                               gradient_correction=False, verbose=False)
