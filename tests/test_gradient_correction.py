"""The first-order-corrected estimator at points that are not minima, and the rule that
switches it on: a gradient significantly larger than its own noise that would pull the
plain estimate by more than a nat."""
import json
import math

import pytest
import torch

from slt_probe import SGLD, Calibration, EstimateSettings, LLCProbe, estimate_llc
from slt_probe.core.batched_model import BatchedModel
from slt_probe.core.data import as_source
from slt_probe.core.gradient_evidence import (
    GradientEvidence,
    measure_gradient,
    noise_threshold,
)
from slt_probe.core.losses import resolve_loss
from slt_probe.core.settings import default_nbeta
from slt_probe.ground_truth import problems


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
    expected = p.expected_llc(nbeta=nbeta, localization=gamma, corrected=True)
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
    assert "not_a_critical_point" in plain.diagnostics["reasons"]
    assert corrected.diagnostics["healthy"], corrected.diagnostics["warnings"]


@pytest.mark.parametrize("make", [
    lambda seed: problems.regular(20, 1, n=20_000, seed=seed),
    lambda seed: problems.deep_linear([6, 4, 4, 6], 1, n=20_000, seed=seed),
    lambda seed: problems.deep_linear([10, 5, 10], 2, n=2_000, seed=seed),
    lambda seed: problems.tanh_teacher_student(n=5_000, seed=seed),
], ids=["regular-20", "dln-6-4-4-6-r1", "rrr-10-5-10-r2-small-n", "tanh-2-3-1"])
def test_auto_stays_off_at_a_true_parameter_and_at_its_settled_minimum(make):
    # at the teacher the gradient is sampling noise (T about 1); at the settled minimum it
    # is zero; neither may switch the correction on, whatever γ (the pull of a noise
    # gradient in flat directions would exceed a nat at small γ)
    for seed in (0, 1):
        p = make(seed)
        for settled in (False, True):
            if settled:
                p.settle()
            r = estimate_llc(p.model, (p.x, p.y), sampler=SGLD(lr=1e-6, localization=1.0),
                             loss_fn="gaussian_nll", num_chains=2, num_draws=5,
                             batch_size=500, verbose=False)
            assert r.config["gradient_significant"] is False
            assert r.config["gradient_noise_ratio"] < r.config["gradient_noise_threshold"]
            assert r.config["gradient_correction"] is False


def test_noise_statistic_is_about_one_at_true_parameters_and_never_crosses_its_threshold():
    # the null distribution of T: fresh teachers and data sets, small n
    ratios = []
    for seed in range(40):
        p = problems.regular(d_in=3, d_out=2, n=400, seed=100 + seed)
        evidence = measure_gradient(*_batched(p), seed=seed)
        assert not evidence.significant
        ratios.append(evidence.ratio)
    assert 0.7 < sum(ratios) / len(ratios) < 1.3


def _batched(p):
    settings = EstimateSettings()
    model = BatchedModel.for_settings(p.model, resolve_loss(p.loss_fn), settings)
    return model, model.flatten(p.model), as_source((p.x, p.y)), None


def test_a_real_gradient_is_significant_and_its_predicted_pull_is_the_plain_estimates_shift():
    p, _ = _displaced(0.3)
    nbeta = default_nbeta(len(p.x))
    evidence = measure_gradient(*_batched(p))
    assert evidence.significant and evidence.ratio > 100
    plain = estimate_llc(p.model, (p.x, p.y), sampler=SGLD(lr=2e-5, localization=1.0),
                         gradient_correction=False, **COMMON)
    exact = p.expected_llc(nbeta=nbeta, localization=1.0, corrected=True)
    # on a quadratic, plain = exact − pull, and the exact plain value says the same
    assert exact - plain.llc_mean == pytest.approx(evidence.pull(nbeta, 1.0), rel=0.05)
    assert p.expected_llc(nbeta=nbeta, localization=1.0) == pytest.approx(
        exact - evidence.pull(nbeta, 1.0), rel=0.01)
    r = estimate_llc(p.model, (p.x, p.y), sampler=SGLD(lr=2e-5, localization=1.0),
                     loss_fn="gaussian_nll", num_chains=2, num_draws=5, verbose=False)
    assert r.config["gradient_correction"] is True
    assert r.config["gradient_pull"] > r.config["gradient_pull_threshold"]


