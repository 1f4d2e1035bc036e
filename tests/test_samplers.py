import math
from dataclasses import replace

import pytest
import torch

from slt_probe import SGLD, SGNHT, RMSPropSGLD
from slt_probe.core.batched_model import BatchedModel
from slt_probe.core.losses import resolve_loss


@pytest.mark.parametrize("kwargs, name", [
    ({"lr": 0.0}, "lr"), ({"lr": -1e-3}, "lr"), ({"localization": -1.0}, "localization"),
    ({"nbeta": 0.0}, "nbeta"), ({"nbeta": -5.0}, "nbeta"), ({"lr": float("nan")}, "lr")])
def test_sampler_rejects_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SGLD(**kwargs)


def test_sampler_rejects_non_numbers():
    with pytest.raises(TypeError, match="lr"):
        SGLD(lr="big")


def test_rmsprop_and_sgnht_check_their_own_settings():
    with pytest.raises(ValueError, match="alpha"):
        RMSPropSGLD(alpha=1.0)
    with pytest.raises(ValueError, match="diffusion_factor"):
        SGNHT(diffusion_factor=0.0)


@pytest.mark.parametrize("with_noise", [False, True])
def test_sgld_step_is_the_langevin_update_with_localisation_pull(with_noise):
    sampler = SGLD(lr=0.01, localization=3.0)
    w_star = torch.randn(2, 5)
    w = torch.randn(2, 5)
    grad = torch.randn(2, 5)
    noise = torch.randn(2, 5) if with_noise else torch.zeros(2, 5)
    state = sampler.init(w_star, torch.Generator(), None)
    state.w = w.clone()
    out = sampler.step(state, grad, noise, w_star=w_star, nbeta=7.0)
    expected = w - 0.5 * 0.01 * (7.0 * grad + 3.0 * (w - w_star)) + 0.1 * noise
    torch.testing.assert_close(out.w, expected)
    torch.testing.assert_close(state.w, w, msg="step must not modify its input state")


@pytest.mark.parametrize("sampler", [SGLD(lr=1e-3), RMSPropSGLD(lr=1e-3),
                                     SGNHT(lr=1e-3, localization=1.0)])
def test_same_noise_gives_same_step(sampler):
    w_star = torch.randn(3, 6)
    grad, noise = torch.randn(3, 6), torch.randn(3, 6)
    a = sampler.step(sampler.init(w_star, torch.Generator().manual_seed(1), None), grad, noise,
                     w_star=w_star, nbeta=10.0)
    b = sampler.step(sampler.init(w_star, torch.Generator().manual_seed(1), None), grad, noise,
                     w_star=w_star, nbeta=10.0)
    torch.testing.assert_close(a.w, b.w)
    assert a.w.shape == (3, 6)


def test_rmsprop_first_step_matches_formula():
    sampler = RMSPropSGLD(lr=0.01, localization=2.0, eps=0.1)
    w_star = torch.zeros(1, 4)
    grad = torch.tensor([[1.0, -2.0, 0.0, 3.0]])
    noise = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    out = sampler.step(sampler.init(w_star, torch.Generator(), None), grad, noise,
                       w_star=w_star, nbeta=2.0)
    precond = 1.0 / ((2.0 * grad).abs() + 0.1)
    expected = -0.005 * precond * (2.0 * grad) + torch.sqrt(0.01 * precond) * noise
    torch.testing.assert_close(out.w, expected)


def test_rmsprop_rejects_an_unknown_adaptation():
    with pytest.raises(ValueError, match="adapt"):
        RMSPropSGLD(adapt="never")


