"""The gradient at w*: the evidence ``gradient_correction="auto"`` decides on, and plain
against corrected estimates on each kind of point.

    python benchmarks/gradient_correction.py [--mnist-dir DIR] [--out results/benchmarks]

Points: true parameters with noisy data (w* = the teacher: a regular linear model, a
reduced-rank regression, a deep linear network; the gradient is sampling noise), their
settled minima, a regular model moved off its minimum (a real gradient on a quadratic),
a ridge minimum (∇L_n(w*) = −decay·w*, systematic), a deep linear network at a
weight-decayed minimum, a small max-pooling CNN trained with Adam, and the Omnigrok MNIST
MLP at its ×8 initialisation. For each: the statistic T = n‖g‖²/tr Σ̂ against its
threshold, the predicted pull of g on the plain estimate at the γ used, the decision, and
λ̂ plain and corrected with one explicit SGLD (8 chains, nβ = n/log n, one thread), beside
the truth (the exact E[λ̂] where it is known at this n, nβ, γ). Writes
``OUT/gradient_correction.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from locality import train_with_adam  # a sibling script: benchmarks/ is on the path
from torch import nn

import slt_probe
from slt_probe.core.settings import default_nbeta
from slt_probe.experiments.grokking import default_activation
from slt_probe.experiments.mnist import load_mnist
from slt_probe.experiments.presets import build_model, build_task, preset
from slt_probe.ground_truth import problems
from slt_probe.reports import markdown_table
from slt_probe.run_log import write_text_atomic

HEADER = ["point", "n", "d", "T = n‖g‖²/tr Σ̂", "T threshold", "pull at γ (nats)", "γ", "ε",
          "auto decides", "λ̂ plain", "λ̂ corrected", "λ; exact E[λ̂] where known", "s"]


def ridge(decay: float):
    """Linear regression (d = 20) at its ridge minimum: ∇L_n(w*) = −decay·w*."""
    p = problems.regular(20, 1, 20_000)
    x, y = p.x, p.y
    w = torch.linalg.solve(x.T @ x / len(x) + decay * torch.eye(20), x.T @ y / len(x))
    with torch.no_grad():
        p.model.weight.copy_(w.T)
    p.name = f"ridge minimum, decay {decay:g} (d = 20)"
    return p


def weight_decayed_dln(decay: float = 1e-3):
    p = problems.deep_linear([6, 4, 4, 6], 1, 20_000)
    optimizer = torch.optim.LBFGS(p.model.parameters(), lr=1, max_iter=2000,
                                  tolerance_grad=1e-12, tolerance_change=1e-16,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (0.5 * ((p.model(p.x) - p.y) ** 2).sum(1).mean()
                + 0.5 * decay * sum((q ** 2).sum() for q in p.model.parameters()))
        loss.backward()
        return loss

    optimizer.step(closure)
    p.name = f"deep linear 6-4-4-6 r=1, weight-decayed minimum ({decay:g})"
    return p


def displaced_regular(shift: float = 0.3):
    p = problems.regular(d_in=10, d_out=1, n=5_000).settle()
    with torch.no_grad():
        p.model.weight.add_(shift)
    p.name = f"regular d=10, every weight +{shift:g} off its minimum"
    return p


def small_cnn(mnist_dir, n: int = 2_000, steps: int = 600):
    """Two 3×3 convolutions with max-pooling and a linear read-out (2,674 parameters),
    trained with Adam on the first 2,000 MNIST test images."""
    torch.manual_seed(0)
    x, y = load_mnist("test", mnist_dir)
    x, y = x[:n].reshape(-1, 1, 28, 28), y[:n]
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(200, 10))
    train_with_adam(model, x, y, steps=steps, lr=3e-3)
    return model, (x, y)


def _measure(label, model, data, loss_fn, *, lr, gamma, draws, burnin, batch_size,
             truth=None, expected=None):
    started = time.perf_counter()
    common = dict(loss_fn=loss_fn, sampler=slt_probe.SGLD(lr=lr, localization=gamma),
                  num_chains=8, num_draws=draws, num_burnin=burnin, batch_size=batch_size,
                  verbose=False)
    auto = slt_probe.estimate_llc(model, data, **common)  # gradient_correction="auto"
    other = slt_probe.estimate_llc(model, data, gradient_correction=not auto.config[
        "gradient_correction"], **common)
    plain, corrected = (other, auto) if auto.config["gradient_correction"] else (auto, other)
    c = auto.config

    def show(result):
        flag = "" if result.diagnostics["healthy"] else f" ({';'.join(result.diagnostics['reasons'])})"
        return f"{result.llc_mean:.4g} ± {result.llc_sem:.2g}{flag}"

    pull = c["gradient_pull"]
    truth_text = "—" if truth is None else f"{truth:g}"
    if expected is not None:
        plain_exact, corrected_exact = expected
        truth_text = (f"{truth:g}; exact E[λ̂] plain {plain_exact:.4g}, corrected "
                      f"{corrected_exact:.4g}")
    return [label, c["num_examples"], c["num_params"], f"{c['gradient_noise_ratio']:.3g}",
            f"{c['gradient_noise_threshold']:.3g}",
            "— (not significant)" if pull is None else f"{pull:.3g}", f"{gamma:g}", f"{lr:.2g}",
            "corrected" if c["gradient_correction"] else "plain", show(plain), show(corrected),
            truth_text, f"{time.perf_counter() - started:.0f}"]


def known(p, *, settle: bool, lr, gamma, draws=2000, burnin=1000):
    if settle:
        p.settle()
    label = p.name.replace("at its teacher", "at its settled minimum") if settle else p.name
    nbeta = default_nbeta(len(p.x))
    expected = p.expected_llc(nbeta=nbeta, localization=gamma)
    if expected is not None:
        expected = (expected, p.expected_llc(nbeta=nbeta, localization=gamma, corrected=True))
    return _measure(label, p.model, (p.x, p.y), p.loss_fn, lr=lr, gamma=gamma, draws=draws,
                    burnin=burnin, batch_size=500, truth=float(p.true_lambda),
                    expected=expected)


def trained(setup: str, mnist_dir):
    """A grokking run's final weights (``results/grokking/<setup>/seed0/model.pt``) with the
    sampler its local-regime calibration chose."""
    folder = Path("results/grokking") / setup / "seed0"
    config = preset(setup)
    task = build_task(config, 0, mnist_dir)
    model = build_model(config, default_activation(config), 0)
    model.load_state_dict(torch.load(folder / "model.pt"))
    sampler = json.loads((folder / "local" / "manifest.json").read_text())["calibration"][
        "sampler"]
    data = (task.x_train, task.targets(task.y_train, config.loss))
    return _measure(f"{setup} trained (seed 0, final weights)", model, data, config.loss,
                    lr=sampler["lr"], gamma=sampler["localization"], draws=400, burnin=400,
                    batch_size=128)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist-dir", default=None)
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    rows = []
    for settle in (False, True):
        p = problems.regular(20, 1, 20_000)
        p.name = "regular d=20 at its teacher"
        rows.append(known(p, settle=settle, lr=3e-6, gamma=10.0))
        p = problems.deep_linear([10, 5, 10], 2, 20_000)
        p.name = "rrr 10-5-10 r=2 at its teacher"
        rows.append(known(p, settle=settle, lr=5e-6, gamma=10.0, draws=4000, burnin=4000))
        p = problems.deep_linear([6, 4, 4, 6], 1, 20_000)
        p.name = "deep linear 6-4-4-6 r=1 at its teacher"
        rows.append(known(p, settle=settle, lr=5e-6, gamma=10.0, draws=4000, burnin=4000))
    rows.append(known(displaced_regular(), settle=False, lr=2e-5, gamma=1.0))
    for decay in (0.01, 0.1):
        rows.append(known(ridge(decay), settle=False, lr=3e-6, gamma=10.0))
    rows.append(known(weight_decayed_dln(), settle=False, lr=5e-6, gamma=10.0, draws=4000,
                      burnin=4000))
    model, data = small_cnn(args.mnist_dir)
    rows.append(_measure("CNN 2,674 params, 600 Adam steps (max-pooling)", model, data,
                         "cross_entropy", lr=1.25e-4, gamma=10.0, draws=1000, burnin=1000,
                         batch_size=128))
    for setup in ("modadd-mlp", "modadd-transformer", "mnist-mlp"):
        rows.append(trained(setup, args.mnist_dir))
    config = preset("mnist-mlp")
    task = build_task(config, 0, args.mnist_dir)
    model = build_model(config, default_activation(config), 0)
    data = (task.x_train, task.targets(task.y_train, config.loss))
    rows.append(_measure("Omnigrok MNIST MLP at its ×8 initialisation", model, data,
                         config.loss, lr=1e-6, gamma=1e5, draws=400, burnin=400,
                         batch_size=200))
    command = "python benchmarks/gradient_correction.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    text = "\n".join([
        f"Measured with `{command.strip()}` (1 thread, {time.perf_counter() - started:.0f} s). "
        "T: the gradient against its own noise (about 1 for noise); the threshold is "
        "F(1, K−1)'s 0.999 quantile for K random groups. Pull: the plain estimate's "
        "predicted shift from the linear term (Lanczos quadrature along g), computed only "
        "for a significant g. 'auto decides': corrected when T exceeds its threshold and "
        "the pull exceeds 1 nat. λ̂ ± s.e. over 8 chains; a flag names why an estimate is "
        "not healthy.", "", *markdown_table(HEADER, rows)]) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "gradient_correction.md", text)
    print(text)


if __name__ == "__main__":
    main()
