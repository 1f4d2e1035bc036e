"""Every family of torch's layers gives an estimate, whichever computation path runs, with
the same numbers on every path; outputs that are not tensors; chains computed in groups."""
import warnings

import pytest
import torch
from torch import nn

from slt_probe import SGLD, estimate_llc
from slt_probe.core.batched_model import select_output

SETTINGS = dict(sampler=SGLD(lr=1e-4, localization=100.0), num_chains=3, num_draws=8,
                num_burnin=2, batch_size=16, verbose=False, gradient_correction=False)


class Sequence(nn.Module):
    """(batch, 5, 8) inputs through ``core``, mean over positions, a 3-class head."""

    def __init__(self, core: nn.Module, call):
        super().__init__()
        self.core = core
        self.call = call
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.call(self.core, x).mean(1))


def _family(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    seq = torch.randn(48, 5, 8)
    if name == "conv + batchnorm":
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 4 * 4, 3))
        return model, torch.randn(48, 1, 6, 6)
    if name == "norms + dropout":
        model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Dropout(0.3),
                              nn.Unflatten(1, (2, 4)), nn.GroupNorm(2, 2), nn.Flatten(),
                              nn.BatchNorm1d(8), nn.RMSNorm(8), nn.Linear(8, 3))
        return model, torch.randn(48, 8)
    if name == "embedding":
        model = nn.Sequential(nn.Embedding(11, 4), nn.Flatten(), nn.Linear(12, 3))
        return model, torch.randint(0, 11, (48, 3))
    calls = {
        "multi-head attention": (nn.MultiheadAttention(8, 2, batch_first=True),
                                 lambda m, x: m(x, x, x)[0]),
        "causal attention, no weights": (
            nn.MultiheadAttention(8, 2, batch_first=True),
            lambda m, x: m(x, x, x, need_weights=False, is_causal=True,
                           attn_mask=nn.Transformer.generate_square_subsequent_mask(5))[0]),
        "transformer encoder layer": (nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
                                      lambda m, x: m(x)),
        "encoder layer, norm first": (nn.TransformerEncoderLayer(8, 2, 16, batch_first=True,
                                                                 norm_first=True),
                                      lambda m, x: m(x)),
        "transformer decoder layer": (nn.TransformerDecoderLayer(8, 2, 16, batch_first=True),
                                      lambda m, x: m(x, x)),
        "transformer": (nn.Transformer(8, 2, 1, 1, 16, batch_first=True), lambda m, x: m(x, x)),
        "rnn": (nn.RNN(8, 8, batch_first=True), lambda m, x: m(x)[0]),
        "gru": (nn.GRU(8, 8, batch_first=True), lambda m, x: m(x)[0]),
        "lstm": (nn.LSTM(8, 8, batch_first=True), lambda m, x: m(x)[0]),
    }
    core, call = calls[name]
    return Sequence(core, call), seq


FAMILIES = ["conv + batchnorm", "norms + dropout", "embedding", "multi-head attention",
            "causal attention, no weights", "transformer encoder layer",
            "encoder layer, norm first", "transformer decoder layer", "transformer", "rnn",
            "gru", "lstm"]
# these call scaled_dot_product_attention (nn.MultiheadAttention does only without weights)
ROUTED = ("causal attention, no weights", "transformer encoder layer",
          "encoder layer, norm first", "transformer decoder layer", "transformer")
RECURRENT = ("rnn", "gru", "lstm")


