import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import slt_probe
from slt_probe import SGLD, estimate_llc
from slt_probe.core.samplers import SamplerState

FAST = dict(num_chains=2, num_draws=20, batch_size=64, verbose=False)


def test_known_truth_regular_model_within_ten_percent(regular_problem):
    p = regular_problem
    result = estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn,
                          sampler=SGLD(lr=3e-5, localization=1.0), num_chains=4,
                          num_draws=1500, num_burnin=300, batch_size=500, seed=0, verbose=False)
    assert float(p.true_lambda) == 5.0
    assert result.llc_mean == pytest.approx(5.0, rel=0.10)
    assert result.nbeta == pytest.approx(5000 / math.log(5000))
    assert result.diagnostics["healthy"]


def test_restricting_to_half_the_weights_halves_lambda(regular_problem):
    p = regular_problem
    mask = {"weight": torch.arange(10).reshape(1, 10) < 4}
    result = estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn,
                          sampler=SGLD(lr=3e-5, localization=1.0), num_chains=4,
                          num_draws=1500, num_burnin=300, batch_size=500, restrict_to=mask,
                          verbose=False)
    assert result.config["num_sampled_params"] == 4
    assert result.llc_mean == pytest.approx(2.0, rel=0.15)


def test_same_seed_same_result_other_seed_differs(tiny_classifier):
    model, x, y = tiny_classifier
    a = estimate_llc(model, (x, y), seed=3, **FAST)
    b = estimate_llc(model, (x, y), seed=3, **FAST)
    c = estimate_llc(model, (x, y), seed=4, **FAST)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    assert a.llc_mean == b.llc_mean
    assert not np.array_equal(a.loss_trace, c.loss_trace)


def test_estimation_leaves_model_grads_mode_and_global_rng_untouched(tiny_classifier):
    model, x, y = tiny_classifier
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    for backend in ("native", "devinterp"):
        estimate_llc(model, (x, y), backend=backend, **FAST)
        assert model.training
        for p, before, g in zip(model.parameters(), params, grads):
            assert torch.equal(p.detach(), before)
            assert torch.equal(p.grad, g)
            assert p.requires_grad
        assert torch.equal(torch.get_rng_state(), rng), backend


def test_dataloader_dataset_and_tuple_give_identical_estimates(tiny_classifier):
    model, x, y = tiny_classifier
    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=17, shuffle=True)
    rng = torch.get_rng_state()
    results = [estimate_llc(model, data, **FAST) for data in ((x, y), dataset, loader)]
    assert torch.equal(torch.get_rng_state(), rng), "reading a shuffling loader used global RNG"
    assert results[0].llc_mean == results[1].llc_mean == results[2].llc_mean


@pytest.mark.parametrize("data, message", [
    ((torch.empty(0, 4), torch.empty(0, dtype=torch.long)), "empty"),
    ((torch.randn(10, 4), torch.randint(0, 3, (9,))), "different numbers"),
    ((torch.randn(10, 4),), r"\(x, y\)"),
])
def test_bad_data_is_named(tiny_classifier, data, message):
    model, _, _ = tiny_classifier
    with pytest.raises(ValueError, match=message):
        estimate_llc(model, data, **FAST)


def test_bad_data_type_is_named(tiny_classifier):
    model, _, _ = tiny_classifier
    with pytest.raises(TypeError, match="data must be"):
        estimate_llc(model, "not data", **FAST)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"num_chains": 0}, ValueError, "num_chains"),
    ({"num_draws": 0}, ValueError, "num_draws"),
    ({"estimator": "magic"}, ValueError, "estimator"),
    ({"loss_on": "half"}, ValueError, "loss_on"),
    ({"backend": "jax"}, ValueError, "backend"),
    ({"loss_fn": "hinge"}, ValueError, "loss_fn"),
    ({"sampler": "sgld"}, ValueError, "sampler"),
    ({"sampler": 3.0}, TypeError, "sampler"),
    ({"restrict_to": ["nope"]}, ValueError, "unknown parameter"),
    ({"num_warmup": 10}, ValueError, "warmup_lr"),
    ({"warmup_lr": -1.0, "num_warmup": 10}, ValueError, "warmup_lr"),
    ({"warmup_lr": 1e-3, "num_warmup": 10, "backend": "devinterp"}, ValueError, "native"),
])
def test_bad_arguments_are_named(tiny_classifier, kwargs, error, message):
    model, x, y = tiny_classifier
    with pytest.raises(error, match=message):
        estimate_llc(model, (x, y), **{**FAST, **kwargs})


