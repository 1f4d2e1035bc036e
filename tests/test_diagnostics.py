import numpy as np
import pytest

from slt_probe.diagnostics import effective_sample_size, split_rhat
from slt_probe.estimator import DrawRecord, LLCAccumulator, llc_from_losses


def _ar1(phi, chains, draws, seed):
    rng = np.random.default_rng(seed)
    out = np.empty((chains, draws))
    out[:, 0] = rng.standard_normal(chains) / np.sqrt(1 - phi ** 2)
    for t in range(1, draws):
        out[:, t] = phi * out[:, t - 1] + rng.standard_normal(chains)
    return out


def test_llc_formula():
    np.testing.assert_allclose(llc_from_losses(10.0, [1.5, 2.0], 1.0), [5.0, 10.0])


def test_rhat_near_one_for_mixed_chains_and_large_for_stuck_ones():
    mixed = _ar1(0.5, 4, 2000, 0)
    assert abs(split_rhat(mixed) - 1.0) < 0.01
    stuck = mixed + np.arange(4)[:, None] * 3.0
    assert split_rhat(stuck) > 1.5


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_ess_matches_ar1_theory(phi):
    trace = _ar1(phi, 4, 5000, 1)
    expected = trace.size * (1 - phi) / (1 + phi)
    assert effective_sample_size(trace) == pytest.approx(expected, rel=0.15)


def test_accumulator_excludes_diverged_chains():
    acc = LLCAccumulator(num_chains=3, num_draws=2, nbeta=2.0, init_loss=1.0)
    alive = np.array([True, True, False])
    acc.update(DrawRecord(0, np.array([2.0, 3.0, np.nan]), np.array([1.0, 1.0, 1.0]), alive))
    acc.update(DrawRecord(1, np.array([2.0, 3.0, np.nan]), np.array([1.0, 1.0, 1.0]), alive))
    with pytest.warns(RuntimeWarning, match="chains \\[2\\] diverged"):
        result = acc.compute(diverged=~alive, diverged_at=[None, None, 0], config={})
    assert result.llc_mean == pytest.approx(3.0)  # mean of 2 and 4; chain 2 excluded
    assert np.isnan(result.llc_per_chain[2])
    assert result.diagnostics["num_diverged"] == 1
    assert result.diagnostics["healthy"] is False


def test_all_chains_diverged_raises_and_suggests_smaller_lr():
    acc = LLCAccumulator(num_chains=2, num_draws=1, nbeta=2.0, init_loss=1.0)
    with pytest.raises(RuntimeError, match="smaller lr"):
        acc.compute(diverged=np.array([True, True]), diverged_at=[0, 0],
                    config={"sampler": {"lr": 1.0}})