def test_rmsprop_fixes_its_preconditioner_when_the_draws_begin():
    sampler = RMSPropSGLD(lr=0.01, localization=2.0, eps=0.1, alpha=0.5)
    g = torch.Generator().manual_seed(0)
    w_star = torch.randn(2, 5, generator=g)
    state = sampler.init(w_star, g, None)
    for _ in range(3):
        state = sampler.step(state, torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g),
                             w_star=w_star, nbeta=4.0)
    fixed = 1.0 / (state.aux["square_avg"].sqrt() + 0.1)
    state = sampler.begin_draws(state)
    for _ in range(2):
        # a gradient far larger than any seen would change an adapting preconditioner
        grad, noise = 100 * torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
        out = sampler.step(state, grad, noise, w_star=w_star, nbeta=4.0)
        expected = (state.w - 0.005 * fixed * (4.0 * grad + 2.0 * (state.w - w_star))
                    + torch.sqrt(0.01 * fixed) * noise)
        torch.testing.assert_close(out.w, expected)
        state = out
    # the adapting form (pSGLD) keeps moving its preconditioner
    always = RMSPropSGLD(lr=0.01, localization=2.0, eps=0.1, alpha=0.5, adapt="always")
    before = always.init(w_star, g, None)
    before = always.step(before, torch.ones(2, 5), torch.zeros(2, 5), w_star=w_star, nbeta=4.0)
    kept = always.begin_draws(before)
    after = always.step(kept, 100 * torch.ones(2, 5), torch.zeros(2, 5), w_star=w_star,
                        nbeta=4.0)
    assert not torch.allclose(after.aux["square_avg"], before.aux["square_avg"])


def test_rmsprop_cannot_fix_a_preconditioner_it_never_adapted():
    sampler = RMSPropSGLD()
    state = sampler.init(torch.zeros(1, 3), torch.Generator(), None)
    with pytest.raises(ValueError, match="num_burnin"):
        sampler.begin_draws(state)


def test_sgnht_step_follows_the_nose_hoover_update_with_distinct_coefficients():
    # lr, diffusion factor, nβ, γ all different, so swapping any two changes the result
    lr, diffusion, nbeta, gamma = 0.02, 0.005, 3.0, 0.7
    sampler = SGNHT(lr=lr, diffusion_factor=diffusion, localization=gamma)
    g = torch.Generator().manual_seed(0)
    w_star = torch.randn(2, 50, generator=g)
    state = sampler.init(w_star, torch.Generator().manual_seed(1), None)
    state = replace(state, w=w_star + 0.1 * torch.randn(2, 50, generator=g))
    grad, noise = torch.randn(2, 50, generator=g), torch.randn(2, 50, generator=g)
    out = sampler.step(state, grad, noise, w_star=w_star, nbeta=nbeta)
    m, xi = state.aux["momentum"], state.aux["thermostat"]
    assert torch.equal(xi, torch.full((2, 1), diffusion))  # the thermostat starts at A
    force = nbeta * grad + gamma * (state.w - w_star)
    momentum = m - lr * force - xi * m + (2 * lr * diffusion) ** 0.5 * noise
    torch.testing.assert_close(out.aux["momentum"], momentum)
    torch.testing.assert_close(out.w, state.w + momentum)
    torch.testing.assert_close(out.aux["thermostat"],
                               xi + momentum.square().mean(dim=1, keepdim=True) - lr)
    assert float(m.std()) == pytest.approx(lr ** 0.5, rel=0.15)  # initial momentum ~ N(0, ε)


def test_batched_chains_equal_a_per_chain_loop(tiny_classifier):
    model, x, y = tiny_classifier
    stacked = BatchedModel(model, resolve_loss("cross_entropy"))
    w0 = stacked.flatten(model)
    chains = 3
    w = w0 + 0.1 * torch.randn(chains, stacked.dim)
    idx = torch.stack([torch.randperm(len(x))[:32] for _ in range(chains)])
    losses, grads = stacked.loss_and_grad(w, x[idx], y[idx])
    for c in range(chains):
        clone = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        torch.nn.utils.vector_to_parameters(w[c], clone.parameters())
        loss = torch.nn.functional.cross_entropy(clone(x[idx[c]]), y[idx[c]])
        loss.backward()
        expected = torch.cat([p.grad.reshape(-1) for p in clone.parameters()])
        assert math.isclose(float(losses[c]), loss.item(), rel_tol=1e-5)
        torch.testing.assert_close(grads[c], expected, rtol=1e-4, atol=1e-6)
