"""λ̂ in TensorBoard and Weights & Biases from a bare training loop: the probe's
``on_estimate`` feeds a sink, one per logger.

    python examples/tensorboard_and_wandb.py [--quick] [--out runs/examples/sinks]
    tensorboard --logdir runs/examples/sinks/tensorboard

W&B runs offline here (``WANDB_MODE=offline``; ``wandb sync`` uploads it later). Needs
``pip install "slt-probe[tensorboard,wandb]"``.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
import wandb

import slt_probe
from slt_probe.integrations.tensorboard import TensorBoardSink
from slt_probe.integrations.wandb import WandbSink


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="runs/examples/sinks")
    args = parser.parse_args(argv)
    steps = 100 if args.quick else 1000
    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(project="slt-probe-example", dir=args.out)
    board = TensorBoardSink(log_dir=f"{args.out}/tensorboard")
    sinks = (board, WandbSink(run))

    torch.manual_seed(0)
    x = torch.randn(1000, 10)
    y = (x[:, :3].sum(1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = slt_probe.LLCProbe(model, (x, y), every=steps // 5, num_draws=50,
                               sampler=slt_probe.SGLD(lr=1e-4, localization=100.0),
                               on_estimate=lambda step, row: [s(step, row) for s in sinks],
                               log_dir=f"{args.out}/llc", verbose=False)
    probe.attach(optimizer)
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            run.log({"train_loss": loss.item()}, step=step)
    probe.detach()
    board.close()
    run.finish()
    print(f"{len(probe.llc_rows())} estimates in TensorBoard ({args.out}/tensorboard) and "
          f"W&B ({run.dir})")
    return probe


if __name__ == "__main__":
    main()
