"""The curvature baseline ½ Σ nβh/(nβh + γ): exact on quadratic truths, stochastic within
its standard error, honest where the quadratic is unbounded, sampled λ̂ alike on a regular
network."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from slt_probe import SGLD, estimate_llc, quadratic_llc
from slt_probe.ground_truth import problems


def _settled(d_in, d_out, seed):
    return problems.regular(d_in, d_out, n=5_000, seed=seed).settle()


@pytest.mark.parametrize("d_in,d_out,seed", [(12, 2, 11), (5, 3, 12)])  # fresh shapes and seeds
@pytest.mark.parametrize("gamma", [1.0, 100.0, 1e4])
def test_exact_on_linear_regression_at_its_minimum(d_in, d_out, seed, gamma):
    p = _settled(d_in, d_out, seed)
    q = quadratic_llc(p.model, (p.x, p.y), loss_fn="gaussian_nll", localization=gamma,
                      verbose=False)
    expected = p.expected_llc(nbeta=q.nbeta, localization=gamma)
    assert q.method == "eigendecomposition" and q.bounded and q.num_negative == 0
    assert q.value == pytest.approx(expected, rel=1e-5)
    assert q.at(q.nbeta, 3 * gamma) == pytest.approx(
        p.expected_llc(nbeta=q.nbeta, localization=3 * gamma), rel=1e-5)


def test_at_a_teacher_it_is_the_curvature_part_without_the_gradient_pull():
    p = problems.regular(8, 1, n=4_000, seed=13)  # not settled: g is sampling noise
    q = quadratic_llc(p.model, (p.x, p.y), loss_fn="gaussian_nll", localization=10.0,
                      verbose=False)
    curvature_only = p.expected_llc(nbeta=q.nbeta, localization=10.0, corrected=True)
    with_pull = p.expected_llc(nbeta=q.nbeta, localization=10.0)
    assert q.value == pytest.approx(curvature_only, rel=1e-5)
    assert with_pull < curvature_only


@pytest.mark.parametrize("gamma", [10.0, 1e4])
def test_hutchinson_lands_within_its_standard_error_and_two_percent(gamma):
    p = _settled(16, 2, 14)
    exact = quadratic_llc(p.model, (p.x, p.y), loss_fn="gaussian_nll", localization=gamma,
                          verbose=False)
    stochastic = quadratic_llc(p.model, (p.x, p.y), loss_fn="gaussian_nll",
                               localization=gamma, method="hutchinson", num_probes=24,
                               seed=5, verbose=False)
    assert stochastic.method == "hutchinson" and stochastic.num_probes == 24
    assert stochastic.standard_error > 0
    assert abs(stochastic.value - exact.value) < 4 * stochastic.standard_error + 1e-6
    assert stochastic.value == pytest.approx(exact.value, rel=0.02)
    top = float(abs(exact.eigenvalues).max())
    if stochastic.nbeta * top < gamma:  # bounded by the norm alone: the cheap certificate
        assert stochastic.min_eigenvalue is None and stochastic.bounded
    else:
        assert stochastic.min_eigenvalue == pytest.approx(float(exact.eigenvalues.min()),
                                                          rel=1e-2)


class _TwoLinear(nn.Module):
    """y = w2·w1·x at w = 0: a saddle whose Hessian has eigenvalues ±|E[xy]|."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(()))
        self.w2 = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.w2 * self.w1 * x


def test_a_saddle_reads_unbounded_where_gamma_does_not_hold_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2_000, 1, generator=g)
    y = 0.5 * x + 0.1 * torch.randn(2_000, 1, generator=g)
    data = (x, y)
    saddle = float((x * y).mean())  # the negative eigenvalue is −E[xy]
    nbeta = 100.0
    loose = quadratic_llc(_TwoLinear(), data, loss_fn="gaussian_nll", nbeta=nbeta,
                          localization=0.5 * nbeta * saddle, verbose=False)
    assert not loose.bounded and math.isnan(loose.value)
    assert loose.min_eigenvalue == pytest.approx(-saddle, rel=1e-4)
    assert loose.num_negative == 1
    held = quadratic_llc(_TwoLinear(), data, loss_fn="gaussian_nll", nbeta=nbeta,
                         localization=2 * nbeta * saddle, verbose=False)
    c = nbeta * saddle
    assert held.bounded
    assert held.value == pytest.approx(0.5 * (c / (c + 2 * c) - c / (2 * c - c)), rel=1e-5)


