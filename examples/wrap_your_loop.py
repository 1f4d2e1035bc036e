"""Wrap an existing training loop with one line and log λ̂ as it trains.

    python examples/wrap_your_loop.py [--quick] [--out results/examples/wrap_your_loop]

A small MLP learns a noisy two-moons-like classification; the probe estimates λ̂ at
log-spaced steps (early training moves fast) and every 100 steps, and the loop logs
its own metrics into the same rows. Nothing in the loop changes except the marked lines.
Early on the network is not at a minimum of its loss, so chains slide downhill and λ̂ is
negative; the diagnostics of those rows say so ("draws fall below L(w*)").
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import slt_probe


def make_data(n: int, generator: torch.Generator):
    angle = torch.rand(n, generator=generator) * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    x = torch.stack([torch.cos(angle) + label, torch.sin(angle) * (1 - 2 * label) + 0.5 * label], 1)
    return x + 0.15 * torch.randn(n, 2, generator=generator), label


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps and draws")
    parser.add_argument("--out", default="results/examples/wrap_your_loop")
    args = parser.parse_args(argv)
    steps, draws = (300, 60) if args.quick else (3000, 200)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = make_data(2000, g)
    x_test, y_test = make_data(1000, g)
    model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    probe = slt_probe.LLCProbe(                                             # <- added
        model, data=(x, y), loss_fn="cross_entropy", every=steps // 3,      # <- added
        steps=slt_probe.log_spaced_steps(steps, num=8),                     # <- added
        sampler=slt_probe.SGLD(lr=1e-4, localization=100.0), num_chains=4,  # <- added
        num_draws=draws, log_dir=args.out, verbose=not args.quick)          # <- added
    probe.attach(optimizer)                                                 # <- added

    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step in probe.scheduled_steps:
            with torch.no_grad():
                test_acc = (model(x_test).argmax(1) == y_test).float().mean()
            probe.log(step, train_loss=loss.item(), test_acc=test_acc.item())  # <- added

    probe.detach()
    slt_probe.plot_trajectory(probe.history, metrics=("train_loss", "test_acc"),
                              path=f"{args.out}/trajectory.png", title="λ̂ while training")
    cost = probe.overhead
    last = [r for r in probe.history if r.get("llc_mean") is not None][-1]
    print(f"{len([r for r in probe.history if r.get('llc_mean') is not None])} estimates; "
          f"final λ̂ = {last['llc_mean']:.2f} (effective parameters {last['effective_params']:.1f}); "
          f"probe took {cost['fraction']:.0%} of the wall time")
    return probe


if __name__ == "__main__":
    main()
