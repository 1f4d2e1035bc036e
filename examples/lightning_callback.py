"""λ̂ while PyTorch Lightning trains: one callback, logged beside the loss.

    python examples/lightning_callback.py [--quick] [--out runs/examples/lightning]

A small classifier on a noisy two-moons task; ``LLCCallback`` estimates λ̂ every 100
optimizer steps (and at log-spaced early steps) on the training set and writes it to
the trainer's CSV logger and to ``llc.csv``. Needs ``pip install "slt-probe[lightning]"``.
"""
from __future__ import annotations

import argparse
import math
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import slt_probe
from slt_probe.integrations.lightning import LLCCallback


def moons(n: int, generator: torch.Generator):
    angle = torch.rand(n, generator=generator) * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    x = torch.stack([torch.cos(angle) + label, torch.sin(angle) * (1 - 2 * label) + 0.5 * label], 1)
    return x + 0.15 * torch.randn(n, 2, generator=generator), label


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="runs/examples/lightning")
    args = parser.parse_args(argv)
    steps = 200 if args.quick else 2000
    pl.seed_everything(0, verbose=False)
    x, y = moons(2000, torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    callback = LLCCallback(                                                    # <- added
        (x, y), every=steps // 4, steps=slt_probe.log_spaced_steps(steps, 6),  # <- added
        sampler=slt_probe.SGLD(lr=1e-4, localization=100.0), num_chains=4,     # <- added
        num_draws=50 if args.quick else 200, log_dir=f"{args.out}/llc", verbose=False)
    trainer = pl.Trainer(max_steps=steps, callbacks=[callback], accelerator="cpu",
                         logger=pl.loggers.CSVLogger(args.out), enable_checkpointing=False,
                         enable_progress_bar=not args.quick, enable_model_summary=False)
    started = time.perf_counter()
    trainer.fit(Classifier(), loader)
    wall = time.perf_counter() - started
    rows = callback.probe.llc_rows()
    print(f"{len(rows)} estimates at optimizer steps {[r['step'] for r in rows]}; final "
          f"λ̂ = {rows[-1]['llc_mean']:.2f}; the callback took "
          f"{callback.probe.probe_seconds / wall:.0%} of {wall:.1f} s")
    return callback


if __name__ == "__main__":
    main()
