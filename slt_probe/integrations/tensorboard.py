"""``TensorBoardSink``: λ̂ and its diagnostics as TensorBoard scalars at the training step.

Use as ``LLCProbe(..., on_estimate=TensorBoardSink(writer))`` or pass it to a callback.
"""
from __future__ import annotations

import os

from .metrics import require, row_metrics

_tensorboard = require("torch.utils.tensorboard", "tensorboard")


class TensorBoardSink:
    """Writes ``llc/mean``, ``llc/std``, ``llc/effective_params``, the health and locality
    diagnostics at each estimate's step.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``, or a folder (a path) for one
            the sink creates (default: one in ``log_dir``).
        log_dir: where a writer the sink creates writes.
        prefix: the tag prefix.

    Raises:
        ValueError: neither a writer nor a log_dir.

    Examples:
        >>> import tempfile
        >>> sink = TensorBoardSink(log_dir=tempfile.mkdtemp())
        >>> sink(10, {"llc_mean": 3.2, "llc_std": 0.4, "healthy": True})
        >>> sink.close()
    """

    def __init__(self, writer=None, *, log_dir=None, prefix: str = "llc"):
        if isinstance(writer, (str, os.PathLike)):
            writer, log_dir = None, writer
        if writer is None and log_dir is None:
            raise ValueError("give a SummaryWriter or a log_dir for one")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer must be a SummaryWriter (or a folder path), got "
                            f"{type(writer).__name__}")
        self.writer = writer or _tensorboard.SummaryWriter(log_dir=str(log_dir))
        self.prefix = prefix

    def __call__(self, step: int, row: dict) -> None:
        for tag, value in row_metrics(row, self.prefix).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