def test_nbeta_and_lr_must_be_positive():
    with pytest.raises(ValueError, match="nbeta"):
        SGLD(nbeta=0.0)
    with pytest.raises(ValueError, match="lr"):
        SGLD(lr=0.0)


def test_model_without_trainable_parameters_is_rejected(tiny_classifier):
    model, x, y = tiny_classifier
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        estimate_llc(model, (x, y), **FAST)


def test_nan_weights_are_rejected(tiny_classifier):
    model, x, y = tiny_classifier
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        estimate_llc(model, (x, y), **FAST)


def test_huge_step_diverges_every_chain_and_suggests_smaller_lr(tiny_classifier):
    model, x, y = tiny_classifier
    with pytest.raises(RuntimeError, match="smaller lr"):
        estimate_llc(model, (x, y), sampler=SGLD(lr=1e3), **FAST)


class _BreaksChainOne(SGLD):
    """An SGLD that pushes chain 1 to NaN at its third step."""

    def step(self, state, grad, noise, *, w_star, nbeta):
        out = super().step(state, grad, noise, w_star=w_star, nbeta=nbeta)
        self.calls = getattr(self, "calls", 0)
        object.__setattr__(self, "calls", self.calls + 1)
        if self.calls == 3:
            out.w[1] = float("nan")
        return SamplerState(out.w, out.aux)


def test_a_diverging_chain_is_flagged_and_excluded(tiny_classifier):
    model, x, y = tiny_classifier
    with pytest.warns(RuntimeWarning, match=r"chains \[1\] diverged"):
        result = estimate_llc(model, (x, y), sampler=_BreaksChainOne(lr=1e-4), num_chains=3,
                              num_draws=10, batch_size=64, verbose=False)
    flags = result.diagnostics["chains"]
    assert flags[1]["diverged"] and flags[1]["diverged_at_step"] == 3
    assert not flags[0]["diverged"] and not flags[2]["diverged"]
    assert np.isnan(result.llc_per_chain[1])
    assert result.llc_mean == pytest.approx(np.mean(result.llc_per_chain[[0, 2]]))
    assert not result.diagnostics["healthy"]


def test_progress_bar_shows_and_can_be_silenced(tiny_classifier, capsys):
    model, x, y = tiny_classifier
    estimate_llc(model, (x, y), **{**FAST, "verbose": True})
    assert "chains" in capsys.readouterr().err
    estimate_llc(model, (x, y), **FAST)
    assert capsys.readouterr().err == ""


def test_result_is_json_serialisable_and_records_settings(tiny_classifier, tmp_path):
    model, x, y = tiny_classifier
    result = estimate_llc(model, (x, y), sampler=SGLD(lr=1e-4, nbeta=50.0), **FAST)
    assert result.nbeta == 50.0
    assert result.loss_trace.shape == (2, 20)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["config"]["nbeta_source"] == "sampler"
    assert data["config"]["sampler"]["type"] == "SGLD"
    assert set(data["diagnostics"]) >= {"rhat", "ess", "frac_below_init", "chains", "healthy"}
    result.to_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["llc_mean"] == result.llc_mean


def test_full_data_loss_agrees_with_minibatch_estimators(regular_problem):
    p = regular_problem
    common = dict(loss_fn=p.loss_fn, sampler=SGLD(lr=3e-5, localization=1.0), num_chains=4,
                  num_draws=600, num_burnin=300, batch_size=500, seed=1, verbose=False)
    full = estimate_llc(p.model, (p.x, p.y), loss_on="full", **common)
    cv = estimate_llc(p.model, (p.x, p.y), **common)
    assert full.config["loss_on"] == "full"
    assert abs(full.llc_mean - cv.llc_mean) < 3 * (full.llc_sem + cv.llc_sem)


