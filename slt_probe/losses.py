"""Loss functions as the estimator needs them: a batch mean and a per-example form.

"gaussian_nll" is ½‖y − f(x)‖² per example: the negative log-likelihood of unit-variance
Gaussian noise, the loss under which the known-λ regression truths are stated.
L_n must be an average of per-example losses; the per-example form lets the estimator
compute L_n(w*) exactly once and read the control variate L_b(w*) for any minibatch b
by indexing, instead of a forward pass per draw.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

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


def _ce_per_example(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target, reduction="none")


def _callable_per_example(fn: LossFn) -> Callable[[Tensor, Tensor], Tensor]:
    def per_example(output: Tensor, target: Tensor) -> Tensor:
        return torch.stack([fn(output[i:i + 1], target[i:i + 1]).reshape(())
                            for i in range(len(output))])
    return per_example


def resolve_loss(loss_fn) -> Loss:
    if isinstance(loss_fn, str):
        if loss_fn == "cross_entropy":
            return Loss("cross_entropy", F.cross_entropy, _ce_per_example, vectorised=True)
        if loss_fn == "mse":
            return Loss("mse", _mse, _mse_per_example, vectorised=True)
        if loss_fn == "gaussian_nll":
            return Loss("gaussian_nll", _gaussian_nll, _gaussian_nll_per_example, vectorised=True)
        raise ValueError("loss_fn must be 'cross_entropy', 'mse', 'gaussian_nll' or a callable; "
                         f"got {loss_fn!r}")
    if callable(loss_fn):
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        return Loss(name, loss_fn, _callable_per_example(loss_fn))
    raise TypeError(f"loss_fn must be a string or a callable (output, target) -> loss; "
                    f"got {type(loss_fn).__name__}")
