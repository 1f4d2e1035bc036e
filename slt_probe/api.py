"""``estimate_llc``: one estimate of λ̂ at a model's current weights, from one call."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .calibration import Calibration, calibrate_target
from .core.engine import run_estimate
from .core.estimator import LLCResult
from .core.settings import EstimateSettings, resolve_settings
from .core.target import Target


def estimate_llc(model: nn.Module, data, settings: EstimateSettings | None = None, *,
                 loss_fn="cross_entropy", output=None, label_key: str | None = None,
                 verbose: bool = True, **overrides) -> LLCResult:
    """Estimate the local learning coefficient λ̂ of ``model`` at its current weights w*.

    λ̂ = nβ·(E[L_n(w)] − L_n(w*)) under the localised tempered posterior
    exp(−nβ·L_n(w) − γ/2·‖w − w*‖²), sampled with all chains batched. nβ = n/log n unless
    the sampler sets ``nbeta``. ``sampler="auto"`` first runs ``slt_probe.calibrate`` and
    records its choice and evidence in ``result.record.calibration``.

    Args:
        model: any ``torch.nn.Module``; it is evaluated in eval mode on a private copy.
        data: a tuple ``(x, y)`` of tensors (``x`` may be a dict of tensors), a Dataset,
            an IterableDataset or a DataLoader (see ``EstimateSettings.stream``).
        settings: an ``EstimateSettings`` (default ``EstimateSettings()``).
        loss_fn: ``"cross_entropy"``, ``"mse"``, ``"gaussian_nll"`` or a callable
            ``(output, target) -> loss`` (a batch mean or per-example values).
        output: which part of the model's output is the prediction when it is not a
            tensor: an index, a key or a callable (default: a dict's or Hugging Face
            ``ModelOutput``'s ``"logits"``, a tuple's first element).
        label_key: for a dataset of dicts, the field holding the targets (default
            ``"labels"`` or ``"label"``, whichever is there).
        verbose: show a progress bar.
        **overrides: fields of ``EstimateSettings`` (``sampler=``, ``num_chains=``, …),
            the short form of ``settings``.

    Returns:
        An ``LLCResult`` with λ̂, its spread across chains, the traces, the diagnostics and
        every setting used (``result.config``).

    Raises:
        TypeError, ValueError: bad model, data, loss or settings, named.
        RuntimeError: every chain diverged.

    The user's model, its gradients and the global RNG are left exactly as they were.

    Examples:
        >>> import torch, slt_probe
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(500, 3); y = x @ torch.ones(3, 1) + torch.randn(500, 1)
        >>> net = torch.nn.Linear(3, 1, bias=False)
        >>> _ = net.weight.data.copy_(torch.linalg.lstsq(x, y).solution.T)
        >>> r = slt_probe.estimate_llc(net, (x, y), loss_fn="gaussian_nll", num_draws=300,
        ...                            sampler=slt_probe.SGLD(lr=1e-3, localization=1.0),
        ...                            verbose=False)
        >>> 1.0 < r.llc_mean < 2.0   # a regular model with d = 3: λ = 3/2
        True
    """
    prepared = prepare(model, data, resolve_settings(settings, overrides), loss_fn=loss_fn,
                       output=output, label_key=label_key, verbose=verbose)
    result = run_estimate(prepared.target, prepared.settings, verbose=verbose)
    result.record.calibration = prepared.calibration
    return result


@dataclass
class Prepared:
    """What an estimate needs before its chains run: the target (batched model, data
    source, w*, its point and nβ), and the settings with a concrete sampler (calibrated
    when it was "auto", with the calibration)."""

    target: Target
    settings: EstimateSettings
    calibration: Calibration | None


def prepare(model: nn.Module, data, settings: EstimateSettings, *, loss_fn, output,
            label_key: str | None, verbose: bool) -> Prepared:
    """Resolve the loss and the data, build the target once, and calibrate on it when the
    sampler is "auto" (shared by ``estimate_llc`` and ``estimate_restricted``)."""
    target = Target.of(model, data, settings, loss_fn=loss_fn, output=output,
                       label_key=label_key)
    calibration = None
    if settings.auto:
        calibration = calibrate_target(target, settings, verbose=verbose)
        settings = calibration.apply(settings)
    return Prepared(target, settings, calibration)
