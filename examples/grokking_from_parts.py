"""How a grokking run is put together from the library's parts: a bundled model, its data,
an optimizer, and the probe attached to the training loop.

    python examples/grokking_from_parts.py [--steps 6000] [--out runs/examples/grokking]
    python examples/grokking_from_parts.py --mnist-dir DIR --setup mnist-mlp

The probe's sampler is "auto": it keeps the weights of every scheduled step, calibrates
once on the trained weights when the loop ends (`detach`), and estimates every kept step
with that one sampler, so the trajectory compares like with like.
"""
from __future__ import annotations

import argparse

import torch

import slt_probe
from slt_probe.core.losses import resolve_loss
from slt_probe.experiments.presets import (
    build_model,
    build_task,
    make_optimizer,
    preset,
)
from slt_probe.experiments.training import evaluate


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--setup", default="modadd-mlp", choices=["modadd-mlp", "mnist-mlp"])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--draws", type=int, default=None, help="SGLD draws per estimate "
                        "(default: the preset's)")
    parser.add_argument("--mnist-dir", default=None)
    parser.add_argument("--out", default="runs/examples/grokking")
    args = parser.parse_args(argv)

    config = preset(args.setup, quick=True)
    task = build_task(config, seed=0, mnist_dir=args.mnist_dir)  # train/test split
    model = build_model(config, "relu" if args.setup == "mnist-mlp" else "gelu", seed=0)
    targets = task.targets(task.y_train, config.loss)  # labels, or one-hot for MSE
    optimizer = make_optimizer(config, model)  # the preset's Adam/AdamW, lr, weight decay
    settings = config.regime_settings("local")  # sampler="auto", the preset's draws
    if args.draws is not None:
        settings = settings.with_overrides(num_draws=args.draws)
    probe = slt_probe.LLCProbe(
        model, (task.x_train, targets), settings, loss_fn=config.loss,
        steps=slt_probe.log_spaced_steps(args.steps, 15), every=args.steps // 10,
        log_dir=args.out, verbose=False)

    loss_fn = resolve_loss(config.loss).batch  # the loss the probe samples with
    generator = torch.Generator().manual_seed(1)
    with probe.attach(optimizer):  # the one added line; the estimates run when it ends
        for step in range(1, args.steps + 1):
            batch = torch.randint(0, len(task.x_train), (config.batch_size,), generator=generator)
            loss = loss_fn(model(task.x_train[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % (args.steps // 20) == 0:
                probe.log(step, **evaluate(model, task, config.loss))
    for row in probe.history:
        if row.get("llc_mean") is not None and row.get("test_acc") is not None:
            print(f"step {row['step']:6d}  λ̂ {row['llc_mean']:7.2f} ± {row['llc_std']:.2f}  "
                  f"excess ratio {row['excess_ratio'] or float('nan'):.2f}  "
                  f"train acc {row['train_acc']:.2f}  test acc {row['test_acc']:.2f}")
    cal = probe.calibration.sampler
    print(f"one sampler for all: SGLD ε = {cal.lr:.3g}, γ = {cal.localization:g}, "
          f"nβ = {probe.calibration.nbeta:.4g}")
    slt_probe.plot_trajectory(probe.history, metrics=["train_acc", "test_acc"],
                              path=f"{args.out}/trajectory.png")


if __name__ == "__main__":
    main()
