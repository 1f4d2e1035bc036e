"""Loss functions as the estimator needs them: a batch mean and a per-example form.

"gaussian_nll" is ½‖y − f(x)‖² per example: the negative log-likelihood of unit-variance
Gaussian noise, the loss under which the known-λ regression truths are stated.
L_n must be an average of per-example losses; the per-example form lets the estimator
compute L_n(w*) exactly once and read the control variate L_b(w*) for any minibatch b
by indexing, instead of a forward pass per draw.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Loss:
    name: str
    batch: LossFn  # (output, target) -> scalar mean loss
    per_example: Callable[[Tensor, Tensor], Tensor]  # (output, target) -> (B,)
    # per_example is one tensor op over the whole batch (built-ins), not a Python loop, so
    # the sampler may run it once on all chains' flattened outputs.
    vectorised: bool = False


def _mse_target(output: Tensor, target: Tensor) -> Tensor:
    if target.shape != output.shape:
        if target.numel() == output.numel():
            return target.reshape(output.shape).to(output.dtype)
        raise ValueError(f"mse: model output shape {tuple(output.shape)} does not match "
                         f"target shape {tuple(target.shape)}")
    return target.to(output.dtype)


def _mse(output: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(output, _mse_target(output, target))


def _mse_per_example(output: Tensor, target: Tensor) -> Tensor:
    sq = (output - _mse_target(output, target)).square()
    return sq.reshape(len(sq), -1).mean(dim=1)


def _gaussian_nll_per_example(output: Tensor, target: Tensor) -> Tensor:
    sq = (output - _mse_target(output, target)).square()
    return 0.5 * sq.reshape(len(sq), -1).sum(dim=1)


def _gaussian_nll(output: Tensor, target: Tensor) -> Tensor:
    return _gaussian_nll_per_example(output, target).mean()


IGNORE_INDEX = -100  # targets that count for nothing (padding), as in torch and transformers


def _ce_per_example(output: Tensor, target: Tensor) -> Tensor:
    if output.dim() == 3 and target.dim() == 2:  # a sequence: mean over its counted tokens
        tokens = F.cross_entropy(output.transpose(1, 2), target, reduction="none",
                                 ignore_index=IGNORE_INDEX)
        counted = (target != IGNORE_INDEX).sum(1).clamp_min(1)
        return tokens.sum(1) / counted
    return F.cross_entropy(output, target, reduction="none")


def _ce(output: Tensor, target: Tensor) -> Tensor:
    return _ce_per_example(output, target).mean()


def _next_token_per_example(output: Tensor, target: Tensor) -> Tensor:
    if output.dim() != 3 or target.dim() != 2:
        raise ValueError(f"next_token needs (batch, length, vocabulary) logits and (batch, "
                         f"length) labels, got {tuple(output.shape)} and {tuple(target.shape)}")
    return _ce_per_example(output[:, :-1], target[:, 1:])


def _next_token(output: Tensor, target: Tensor) -> Tensor:
    return _next_token_per_example(output, target).mean()


def _rows(values: Tensor, batch: int) -> Tensor | None:
    """Per-example values (B,) from a callable's output: (B,) as is, (B, …) averaged over
    the rest; None when the output is not per example (a scalar)."""
    if values.dim() >= 1 and values.shape[0] == batch and (values.dim() > 1 or batch > 1):
        return values.reshape(batch, -1).mean(dim=1)
    return None


def _callable_loss(fn) -> Loss:
    """A user loss: per-example values when it returns them (``reduction="none"``
    functions, loss modules, switched to ``reduction="none"``), else the batch mean with
    per-example values from ``vmap`` over examples (a Python loop only if that fails)."""
    name = getattr(fn, "__name__", type(fn).__name__)
    if isinstance(fn, torch.nn.Module) and getattr(fn, "reduction", None) in ("mean", "sum", "none"):
        unreduced = copy.copy(fn)
        unreduced.reduction = "none"

        def module_rows(output: Tensor, target: Tensor) -> Tensor:
            return unreduced(output, target).reshape(len(output), -1).mean(dim=1)

        return Loss(name, lambda o, t: module_rows(o, t).mean(), module_rows, vectorised=True)

    def batch_mean(output: Tensor, target: Tensor) -> Tensor:
        values = fn(output, target)
        rows = _rows(values, len(output))
        return values.reshape(()) if rows is None else rows.mean()

    def per_example(output: Tensor, target: Tensor) -> Tensor:
        values = fn(output, target)
        rows = _rows(values, len(output))
        if rows is not None:
            return rows
        single = lambda o, t: fn(o.unsqueeze(0), t.unsqueeze(0)).reshape(())  # noqa: E731
        try:
            return vmap(single)(output, target)
        except RuntimeError:  # an op without a batching rule
            return torch.stack([single(output[i], target[i]) for i in range(len(output))])

    return Loss(name, batch_mean, per_example)


def check_output_and_targets(loss: Loss, output: Tensor, y: Tensor) -> None:
    """Named errors for targets the built-in losses cannot take (before torch's own)."""
    if loss.name in ("cross_entropy", "next_token"):
        if y.dtype.is_floating_point:
            raise TypeError("cross_entropy needs integer class labels as targets, got "
                            f"{y.dtype}; use loss_fn='mse' for real-valued targets or pass "
                            "labels (y.long())")
        if output.dim() < 2:
            raise ValueError(f"cross_entropy needs one output per class, got model output of "
                             f"shape {tuple(output.shape)}")
        classes = output.shape[-1] if output.dim() == 3 else output.shape[1]
        counted = y[y != IGNORE_INDEX]
        if len(counted) == 0:
            raise ValueError(f"every target is {IGNORE_INDEX} (ignored): nothing to fit")
        low, high = int(counted.min()), int(counted.max())
        if low < 0 or high >= classes:
            raise ValueError(f"class labels must be in [0, {classes - 1}] for a model "
                             f"with {classes} outputs; got labels in [{low}, {high}]")


def resolve_loss(loss_fn) -> Loss:
    """The ``Loss`` for ``"cross_entropy"``, ``"mse"``, ``"gaussian_nll"``,
    ``"next_token"`` (a causal language model's loss: each position's logits against the
    next position's label, so the labels are the input ids themselves, as Hugging Face's
    causal-LM ``labels``; -100 is ignored) or a callable ``(output, target) -> loss`` (a
    batch mean, or per-example values).

    Examples:
        >>> resolve_loss("mse").per_example(torch.zeros(2, 3), torch.ones(2, 3)).tolist()
        [1.0, 1.0]
    """
    if isinstance(loss_fn, str):
        if loss_fn == "cross_entropy":
            return Loss("cross_entropy", _ce, _ce_per_example, vectorised=True)
        if loss_fn == "mse":
            return Loss("mse", _mse, _mse_per_example, vectorised=True)
        if loss_fn == "gaussian_nll":
            return Loss("gaussian_nll", _gaussian_nll, _gaussian_nll_per_example, vectorised=True)
        if loss_fn == "next_token":
            return Loss("next_token", _next_token, _next_token_per_example, vectorised=True)
        raise ValueError("loss_fn must be 'cross_entropy', 'mse', 'gaussian_nll', 'next_token' "
                         f"or a callable; got {loss_fn!r}")
    if callable(loss_fn):
        return _callable_loss(loss_fn)
    raise TypeError(f"loss_fn must be a string or a callable (output, target) -> loss; "
                    f"got {type(loss_fn).__name__}")


def constant_predictor_loss(loss: Loss, output: Tensor, y: Tensor) -> float | None:
    """L_n of the best constant predictor, the reference a trained network must beat.

    The constant is the log label frequencies for class targets (integer ``y`` and an
    output with one column per class: its cross-entropy is the entropy of the labels) and
    the mean target for real-valued targets of the output's shape (its squared error is the
    targets' spread about their mean). ``output`` is the model's output on a few examples
    (its shape and dtype only). None where neither applies.

    Examples:
        >>> y = torch.tensor([0, 0, 1, 1])
        >>> round(constant_predictor_loss(resolve_loss("cross_entropy"), torch.zeros(4, 2), y), 4)
        0.6931
    """
    with torch.no_grad():
        sequence = _sequence_targets(loss, output, y)
        if sequence is not None:
            return _constant_sequence_loss(sequence, output.shape[-1])
        if not y.dtype.is_floating_point and output.dim() == 2:
            classes = output.shape[1]
            if len(y) == 0 or int(y.min()) < 0 or int(y.max()) >= classes:
                return None
            freq = torch.bincount(y.reshape(-1).long(), minlength=classes).to(torch.float64)
            logits = torch.log(freq / freq.sum()).clamp_min(-1e4).to(output.dtype)
            constant = logits.expand(len(y), classes)
        elif y.dtype.is_floating_point and y.shape[1:] == output.shape[1:]:
            constant = y.double().mean(dim=0, keepdim=True).to(output.dtype).expand_as(y)
        else:
            return None
        values = torch.cat([loss.per_example(constant[i:i + 4096], y[i:i + 4096]).double()
                            for i in range(0, len(y), 4096)])
    value = float(values.mean())
    return value if math.isfinite(value) else None


def _sequence_targets(loss: Loss, output: Tensor, y: Tensor) -> Tensor | None:
    """The tokens a sequence loss scores ((batch, length) labels, shifted for next_token)."""
    if loss.name not in ("cross_entropy", "next_token") or output.dim() != 3 or y.dim() != 2:
        return None
    return y[:, 1:] if loss.name == "next_token" else y


def _constant_sequence_loss(targets: Tensor, vocabulary: int) -> float | None:
    """Each sequence's mean over its counted tokens of −log(token frequency), averaged over
    sequences: the loss of predicting the token frequencies everywhere."""
    counted = targets != IGNORE_INDEX
    tokens = targets[counted].long()
    if len(tokens) == 0 or int(tokens.min()) < 0 or int(tokens.max()) >= vocabulary:
        return None
    freq = torch.bincount(tokens, minlength=vocabulary).double()
    log_freq = torch.log(freq / freq.sum())
    scored = torch.where(counted, -log_freq[targets.clamp_min(0).long()],
                         torch.zeros((), dtype=torch.float64))
    per_sequence = scored.sum(1) / counted.sum(1).clamp_min(1)
    value = float(per_sequence.mean())
    return value if math.isfinite(value) else None


class ReferenceStats:
    """The constant predictor's loss over streamed targets, from running statistics (label
    counts; target sums and squares), for the built-in losses; None for a callable."""

    def __init__(self, loss: Loss, output: Tensor):
        self.loss, self.output = loss, output
        self.count = 0
        self.sums = self.squares = None

    def update(self, y: Tensor) -> None:
        sequence = _sequence_targets(self.loss, self.output, y)
        if sequence is not None:  # token counts: the token-weighted entropy
            y = sequence[sequence != IGNORE_INDEX]
        if self.loss.name in ("cross_entropy", "next_token"):
            counts = torch.bincount(y.reshape(-1).long(), minlength=self.output.shape[-1])
            self.sums = counts if self.sums is None else self.sums + counts
        else:
            flat = y.double().reshape(len(y), -1)
            self.sums = flat.sum(0) if self.sums is None else self.sums + flat.sum(0)
            squares = flat.square().sum(0)
            self.squares = squares if self.squares is None else self.squares + squares
        self.count += len(y)

    def value(self) -> float | None:
        if self.count == 0 or self.loss.name not in ("cross_entropy", "next_token", "mse",
                                                       "gaussian_nll"):
            return None
        if self.loss.name in ("cross_entropy", "next_token"):
            freq = self.sums.double() / self.sums.sum()
            freq = freq[freq > 0]
            return float(-(freq * freq.log()).sum())
        mean = self.sums / self.count
        variance = (self.squares / self.count - mean.square()).clamp_min(0.0)
        return float(variance.mean() if self.loss.name == "mse" else 0.5 * variance.sum())
