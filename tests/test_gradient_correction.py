"""The first-order-corrected estimator at points that are not minima, and the rule that
switches it on."""
import pytest
import torch

from slt_probe import SGLD, estimate_llc
from slt_probe.ground_truth import problems
from slt_probe.settings import CORRECTION_THRESHOLD, correction_applies, default_nbeta


def _displaced(shift, seed=0):
    """Regular linear regression (d = 10) moved off its least-squares minimum."""
    p = problems.regular(d_in=10, d_out=1, n=5_000, seed=seed).settle()
    minimum = p.model.weight.detach().clone()
    with torch.no_grad():
        p.model.weight.add_(shift)
    return p, minimum


COMMON = dict(loss_fn="gaussian_nll", num_chains=8, num_draws=1500, num_burnin=1500,
              batch_size=500, verbose=False)


def test_corrected_estimator_reads_the_regular_value_away_from_the_minimum():
    # L is quadratic, so L(w) − g·(w − w*) is the loss around the minimum shifted to w*:
    # the corrected posterior is the minimum's, whose exact E[λ̂] is ½ Σ nβh/(nβh + γ).
    p, minimum = _displaced(0.3)
    nbeta = default_nbeta(len(p.x))
    gamma = 1.0
    expected = p.expected_llc(nbeta=nbeta, localization=gamma)
    assert expected == pytest.approx(5.0, rel=0.01)  # d/2 at nβh ≫ γ
    sampler = SGLD(lr=2e-5, localization=gamma)
    corrected = estimate_llc(p.model, (p.x, p.y), sampler=sampler, gradient_correction=True,
                             **COMMON)
    plain = estimate_llc(p.model, (p.x, p.y), sampler=sampler, gradient_correction=False,
                         **COMMON)
    assert corrected.config["gradient_correction"] is True
    assert corrected.llc_mean == pytest.approx(expected, abs=3 * corrected.llc_sem)
    assert plain.llc_mean < -100  # slides down to the minimum: −nβ(L(w*) − L_min) and worse
    assert "not_a_minimum" in plain.diagnostics["reasons"]
    assert corrected.diagnostics["healthy"], corrected.diagnostics["warnings"]


@pytest.mark.parametrize("shift", [1e-5, 0.3])
def test_auto_switches_on_exactly_when_the_bias_bound_exceeds_the_threshold(shift):
    p, _ = _displaced(shift, seed=1)
    gamma = 10.0
    r = estimate_llc(p.model, (p.x, p.y), sampler=SGLD(lr=1e-5, localization=gamma),
                     loss_fn="gaussian_nll", num_chains=2, num_draws=20, batch_size=500,
                     verbose=False)
    bound = r.config["linear_bias_bound"]
    nbeta = r.config["nbeta"]
    assert bound == pytest.approx(nbeta ** 2 * r.config["gradient_norm"] ** 2 / gamma)
    assert r.config["gradient_correction"] is (bound > CORRECTION_THRESHOLD)
    assert r.config["gradient_correction_setting"] == "auto"
    # the two shifts fall on either side of the threshold
    assert (bound > CORRECTION_THRESHOLD) is (shift > 0.01)


def test_correction_rule_and_its_inputs():
    assert correction_applies(True, 0.0, 100.0, 1.0)
    assert not correction_applies(False, 1e6, 100.0, 1.0)
    assert correction_applies("auto", 2e-5, 100.0, 1.0)  # 0.2 nat
    assert correction_applies("auto", 1e-3, 100.0, 1.0)  # 10 nats
    assert not correction_applies("auto", 1e-6, 100.0, 1.0)  # 0.01 nat
    assert correction_applies("auto", 1e-9, 100.0, 0.0)  # no localisation: any gradient


def test_gradient_correction_setting_is_checked():
    p, _ = _displaced(0.0)
    with pytest.raises(ValueError, match="gradient_correction"):
        estimate_llc(p.model, (p.x, p.y), gradient_correction="yes", verbose=False)
    with pytest.raises(ValueError, match="native backend"):
        estimate_llc(p.model, (p.x, p.y), gradient_correction=True, backend="devinterp",
                     verbose=False)


def test_devinterp_backend_samples_the_plain_loss_and_says_so():
    p, _ = _displaced(0.3)
    r = estimate_llc(p.model, (p.x, p.y), loss_fn="gaussian_nll", backend="devinterp",
                     sampler=SGLD(lr=1e-5, localization=1.0), num_chains=1, num_draws=5,
                     verbose=False)
    assert r.config["gradient_correction"] is False
    assert r.config["linear_bias_bound"] > 1 and "cannot apply" in r.config[
        "gradient_correction_note"]
