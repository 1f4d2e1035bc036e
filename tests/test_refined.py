"""Several restrictions in one batched run: each equal (to float tolerance) to its own
run at the same seed, corrected or not, with its own mask, diagnostics and config."""
import pytest
import torch

import slt_probe
from slt_probe import SGLD, estimate_llc
from slt_probe.experiments.models import ModAddTransformer
from slt_probe.refined import estimate_restricted
from slt_probe.restrictions import attention_heads


@pytest.fixture
def small_transformer():
    torch.manual_seed(0)
    model = ModAddTransformer(p=11, d_model=16, num_heads=4, d_mlp=32)
    x = torch.randint(0, 11, (300, 2))
    return model, (x, (x[:, 0] + x[:, 1]) % 11)


@pytest.mark.parametrize("correction", [False, True])
def test_restrictions_in_one_run_equal_their_own_runs(small_transformer, correction):
    model, data = small_transformer
    restrictions = {**attention_heads(model), "mlp": ["mlp_in", "mlp_out"]}
    common = dict(sampler=SGLD(lr=1e-4, localization=100.0), num_chains=3, num_draws=20,
                  batch_size=32, seed=5, verbose=False, gradient_correction=correction)
    together = estimate_restricted(model, data, restrictions, **common)
    assert list(together) == list(restrictions)
    for name, restriction in restrictions.items():
        alone = estimate_llc(model, data, restrict_to=restriction, **common)
        result = together[name]
        assert result.config["gradient_correction"] is alone.config["gradient_correction"]
        assert result.config["gradient_correction"] is correction
        assert result.config["num_sampled_params"] == alone.config["num_sampled_params"]
        assert result.config["restriction"] == name
        assert result.config["restrictions_in_run"] == 5
        torch.testing.assert_close(torch.as_tensor(result.loss_trace),
                                   torch.as_tensor(alone.loss_trace), rtol=1e-5, atol=1e-6)
        assert result.llc_mean == pytest.approx(alone.llc_mean, rel=1e-4, abs=1e-4)
    # different masks sample different weights: the heads' estimates are not all equal
    assert len({round(r.llc_mean, 6) for r in together.values()}) == 5


def test_refused_inputs_are_named(small_transformer):
    model, data = small_transformer
    with pytest.raises(ValueError, match="empty"):
        estimate_restricted(model, data, {}, sampler=SGLD(lr=1e-4, localization=100.0))
    with pytest.raises(ValueError, match="restrict_to"):
        estimate_restricted(model, data, {"a": ["qkv"]}, restrict_to=["qkv"],
                            sampler=SGLD(lr=1e-4, localization=100.0))
    with pytest.raises(ValueError, match="SGNHT"):
        estimate_restricted(model, data, {"a": ["qkv"]}, sampler=slt_probe.SGNHT(lr=1e-5),
                            num_draws=5, verbose=False)