def _paths_that_run(family):
    if family in ROUTED:
        return ["vmap, fused attention", "vmap, math attention", "loop over chains"]
    if family in RECURRENT:  # no batching rule
        return ["loop over chains"]
    return ["vmap", "vmap, math attention", "loop over chains"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_family_estimates_the_same_on_every_path_it_can_run(family):
    model, x = _family(family)
    y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = estimate_llc(model, (x, y), **SETTINGS)
    path, runs = auto.config["compute_path"], _paths_that_run(family)
    timed = auto.config["compute_path_seconds_per_step"]
    if family in ROUTED:  # fused attention or the loop, whichever is faster, both timed
        assert sorted(timed) == ["loop over chains", "vmap, fused attention"]
        assert path == "vmap, fused attention" or (
            path == "loop over chains" and timed[path] < timed["vmap, fused attention"])
    else:  # plain vmap whenever it works, untimed
        assert path == runs[0] and timed == {}
    fallbacks = [w for w in caught if "its chains run as" in str(w.message)]
    assert len(fallbacks) == (1 if family in RECURRENT else 0)  # once per model, not per step
    for forced in runs:
        other = estimate_llc(model, (x, y), compute_path=forced, **SETTINGS)
        assert other.config["compute_path"] == forced
        torch.testing.assert_close(torch.tensor(other.llc_trace), torch.tensor(auto.llc_trace),
                                   rtol=1e-4, atol=1e-4)
    # the user's train/eval mode does not matter (a private eval-mode copy is sampled)
    model.train()
    trained_mode = estimate_llc(model, (x, y), compute_path=path, **SETTINGS)
    assert trained_mode.llc_mean == auto.llc_mean and model.training


def test_a_path_that_cannot_run_this_model_is_named():
    model, x = _family("gru")
    y = torch.zeros(len(x), dtype=torch.long)
    with pytest.raises(RuntimeError, match="cannot be evaluated for sampling.*Batching rule"):
        estimate_llc(model, (x, y), compute_path="vmap", **SETTINGS)
    with pytest.raises(ValueError, match="compute_path"):
        estimate_llc(model, (x, y), compute_path="gpu", **SETTINGS)


class Outputs(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.body = nn.Linear(4, 3)

    def forward(self, x):
        logits = self.body(x)
        if self.kind == "tuple":
            return logits, logits.sum()
        if self.kind == "dict":
            return {"loss": logits.sum(), "logits": logits}
        if self.kind == "other key":
            return {"scores": logits}
        return logits


@pytest.mark.parametrize("kind, output", [("tuple", None), ("dict", None), ("tuple", 0),
                                          ("other key", "scores"),
                                          ("other key", lambda out: out["scores"])])
def test_models_returning_tuples_or_dicts_give_the_tensor_models_estimate(kind, output):
    torch.manual_seed(0)
    plain = Outputs("tensor")
    model = Outputs(kind)
    model.load_state_dict(plain.state_dict())
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    reference = estimate_llc(plain, (x, y), **SETTINGS)
    assert estimate_llc(model, (x, y), output=output, **SETTINGS).llc_mean == reference.llc_mean


def test_an_output_that_names_nothing_is_explained():
    model, x, y = Outputs("other key"), torch.randn(40, 4), torch.randint(0, 3, (40,))
    with pytest.raises(ValueError, match="without 'logits'.*output="):
        estimate_llc(model, (x, y), **SETTINGS)
    with pytest.raises(ValueError, match="output='nope' names nothing"):
        estimate_llc(model, (x, y), output="nope", **SETTINGS)
    with pytest.raises(TypeError, match="must be a tensor"):
        select_output(("text", 1))


@pytest.mark.parametrize("family", ["embedding", "multi-head attention", "gru"])
def test_chains_in_groups_give_the_numbers_of_one_group(family):
    model, x = _family(family)
    y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(1))
    settings = {**SETTINGS, "num_chains": 5}
    whole = estimate_llc(model, (x, y), **settings)
    for group in (1, 2):
        grouped = estimate_llc(model, (x, y), chain_batch=group, **settings,
                               compute_path=whole.config["compute_path"])
        torch.testing.assert_close(torch.tensor(grouped.llc_trace), torch.tensor(whole.llc_trace),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chain_batch"):
        estimate_llc(model, (x, y), chain_batch=0, **settings)


class _Product(nn.Module):
    """a·b·x with a and b stored as 0-dimensional or as one-element parameters."""

    def __init__(self, shape):
        super().__init__()
        self.a = nn.Parameter(torch.full(shape, 0.5))
        self.b = nn.Parameter(torch.full(shape, 1.0))

    def forward(self, x):
        return self.a * self.b * x


def test_zero_dimensional_parameters_estimate_like_one_element_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1_000, 1, generator=g)
    y = 0.5 * x + torch.randn(1_000, 1, generator=g)
    runs = [estimate_llc(_Product(shape), (x, y), loss_fn="gaussian_nll",
                         sampler=SGLD(lr=1e-4, localization=10.0), num_draws=100,
                         verbose=False) for shape in [(), (1,)]]
    assert runs[0].config["num_params"] == 2
    assert runs[0].llc_mean == pytest.approx(runs[1].llc_mean, rel=1e-6)
