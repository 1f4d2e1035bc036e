"""``LLCCallback`` for the Hugging Face ``Trainer``: λ̂ of the model the trainer holds on the
probe's schedule, at ``state.global_step`` (optimizer steps: with gradient accumulation,
one per update), written to ``llc.csv`` and to the trainer's log history.
"""
from __future__ import annotations

from torch.utils.data import DataLoader

from ..core.data import as_source
from ..probe import LLCProbe
from .metrics import require, row_metrics

_transformers = require("transformers", "hf")


class LLCCallback(_transformers.TrainerCallback):
    """Estimate λ̂ while a ``transformers.Trainer`` trains.

    Args:
        data: the examples to estimate on: a dataset (or a list) of dicts as the Trainer
            uses (``input_ids``, ``attention_mask``, …, and the targets under
            ``label_key``), a DataLoader over one, or a tuple ``(inputs, labels)``.
        label_key: the field holding the targets (default ``"labels"``).
        collate_fn: how to batch the dataset's examples (e.g. the Trainer's data collator;
            default: torch's ``default_collate``).
        prefix: the logged metrics' prefix.
        **probe_kwargs: as for ``LLCProbe`` except the model. The default loss is
            cross-entropy of the output's ``logits`` against the labels (token-level for
            language models, ignoring -100); ``output=`` names another field.

    Training with the callback is bit-identical to training without it.

    Under multi-process training (``torchrun``, Accelerate) only the world's process zero
    (``state.is_world_process_zero``) estimates and writes; the other processes wait for
    it at their next synchronisation, so an estimate must finish within the process
    group's timeout. The Trainer has no hook for a failed run: after an exception, call
    ``callback.close()`` to write the rows so far and release the log folder.

    Examples:
        >>> import torch, slt_probe
        >>> examples = [{"input_ids": torch.randint(0, 30, (8,)), "labels": torch.tensor(1)}
        ...             for _ in range(64)]
        >>> callback = LLCCallback(examples, every=50, num_draws=100,
        ...                        sampler=slt_probe.SGLD(lr=1e-5, localization=100.0))
        >>> callback.source.n
        64
        >>> # transformers.Trainer(model=..., args=..., train_dataset=examples,
        >>> #                      callbacks=[callback]).train()
    """

    def __init__(self, data, *, label_key: str = "labels", collate_fn=None,
                 prefix: str = "llc", **probe_kwargs):
        if isinstance(data, tuple):  # (inputs, labels); a list is a dataset of examples
            self.source = as_source(data)
        else:
            loader = data if isinstance(data, DataLoader) else DataLoader(
                data, batch_size=64, collate_fn=collate_fn)
            self.source = as_source(loader, stream=probe_kwargs.pop("stream", None),
                                    label_key=label_key)
        self.prefix = prefix
        self.probe_kwargs = probe_kwargs
        self.user_on_estimate = probe_kwargs.pop("on_estimate", None)
        self.probe: LLCProbe | None = None
        self._state = None

    def _emit(self, step: int, row: dict) -> None:
        if self._state is not None:
            self._state.log_history.append({"step": step, **row_metrics(row, self.prefix)})
        if self.user_on_estimate is not None:
            self.user_on_estimate(step, row)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        self._state = state
        self.probe = LLCProbe(model, self.source, on_estimate=self._emit, **self.probe_kwargs)
        self.probe.maybe_estimate(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.probe is not None:
            self.probe.maybe_estimate(state.global_step)

    def close(self) -> None:
        """Write the rows so far and release the log folder (after a failed run)."""
        if self.probe is not None:
            self.probe.close()

    def on_train_end(self, args, state, control, **kwargs):
        if self.probe is not None:
            self.probe.detach()

    @property
    def history(self) -> list[dict]:
        return self.probe.history if self.probe is not None else []
