"""``LLCCallback`` for PyTorch Lightning: λ̂ of the LightningModule on the probe's schedule,
at ``trainer.global_step`` (optimizer steps, so gradient accumulation counts once per
update), written to ``llc.csv`` and to the trainer's loggers.
"""
from __future__ import annotations

from ..probe import LLCProbe
from .metrics import require, row_metrics

_pl = require("lightning.pytorch", "lightning")


class LLCCallback(_pl.Callback):
    """Estimate λ̂ while a ``lightning.pytorch.Trainer`` fits.

    Args:
        data: what to estimate on: a tuple ``(x, y)``, a Dataset or a DataLoader; ``None``
            uses the datamodule's ``train_dataloader()``.
        prefix: the logged metrics' prefix (``llc/mean``, ``llc/std``, …).
        **probe_kwargs: as for ``LLCProbe`` except the model (settings, loss_fn, output,
            every, steps, log_dir, on_estimate, at_start, calibrate_at, sampler,
            num_chains, …).

    Training with the callback is bit-identical to training without it: parameters,
    gradients, modes and every RNG stream are restored around each estimate.

    Under multi-process training (DDP) only global rank zero estimates and writes (the
    weights are the same on every rank); the other ranks wait for it at their next
    synchronisation, so an estimate must finish within the process group's timeout. If
    the fit raises, the rows so far are written and the log folder is released.

    Raises:
        ValueError: ``data=None`` and the fit has no datamodule.

    Examples:
        >>> import torch, slt_probe
        >>> x, y = torch.randn(256, 4), torch.randint(0, 2, (256,))
        >>> callback = LLCCallback((x, y), every=100, log_dir=None, num_draws=100,
        ...                        sampler=slt_probe.SGLD(lr=1e-4, localization=100.0))
        >>> # lightning.pytorch.Trainer(max_steps=1000, callbacks=[callback]).fit(module)
    """

    def __init__(self, data=None, *, prefix: str = "llc", **probe_kwargs):
        super().__init__()
        self.data = data
        self.prefix = prefix
        self.probe_kwargs = probe_kwargs
        self.user_on_estimate = probe_kwargs.pop("on_estimate", None)
        self.probe: LLCProbe | None = None
        self._trainer = None
        self._last_step: int | None = None

    def _data(self, trainer):
        if self.data is not None:
            return self.data
        if trainer.datamodule is None:
            raise ValueError("LLCCallback(data=None) estimates on the datamodule's "
                             "train_dataloader(), and this fit has no datamodule: pass data=")
        return trainer.datamodule.train_dataloader()

    def _emit(self, step: int, row: dict) -> None:
        metrics = row_metrics(row, self.prefix)
        for logger in self._trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self.user_on_estimate is not None:
            self.user_on_estimate(step, row)

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        self._trainer = trainer
        self.probe = LLCProbe(pl_module, self._data(trainer), on_estimate=self._emit,
                              exclude_from_copy=[trainer], **self.probe_kwargs)
        self._last_step = trainer.global_step
        self.probe.maybe_estimate(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.probe is None:
            return
        step = trainer.global_step
        if step != self._last_step:  # an optimizer step happened (not a micro-batch)
            self._last_step = step
            self.probe.maybe_estimate(step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.probe is not None:
            self.probe.detach()
            for logger in trainer.loggers:
                logger.save()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.probe is not None:
            self.probe.close()

    @property
    def history(self) -> list[dict]:
        return self.probe.history if self.probe is not None else []