# RMSProp-SGLD adapting throughout (pSGLD) lacks the divergence term of its moving
# preconditioner, which biases it upwards: +25 % ± 9 % here (seeds 0–2 at ε 1e-3 and
# 3e-4: +15 % to +28 %). Fixed after the burn-in (the default) it read +0.5 % to +11 %.
@pytest.mark.parametrize("sampler, tolerance", [
    (slt_probe.RMSPropSGLD(lr=1e-3, localization=1.0), 0.15),
    (slt_probe.RMSPropSGLD(lr=1e-3, localization=1.0, adapt="always"), 0.35),
    (slt_probe.SGNHT(lr=1e-5, localization=1.0), 0.10)])
def test_other_samplers_estimate_the_regular_truth(regular_problem, sampler, tolerance):
    p = regular_problem
    result = estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn, sampler=sampler,
                          num_chains=8, num_draws=1000, num_burnin=500, batch_size=500,
                          verbose=False)
    assert result.llc_mean == pytest.approx(5.0, rel=tolerance)


def test_rmsprop_with_a_fixed_preconditioner_is_closer_to_the_truth(regular_problem):
    p = regular_problem
    errors = {}
    for adapt in ("burnin", "always"):
        r = estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn,
                         sampler=slt_probe.RMSPropSGLD(lr=1e-3, localization=1.0, adapt=adapt),
                         num_chains=8, num_draws=1000, num_burnin=500, batch_size=500,
                         verbose=False)
        assert r.config["sampler"]["adapt"] == adapt
        errors[adapt] = abs(r.llc_mean / p.expected_llc(nbeta=r.nbeta, localization=1.0) - 1)
    # seeds 0, 1, 2: fixed 9 %, 5 %, 0.5 % off; adapting 25 %, 16 %, 15 %
    assert errors["burnin"] < 0.12 < errors["always"], errors


def test_rmsprop_without_a_burnin_is_refused_before_sampling(regular_problem):
    p = regular_problem
    with pytest.raises(ValueError, match="num_burnin"):
        estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn, sampler=slt_probe.RMSPropSGLD(),
                     num_draws=10, verbose=False)


def test_mala_acceptance_falls_as_the_step_grows(regular_problem):
    p = regular_problem
    accept = []
    for lr in (1e-5, 1e-4, 1e-3, 3e-3):
        r = estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn,
                         sampler=SGLD(lr=lr, localization=1.0), num_chains=4, num_draws=200,
                         num_burnin=100, batch_size=5000, verbose=False)
        accept.append(r.diagnostics["mala_acceptance"])
        assert all(0 <= f["mala_acceptance"] <= 1 for f in r.diagnostics["chains"])
    assert accept[0] > 0.97, accept
    assert all(a > b for a, b in zip(accept, accept[1:])), accept
    assert accept[-1] < 0.7, accept


def test_unsettled_chains_are_reported_with_one_remedy(regular_problem):
    p = regular_problem
    r = estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn,
                     sampler=SGLD(lr=3e-6, localization=1.0), num_chains=4, num_draws=200,
                     batch_size=500, verbose=False)
    assert r.diagnostics["reasons"] == ["not_settled"]
    assert "num_burnin" in r.diagnostics["warnings"][0]
    assert r.diagnostics["drift"] > 0.1  # still climbing from w*


def test_warmup_runs_its_steps_at_the_warmup_step_size(regular_problem):
    p = regular_problem
    common = dict(loss_fn=p.loss_fn, sampler=SGLD(lr=1e-5, localization=1.0), num_chains=2,
                  num_draws=50, batch_size=500, verbose=False)
    burnin = estimate_llc(p.model, (p.x, p.y), num_burnin=40, **common)
    # A warm-up at the sampler's own step is the same as a longer burn-in, draw for draw.
    same = estimate_llc(p.model, (p.x, p.y), num_burnin=10, warmup_lr=1e-5, num_warmup=30,
                        **common)
    np.testing.assert_allclose(same.llc_trace, burnin.llc_trace)
    assert same.config["num_warmup"] == 30 and same.config["warmup_lr"] == 1e-5
    # At a 100× larger step, 30 steps spread the chains far more: the first draws read
    # a clearly larger loss before the burn-in at 1e-5 cools them.
    hot = estimate_llc(p.model, (p.x, p.y), num_burnin=0, warmup_lr=1e-3, num_warmup=30,
                       **common)
    cold = estimate_llc(p.model, (p.x, p.y), num_burnin=30, **common)
    assert hot.llc_trace[:, :5].mean() > 3 * cold.llc_trace[:, :5].mean()


