"""Two-process CPU DDP fit (gloo) with the LLC callback: run as a script, as Lightning's
DDP launcher starts the second rank by re-running this command.

    python tests/scripts/lightning_ddp.py LOG_DIR
"""
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import slt_probe
from slt_probe.integrations.lightning import LLCCallback


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main(log_dir: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = (x[:, 0] > 0).long()
    callback = LLCCallback((x, y), every=10, log_dir=log_dir, num_draws=40, num_chains=2,
                           sampler=slt_probe.SGLD(lr=1e-4, localization=100.0), verbose=False)
    trainer = pl.Trainer(max_steps=20, strategy="ddp", accelerator="cpu", devices=2,
                         callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Classifier(), DataLoader(TensorDataset(x, y), batch_size=32))
    print(f"rank {trainer.global_rank}: probe {'built' if callback.probe else 'not built'}, "
          f"{len(callback.history)} rows", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
