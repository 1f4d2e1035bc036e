"""Data that is not read into memory, devices and precision."""
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from slt_probe import SGLD, estimate_llc
from slt_probe.core.batched_model import BatchedModel
from slt_probe.core.losses import resolve_loss

SETTINGS = dict(sampler=SGLD(lr=1e-3, localization=10.0), num_chains=3, num_draws=40,
                num_burnin=10, batch_size=25, verbose=False)


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, x, y


class Dicts(torch.utils.data.Dataset):
    """Examples as dicts, the way Hugging Face datasets give them."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"features": self.x[i], "labels": self.y[i]}


class DictModel(torch.nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, features):
        return self.body(features)


def test_a_streamed_map_dataset_gives_the_in_memory_estimate():
    model, x, y = _problem()
    in_memory = estimate_llc(model, (x, y), **SETTINGS)
    streamed = estimate_llc(model, TensorDataset(x, y), stream=True, **SETTINGS)
    assert in_memory.config["data"] == "in memory" and streamed.config["data"] == "streamed"
    # the same minibatches; L_b(w*) computed beside the chains instead of looked up
    torch.testing.assert_close(torch.tensor(streamed.llc_trace), torch.tensor(in_memory.llc_trace),
                               rtol=1e-5, atol=1e-5)
    assert streamed.init_loss == pytest.approx(in_memory.init_loss, rel=1e-6)
    assert in_memory.diagnostics["excess_ratio"] is not None
    assert streamed.diagnostics["excess_ratio"] == pytest.approx(
        in_memory.diagnostics["excess_ratio"], rel=1e-4)
    streamed_loader = estimate_llc(model, DataLoader(TensorDataset(x, y), batch_size=7),
                                   stream=True, **SETTINGS)
    assert streamed_loader.llc_mean == pytest.approx(streamed.llc_mean, rel=1e-6)


def test_a_dataset_of_dicts_feeds_keyword_inputs_and_its_labels():
    model, x, y = _problem()
    reference = estimate_llc(model, (x, y), **SETTINGS)
    for stream in (None, True):
        dicts = estimate_llc(DictModel(model), Dicts(x, y), stream=stream, **SETTINGS)
        assert dicts.llc_mean == pytest.approx(reference.llc_mean, rel=1e-5)


class Batches(IterableDataset):
    """An iterable dataset that yields batches and counts how often it is read through."""

    def __init__(self, x, y, size):
        self.x, self.y, self.size = x, y, size
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        for start in range(0, len(self.x), self.size):
            yield self.x[start:start + self.size], self.y[start:start + self.size]


def test_an_iterable_dataset_is_streamed_pass_by_pass_without_touching_the_global_rng():
    model, x, y = _problem()
    data = Batches(x, y, 25)
    rng = torch.get_rng_state()
    long = {**SETTINGS, "num_chains": 8, "num_draws": 300, "batch_size": 40}
    result = estimate_llc(model, DataLoader(data, batch_size=None), **long)
    assert torch.equal(torch.get_rng_state(), rng)
    assert result.config["num_examples"] == 200 and result.config["data"] == "streamed"
    # the data's own batches are what the chains draw, whatever batch_size says
    assert long["batch_size"] != 25 and result.config["batch_size_drawn"] == 25
    # 8 chains × 310 steps of 25-example batches, 8 batches per pass, plus the passes that
    # count n, measure L_n(w*) and ∇L_n(w*)
    assert data.passes >= 8 * 310 // 8
    reference = estimate_llc(model, (x, y), **long)
    assert reference.config["batch_size_drawn"] == min(long["batch_size"], 200)
    assert result.init_loss == pytest.approx(reference.init_loss, rel=1e-6)
    # other minibatches, the same posterior: equal within the chains' standard errors
    assert abs(result.llc_mean - reference.llc_mean) < 3 * (result.llc_sem + reference.llc_sem)
    with pytest.raises(TypeError, match="iterable dataset cannot be read into memory"):
        estimate_llc(model, data, stream=False, **SETTINGS)


def test_the_estimate_runs_where_it_is_asked_to_and_names_a_missing_device():
    model, x, y = _problem()
    on_cpu = estimate_llc(model, (x, y), device="cpu", **SETTINGS)
    assert on_cpu.config["device"] == "cpu"
    assert on_cpu.llc_mean == estimate_llc(model, (x, y), **SETTINGS).llc_mean
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            estimate_llc(model, (x, y), device="cuda", **SETTINGS)
    with pytest.raises(ValueError, match="not a torch device"):
        estimate_llc(model, (x, y), device="abacus", **SETTINGS)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_lower_precision_forward_keeps_weights_and_losses_in_float32(precision):
    model, x, y = _problem()
    full = estimate_llc(model, (x, y), **{**SETTINGS, "num_draws": 200})
    low = estimate_llc(model, (x, y), precision=precision, **{**SETTINGS, "num_draws": 200})
    assert precision in low.config["precision"] and low.loss_trace.dtype.name == "float64"
    # the low-precision forward shifts the losses by its rounding; λ̂ stays close
    assert low.llc_mean == pytest.approx(full.llc_mean, rel=0.15, abs=0.5)
    assert low.llc_mean != full.llc_mean
    with pytest.raises(ValueError, match="precision"):
        estimate_llc(model, (x, y), precision="int8", **SETTINGS)


def test_tf32_is_named_a_gpu_setting_and_its_context_restores_torchs_flags():
    model, x, y = _problem()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="tf32.*CUDA setting"):
            estimate_llc(model, (x, y), precision="tf32", **SETTINGS)
    batched = BatchedModel(model, resolve_loss("cross_entropy"))
    batched.precision_name = "tf32"  # as on a GPU, to read the context's flags on any machine
    before = torch.backends.cuda.matmul.fp32_precision
    with batched._context():
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == before
    assert "TF32" in batched.precision