def test_plain_estimator_agrees_with_the_control_variate_and_is_noisier(regular_problem):
    p = regular_problem
    common = dict(loss_fn=p.loss_fn, sampler=SGLD(lr=3e-5, localization=1.0), num_chains=4,
                  num_draws=600, num_burnin=300, batch_size=100, seed=1, verbose=False)
    plain = estimate_llc(p.model, (p.x, p.y), estimator="plain", **common)
    cv = estimate_llc(p.model, (p.x, p.y), **common)
    assert plain.config["estimator"] == "plain"
    assert abs(plain.llc_mean - cv.llc_mean) < 3 * (plain.llc_sem + cv.llc_sem)
    # the control variate removes the minibatch's own loss level from every draw
    assert np.std(plain.llc_trace) > 3 * np.std(cv.llc_trace)


def test_reference_loss_sets_the_excess_ratios_denominator(tiny_classifier):
    model, x, y = tiny_classifier
    common = dict(sampler=SGLD(lr=1e-4, localization=100.0), num_chains=2, num_draws=50,
                  verbose=False)
    default = estimate_llc(model, (x, y), **common)
    reference = default.init_loss + 10.0
    given = estimate_llc(model, (x, y), reference_loss=reference, **common)
    excess = given.diagnostics["mean_sampled_loss"] - given.init_loss
    assert given.diagnostics["constant_predictor_loss"] == reference
    assert given.diagnostics["excess_ratio"] == pytest.approx(excess / 10.0)
    assert given.llc_mean == default.llc_mean  # the estimate itself does not depend on it


class _Dicts(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"features": self.x[i], "target": self.y[i]}


def test_label_key_names_the_target_field_of_a_dict_dataset(tiny_classifier):
    model, x, y = tiny_classifier

    class Reader(torch.nn.Module):  # the dict's other fields arrive as keyword arguments
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, features):
            return self.net(features)

    common = dict(sampler=SGLD(lr=1e-4, localization=100.0), num_chains=2, num_draws=30,
                  seed=3, verbose=False)
    with pytest.raises(ValueError, match="label_key"):
        estimate_llc(Reader(), _Dicts(x, y), **common)
    from_dicts = estimate_llc(Reader(), _Dicts(x, y), label_key="target", **common)
    from_tuple = estimate_llc(model, (x, y), **common)
    assert from_dicts.llc_mean == pytest.approx(from_tuple.llc_mean, rel=1e-5)


@pytest.mark.parametrize("loss_name", ["next_token", "cross_entropy"])
def test_the_constant_predictor_of_a_sequence_loss_is_the_token_frequencies(loss_name):
    from slt_probe.core.losses import (
        ReferenceStats,
        constant_predictor_loss,
        resolve_loss,
    )

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (6, 7), generator=g)
    labels[0, 4:] = -100  # padding counts for nothing
    labels[3, :2] = -100
    loss = resolve_loss(loss_name)
    scored = labels[:, 1:] if loss_name == "next_token" else labels
    counted = scored[scored != -100]
    log_freq = torch.log(torch.bincount(counted, minlength=5).double() / len(counted))
    constant = log_freq.clamp_min(-1e4).float().expand(6, 7, 5)  # the same logits everywhere
    brute = float(loss.per_example(constant, labels).double().mean())
    assert constant_predictor_loss(loss, torch.zeros(2, 7, 5), labels) == pytest.approx(
        brute, rel=1e-6)
    streamed = ReferenceStats(loss, torch.zeros(2, 7, 5))
    streamed.update(labels[:3])
    streamed.update(labels[3:])
    entropy = float(-(log_freq.exp() * log_freq).sum())  # token-weighted
    assert streamed.value() == pytest.approx(entropy, rel=1e-9)