def test_restricted_to_some_parameters_equals_the_sub_hessian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(300, 3), torch.randint(0, 2, (300,))
    names = [n for n, _ in net.named_parameters()]
    params = {n: p.detach() for n, p in net.named_parameters()}

    def loss_of(w0):
        out = torch.func.functional_call(net, {**params, "0.weight": w0.reshape(4, 3)}, (x,))
        return nn.functional.cross_entropy(out, y)

    hessian = torch.autograd.functional.hessian(loss_of, params["0.weight"].flatten()).double()
    eigenvalues = torch.linalg.eigvalsh(hessian).numpy()
    nbeta, gamma = 50.0, 1.0
    q = quadratic_llc(net, (x, y), nbeta=nbeta, localization=gamma, restrict_to=["0.weight"],
                      verbose=False)
    assert q.num_params == 12 and "0.weight" in names
    assert np.allclose(np.sort(q.eigenvalues), eigenvalues, atol=1e-5)
    assert q.value == pytest.approx(q.at(nbeta, gamma))


def test_leaves_the_model_and_the_global_rng_alone():
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(200, 3), torch.randint(0, 2, (200,))
    state = torch.get_rng_state()
    quadratic_llc(net, (x, y), localization=10.0, method="hutchinson", num_probes=4,
                  verbose=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("kwargs,message", [
    ({"localization": 0.0}, "localization"),
    ({"localization": 1.0, "method": "lanczos"}, "method"),
    ({"localization": 1.0, "nbeta": -1.0}, "nbeta"),
    ({"localization": 1.0, "num_probes": 1}, "num_probes"),
])
def test_bad_input_is_named(kwargs, message):
    x, y = torch.randn(20, 2), torch.randn(20, 1)
    with pytest.raises(ValueError, match=message):
        quadratic_llc(nn.Linear(2, 1), (x, y), loss_fn="mse", verbose=False, **kwargs)


@pytest.mark.slow
def test_sampled_llc_of_the_tanh_teacher_student_matches_the_baseline():
    """A regular network (not a quadratic loss): at its settled minimum the sampled λ̂
    lands on the baseline within its standard error and 2 %."""
    p = problems.tanh_teacher_student(n=50_000, seed=3).settle()
    gamma = 10.0
    q = quadratic_llc(p.model, (p.x, p.y), loss_fn="gaussian_nll", localization=gamma,
                      verbose=False)
    # the softest direction (nβh_min + γ ≈ 33) relaxes at rate ε(nβh + γ)/2 per step: at
    # ε = 2e-6 the draws alone cover a tenth of its relaxation time, so the chains first
    # warm up at a ten times coarser step for three relaxation times
    r = estimate_llc(p.model, (p.x, p.y), loss_fn="gaussian_nll",
                     sampler=SGLD(lr=2e-6, localization=gamma), num_chains=8,
                     warmup_lr=2e-5, num_warmup=10_000, num_draws=3000, num_burnin=1000,
                     batch_size=1000, verbose=False)
    # the baseline is the Laplace posterior's E[λ̂] from the full Hessian (its softest
    # direction, nβh ≈ 23 against γ = 10, is counted only in part: 6.25 against d/2 = 6.5)
    exact = p.expected_llc(nbeta=r.nbeta, localization=gamma)
    assert q.value == pytest.approx(exact, rel=1e-3)
    assert abs(r.llc_mean - q.value) < 3 * r.llc_sem + 0.02 * q.value
