"""How a grokking run is put together from the library's parts (what `slt-probe grokking`
does, without its bookkeeping): a bundled model, its data, an optimizer, and the probe.

    python examples/grokking_from_parts.py [--steps 6000] [--out results/examples/grokking]
    python examples/grokking_from_parts.py --mnist-dir ../shared/data/mnist --setup mnist-mlp

The sampler is the setup's preset (held fixed over the whole run, so the trajectory
compares like with like); change `llc` below to try your own.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

import slt_probe
from slt_probe.losses import resolve_loss
from slt_probe.experiments.grokking import (build_model, build_task, evaluate,
                                            make_optimizer, preset)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--setup", default="modadd-mlp", choices=["modadd-mlp", "mnist-mlp"])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--draws", type=int, default=None, help="SGLD draws per estimate "
                        "(default: the preset's; burn-in is set to the same number)")
    parser.add_argument("--mnist-dir", default=None)
    parser.add_argument("--out", default="results/examples/grokking")
    args = parser.parse_args(argv)

    config = preset(args.setup, quick=True)
    task = build_task(config, seed=0, mnist_dir=args.mnist_dir)  # train/test split
    model = build_model(config, "relu" if args.setup == "mnist-mlp" else "gelu", seed=0)
    targets = task.targets(task.y_train, config.loss)  # labels, or one-hot for MSE
    optimizer = make_optimizer(config, model)  # the preset's Adam/AdamW, lr, weight decay
    llc = config.llc
    if args.draws is not None:
        llc = replace(llc, num_draws=args.draws, num_burnin=args.draws)
    probe = slt_probe.LLCProbe(
        model, (task.x_train, targets), loss_fn=config.loss,
        steps=slt_probe.log_spaced_steps(args.steps, 15), every=args.steps // 10,
        sampler=llc.sampler(), num_chains=llc.num_chains, num_draws=llc.num_draws,
        num_burnin=llc.num_burnin, batch_size=llc.batch_size, log_dir=args.out, verbose=False)

    loss_fn = resolve_loss(config.loss).batch  # the loss the probe samples with
    generator = torch.Generator().manual_seed(1)
    with probe.attach(optimizer):  # the one added line; estimates run after scheduled steps
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
                  f"train acc {row['train_acc']:.2f}  test acc {row['test_acc']:.2f}")
    slt_probe.plot_trajectory(probe.history, metrics=["train_acc", "test_acc"],
                              path=f"{args.out}/trajectory.png")


if __name__ == "__main__":
    main()
