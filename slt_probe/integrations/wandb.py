"""``WandbSink``: λ̂ and its diagnostics logged to Weights & Biases at the training step.

Use as ``LLCProbe(..., on_estimate=WandbSink())`` inside an active ``wandb.init`` run.
"""
from __future__ import annotations

from .metrics import require, row_metrics

_wandb = require("wandb", "wandb")


class WandbSink:
    """Logs ``llc/mean``, ``llc/std``, ``llc/effective_params``, the health and locality
    diagnostics through ``wandb.log(..., step=step)``.

    The values also carry ``llc/step`` and the ``llc/*`` charts are drawn against it, so
    estimates that arrive late (a probe with ``sampler="auto"`` estimates its kept steps
    after calibrating) land at their own step; W&B drops the ``step=`` of such rows, as it
    drops any step below the run's current one.

    Args:
        run: a W&B run (default: the active ``wandb.run``).
        prefix: the metric prefix.

    Raises:
        RuntimeError: no active run.

    Examples:
        >>> import os, tempfile, wandb
        >>> os.environ["WANDB_MODE"] = "offline"; os.environ["WANDB_SILENT"] = "true"
        >>> run = wandb.init(project="doc", dir=tempfile.mkdtemp())
        >>> WandbSink(run)(10, {"llc_mean": 3.2, "healthy": True})
        >>> run.finish()
    """

    def __init__(self, run=None, *, prefix: str = "llc"):
        self.run = run or _wandb.run
        if self.run is None:
            raise RuntimeError("no active W&B run: call wandb.init() first or pass run=")
        self.prefix = prefix
        self.run.define_metric(f"{prefix}/step")
        self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")

    def __call__(self, step: int, row: dict) -> None:
        values = {f"{self.prefix}/step": step, **row_metrics(row, self.prefix)}
        if step >= self.run.step:
            self.run.log(values, step=step)
        else:
            self.run.log(values)