def test_the_rule_needs_a_significant_gradient_and_a_pull_above_the_threshold():
    g = torch.ones(4, dtype=torch.float64)

    def evidence(norm_sq, noise, ritz=((1.0,), (1.0,))):
        return GradientEvidence(gradient=g, norm_sq=norm_sq, noise_norm_sq=noise, groups=32,
                                ritz_values=ritz[0], ritz_weights=ritz[1])

    # significant, and along a stiff direction (h = 1) the pull is nβ‖g‖²/2·(…) at γ ≪ nβh
    assert evidence(1.0, 0.01).pull(100.0, 1.0) == pytest.approx(
        100.0 ** 2 * (50.0 + 1.0) / 101.0 ** 2)
    assert evidence(1.0, 0.01).applies("auto", 100.0, 1.0)
    assert not evidence(1e-4, 1e-6).applies("auto", 100.0, 1.0)  # real, but pulls 0.005 nat
    assert not evidence(1.0, 0.5).applies("auto", 100.0, 1.0)  # T = 2: noise
    assert evidence(1.0, 0.01, ((-1.0,), (1.0,))).pull(100.0, 1.0) == math.inf  # a saddle
    assert evidence(1.0, 0.5).applies(True, 100.0, 1.0)
    assert not evidence(1.0, 0.01).applies(False, 100.0, 1.0)
    assert noise_threshold(32) == pytest.approx(13.2, abs=0.05)


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
    assert r.config["gradient_pull"] > 1 and "cannot apply" in r.config[
        "gradient_correction_note"]


def test_a_probe_holds_the_first_decision_for_every_later_estimate(tmp_path):
    p, minimum = _displaced(0.3)
    sampler = SGLD(lr=2e-5, localization=1.0)
    probe = LLCProbe(p.model, (p.x, p.y), loss_fn="gaussian_nll", sampler=sampler, every=None,
                     steps=[0, 1], num_chains=2, num_draws=5, batch_size=500,
                     log_dir=tmp_path, verbose=False)
    first = probe.estimate(0)  # off the minimum: a real gradient, corrected
    with torch.no_grad():
        p.model.weight.copy_(minimum)  # at the minimum the rule alone would say "off"
    second = probe.estimate(1)
    probe.detach()
    assert first["gradient_correction"] and second["gradient_correction"]
    held = json.loads((tmp_path / "manifest.json").read_text())["gradient_correction_held"]
    assert held["applied"] is True and held["decided_at_step"] == 0
    assert held["evidence"]["gradient_significant"] is True
    # a probe resumed on the folder keeps the held estimator
    resumed = LLCProbe(p.model, (p.x, p.y), loss_fn="gaussian_nll", sampler=sampler,
                       every=None, steps=[0, 1, 2], num_chains=2, num_draws=5,
                       batch_size=500, log_dir=tmp_path, verbose=False)
    assert resumed.settings.gradient_correction is True
    resumed.detach()


def test_a_calibration_writes_its_decision_into_the_settings_it_applies():
    cal = Calibration(sampler=SGLD(lr=1e-4, localization=100.0), warmup_lr=2e-4,
                      num_warmup=10, num_burnin=10, table=[], reason="", nbeta=150.0,
                      gradient_correction=True)
    assert cal.apply(EstimateSettings()).gradient_correction is True
    assert cal.apply(EstimateSettings(gradient_correction=False)).gradient_correction is False
    again = Calibration.from_dict(cal.to_dict())
    assert again.gradient_correction is True


def test_hessian_vector_products_match_autograd_and_the_difference_fallback(tiny_classifier):
    model, x, y = tiny_classifier
    batched = BatchedModel(model, resolve_loss("cross_entropy"))
    w = batched.flatten(model).double()
    batched.module.double()
    v = torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss(flat):
        return torch.func.functional_call(batched.module, batched.views(flat), (x.double(),))

    expected = torch.autograd.functional.hvp(
        lambda flat: torch.nn.functional.cross_entropy(loss(flat), y), w, v)[1]
    exact = batched.hessian_vector_product(w, v, x.double(), y)
    assert torch.allclose(exact, expected, rtol=1e-6, atol=1e-9)
    step = 1e-4
    difference = (batched.full_gradient(w + step * v, x.double(), y)
                  - batched.full_gradient(w - step * v, x.double(), y)) / (2 * step)
    assert torch.allclose(difference, expected, rtol=1e-3, atol=1e-6)


def test_a_held_plain_estimator_flags_the_points_where_the_gradient_pulls_it(tmp_path):
    p, minimum = _displaced(0.3)
    displaced = p.model.weight.detach().clone()
    with torch.no_grad():
        p.model.weight.copy_(minimum)
    probe = LLCProbe(p.model, (p.x, p.y), loss_fn="gaussian_nll",
                     sampler=SGLD(lr=2e-5, localization=1.0), every=None, steps=[0, 1],
                     num_chains=2, num_draws=5, batch_size=500, log_dir=tmp_path,
                     verbose=False)
    at_minimum = probe.estimate(0)  # plain, decided here and held
    with torch.no_grad():
        p.model.weight.copy_(displaced)
    off = probe.estimate(1)  # plain too (one estimator per curve), and flagged
    probe.detach()
    assert at_minimum["gradient_correction"] is False and off["gradient_correction"] is False
    assert at_minimum["critical_point"] is True
    assert off["critical_point"] is False and off["gradient_pull"] > 100
    assert "not_a_critical_point" in off["reasons"] and off["healthy"] is False
