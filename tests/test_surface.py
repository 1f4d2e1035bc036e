"""What the rest of the suite leaves out: compilation, the mse loss, weight restriction by
name, buffers and frozen parameters, agreement with the devinterp backend, the minibatch
stream's epochs, and the command line's successful paths."""
import json

import numpy as np
import pytest
import torch

from slt_probe import SGLD, RMSPropSGLD, estimate_llc
from slt_probe.cli import main
from slt_probe.core.data import MinibatchStream
from slt_probe.core.settings import default_nbeta

FAST = dict(sampler=SGLD(lr=3e-5, localization=1.0), num_chains=4, num_draws=400,
            num_burnin=200, batch_size=500, verbose=False)


def test_mse_is_twice_the_gaussian_nll_so_half_the_nbeta_gives_the_same_chains(regular_problem):
    p = regular_problem
    nbeta = default_nbeta(len(p.x))
    gaussian = estimate_llc(p.model, (p.x, p.y), loss_fn="gaussian_nll", **FAST)
    mse = estimate_llc(p.model, (p.x, p.y), loss_fn="mse", nbeta=nbeta / 2, **FAST)
    np.testing.assert_allclose(mse.llc_trace, gaussian.llc_trace, rtol=1e-4, atol=1e-4)
    assert mse.config["nbeta_source"] == "settings"


def test_restricting_by_name_samples_those_parameters_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(200, 3), torch.randint(0, 2, (200,))
    result = estimate_llc(model, (x, y), restrict_to=["2"], sampler=SGLD(lr=1e-4),
                          num_chains=2, num_draws=20, batch_size=50, verbose=False)
    assert result.config["num_sampled_params"] == 4 * 2 + 2  # "2" selects 2.weight, 2.bias
    assert result.config["restrict_to"] == ["2"]
    with pytest.raises(ValueError, match="unknown parameter '3'"):
        estimate_llc(model, (x, y), restrict_to=["3"], verbose=False)


def test_buffers_come_from_the_model_and_frozen_parameters_stay_put():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x, y = torch.randn(256, 3), torch.randint(0, 2, (256,))
    model.train()
    for _ in range(20):  # running statistics move away from their initial values
        model(x)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    stats = model[1].running_mean.clone()
    settings = dict(sampler=SGLD(lr=1e-4), num_chains=2, num_draws=20, batch_size=64,
                    verbose=False)
    result = estimate_llc(model, (x, y), **settings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert result.config["num_params"] == trainable
    assert torch.equal(model[0].weight, frozen) and torch.equal(model[1].running_mean, stats)
    model[1].running_mean.add_(5.0)  # other buffers: another loss at w*
    shifted = estimate_llc(model, (x, y), **settings)
    assert shifted.init_loss != result.init_loss


def test_native_and_devinterp_backends_agree_on_a_known_truth(regular_problem):
    p = regular_problem
    settings = dict(FAST, num_chains=4, num_draws=800, num_burnin=400,
                    gradient_correction=False)
    native = estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn, **settings)
    reference = estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn, backend="devinterp",
                             **settings)
    assert abs(native.llc_mean - reference.llc_mean) < 3 * (native.llc_sem + reference.llc_sem)
    assert native.llc_mean == pytest.approx(5.0, rel=0.15)


def test_devinterp_backend_refuses_a_preconditioner_it_cannot_fix(regular_problem):
    p = regular_problem
    with pytest.raises(ValueError, match="adapt='always'"):
        estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn, backend="devinterp",
                     sampler=RMSPropSGLD(), num_draws=10, num_burnin=10,
                     verbose=False)


@pytest.mark.parametrize("drop_last", [False, True])
def test_each_epoch_of_the_minibatch_stream_covers_the_data_once(drop_last):
    n, batch = 103, 10
    stream = MinibatchStream(n, 3, batch, torch.Generator().manual_seed(0),
                             torch.device("cpu"), drop_last=drop_last)
    per_epoch = n // batch if drop_last else -(-n // batch)
    for _ in range(2):
        epoch = torch.cat([stream.next() for _ in range(per_epoch)], dim=1)
        for chain in epoch:
            assert len(set(chain.tolist())) == len(chain)  # no example twice in an epoch
        assert epoch.shape[1] == (per_epoch * batch if drop_last else n)


def test_compiled_sampling_gives_the_eager_estimate():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(200, 3), torch.randint(0, 2, (200,))
    settings = dict(sampler=SGLD(lr=1e-4, localization=10.0), num_chains=2, num_draws=30,
                    batch_size=50, verbose=False, gradient_correction=False)
    eager = estimate_llc(model, (x, y), **settings)
    compiled = estimate_llc(model, (x, y), compile=True, **settings)
    assert compiled.config["compiled"] is True
    np.testing.assert_allclose(compiled.llc_trace, eager.llc_trace, rtol=1e-3, atol=1e-3)
    # the compiled form is vmap(grad(...)): a model on another path runs eagerly and says so
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    tokens = torch.randn(40, 5, 8)
    attention = estimate_llc(torch.nn.Sequential(layer, torch.nn.Flatten(),
                                                 torch.nn.Linear(40, 2)),
                             (tokens, torch.randint(0, 2, (40,))), compile=True,
                             compute_path="vmap, fused attention",
                             **{**settings, "batch_size": 10, "num_draws": 3})
    assert attention.config["compiled"] is False
    assert "plain vmap path only" in attention.config["compute_path_note"]


def test_the_command_line_estimates_and_reports(tmp_path, capsys):
    assert main(["estimate", "--case", "regular-20", "--draws", "200", "--burnin", "100",
                 "--chains", "2", "--quiet", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "true λ = 10" in printed and "excess ratio" in printed
    record = json.loads((tmp_path / "regular-20.json").read_text())
    assert record["config"]["num_draws"] == 200 and record["true_lambda"] == 10.0
    assert record["command"].startswith("slt-probe")
    assert main(["grokking-report", "--root", str(tmp_path / "missing")]) == 2
    assert "no folder" in capsys.readouterr().err
