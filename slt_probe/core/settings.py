"""``EstimateSettings``: everything about an estimate except the model, the data and the loss.

One frozen object that every entry point accepts (``estimate_llc``, ``LLCProbe``,
``llc_trajectory``, ``calibrate``), so a user configures once; keyword arguments of those
entry points are the short form and override its fields (``with_overrides``). Not here:
running anything.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, is_dataclass, replace

import torch

from . import batched_model
from .checks import check_int, check_positive
from .estimator import ESTIMATORS, LOSS_ON
from .memory_plan import parse_bytes
from .samplers import SGLD, Sampler

BACKENDS = ("native", "devinterp")
PRECISIONS = tuple(batched_model.PRECISIONS)
COMPUTE_PATHS = ("auto", *batched_model.COMPUTE_PATHS)
GRADIENT_CORRECTIONS = ("auto", True, False)
# An estimate whose chains gave back more than this fraction of the gap between L_n(w*) and
# the best constant predictor's loss has left the neighbourhood of w* (``diagnostics``).
DEFAULT_MAX_EXCESS_RATIO = 0.25


def default_nbeta(num_examples: int) -> float:
    """n / log n (β = 1/log n), the WBIC temperature.

    Examples:
        >>> round(default_nbeta(1000), 2)
        144.76
    """
    if num_examples < 2:
        raise ValueError("nbeta = n/log n needs at least 2 examples; pass sampler nbeta=...")
    return num_examples / math.log(num_examples)


@dataclass(frozen=True)
class EstimateSettings:
    """How to estimate: sampler, chains, draws, data handling, checks.

    Args:
        sampler: a sampler such as ``SGLD(lr=1e-4, localization=100)``, or ``"auto"`` to
            let ``slt_probe.calibrate`` choose ε, γ, the warm-up and the chains.
        num_chains, num_draws, num_burnin: chains run in parallel, draws kept per chain,
            steps discarded before the first draw.
        batch_size: minibatch per chain and step.
        seed: seed of the estimate's private random stream.
        estimator: ``"control_variate"`` (nβ·(L_b(w_t) − L_b(w*)) on the same minibatch)
            or ``"plain"`` (devinterp's nβ·(L_b(w_t) − L_n(w*))).
        loss_on: ``"minibatch"`` or ``"full"`` (L_n on all data at every draw).
        backend: ``"native"`` (batched chains) or ``"devinterp"`` (the reference library).
        nbeta: nβ, the inverse temperature times n (default: the sampler's ``nbeta``, else
            n/log n); the one way to set it with ``sampler="auto"``.
        warmup_lr, num_warmup: steps at a coarser step size before the burn-in.
        restrict_to: parameter names (or name → boolean mask) to sample; the rest stay
            at w*.
        gradient_correction: ``True`` samples L(w) − g·(w − w*) with g = ∇L_n(w*) (for
            points that are not minima) and reports nβ·E[L(w) − L(w*) − g·(w − w*)];
            ``"auto"`` turns it on only where g is significantly larger than its own
            sampling noise and would pull the plain estimate by more than a nat
            (``slt_probe.core.gradient_evidence``); ``sampler="auto"`` decides once, at the
            calibrated γ, and the decision is held for every estimate made with it.
        max_excess_ratio: the locality limit: chains whose mean loss gave back more than
            this fraction of the gap between L_n(w*) and the best constant predictor's
            loss have left the neighbourhood of w*.
        reference_loss: the loss of a trivial predictor, the far end of that gap (default:
            the best constant predictor, computed for class and real-valued targets; give
            it for a custom loss where that cannot be computed).
        calibration_grid: what ``sampler="auto"`` searches (a ``CalibrationGrid``).
        compile: compile the batched gradient with ``torch.compile``.
        chain_batch: compute at most this many chains at once; ``"auto"`` (default) as
            many as fit ``max_memory`` (planned on the first batch, recorded in
            ``config["memory_plan"]``); ``None`` all at once. Same numbers either way.
        max_memory: the memory budget for sampling: bytes or a size like ``"8GB"``
            (default: 70 % of the GPU's free memory, 50 % of the system's available
            memory on a CPU).
        precision: ``"float32"``, ``"bfloat16"``/``"float16"`` autocast for the forward
            and backward passes (losses and λ̂ still accumulate in float32/float64), or
            ``"tf32"``: float32 tensors, TF32 matrix products (CUDA only).
        device: where to sample (default: where the model's parameters are).
        stream: ``None`` streams only data that cannot be indexed (iterable datasets) and
            reads map-style datasets into memory; ``True`` streams them too (examples
            fetched by index, never read whole); ``False`` refuses iterable data.
        compute_path: how the chains are computed: ``"auto"`` (the fastest that works for
            this model), ``"vmap"``, ``"vmap, fused attention"``, ``"vmap, math attention"`` or
            ``"loop over chains"``.

    Raises:
        TypeError, ValueError: a field of the wrong type or out of range, named.

    Examples:
        >>> s = EstimateSettings(sampler=SGLD(lr=1e-4, localization=100.0), num_chains=8)
        >>> s.with_overrides(num_draws=500).num_draws
        500
    """

    sampler: Sampler | str = SGLD()
    num_chains: int = 4
    num_draws: int = 200
    num_burnin: int = 0
    batch_size: int = 128
    seed: int = 0
    estimator: str = "control_variate"
    loss_on: str = "minibatch"
    backend: str = "native"
    nbeta: float | None = None
    warmup_lr: float | None = None
    num_warmup: int = 0
    restrict_to: object = None
    gradient_correction: bool | str = "auto"
    max_excess_ratio: float = DEFAULT_MAX_EXCESS_RATIO
    reference_loss: float | None = None
    calibration_grid: object = None
    compile: bool = False
    chain_batch: int | str | None = "auto"
    max_memory: int | str | None = None
    precision: str = "float32"
    device: str | None = None
    compute_path: str = "auto"
    stream: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.sampler, str):
            if self.sampler != "auto":
                raise ValueError(f"sampler must be a slt_probe sampler or 'auto', got "
                                 f"{self.sampler!r}")
        elif not isinstance(self.sampler, Sampler):
            raise TypeError("sampler must be a slt_probe sampler such as slt_probe.SGLD(...) "
                            f"or 'auto'; got {type(self.sampler).__name__}")
        for name, low in (("num_chains", 1), ("num_draws", 1), ("num_burnin", 0),
                          ("batch_size", 1), ("num_warmup", 0)):
            check_int(name, getattr(self, name), low)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.nbeta is not None:
            check_positive("nbeta", self.nbeta)
            if (not self.auto and self.sampler.nbeta is not None
                    and self.sampler.nbeta != self.nbeta):
                raise ValueError(f"nbeta is set twice, differently: settings nbeta="
                                 f"{self.nbeta}, sampler nbeta={self.sampler.nbeta}")
        if self.warmup_lr is not None:
            check_positive("warmup_lr", self.warmup_lr)
        if self.num_warmup and self.warmup_lr is None:
            raise ValueError("num_warmup > 0 needs warmup_lr (the warm-up's step size)")
        if self.num_warmup and self.backend != "native":
            raise ValueError("a warm-up (num_warmup > 0) runs on the native backend only")
        if not (self.gradient_correction == "auto" or isinstance(self.gradient_correction, bool)):
            raise ValueError(f"gradient_correction must be 'auto', True or False, got "
                             f"{self.gradient_correction!r}")
        if self.gradient_correction is True and self.backend != "native":
            raise ValueError("gradient_correction=True runs on the native backend only")
        check_positive("max_excess_ratio", self.max_excess_ratio)
        if self.reference_loss is not None and (
                isinstance(self.reference_loss, bool)
                or not isinstance(self.reference_loss, (int, float))
                or not math.isfinite(self.reference_loss)):
            raise ValueError(f"reference_loss must be a finite number or None, got "
                             f"{self.reference_loss!r}")
        if self.calibration_grid is not None and self.sampler != "auto":
            raise ValueError("calibration_grid applies only to sampler='auto'")
        if not isinstance(self.compile, bool):
            raise TypeError(f"compile must be True or False, got {self.compile!r}")
        if self.chain_batch not in (None, "auto"):
            check_int("chain_batch", self.chain_batch, 1)
        if self.max_memory is not None:
            parse_bytes(self.max_memory)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.stream not in (None, True, False):
            raise ValueError(f"stream must be None, True or False, got {self.stream!r}")
        if self.compute_path not in COMPUTE_PATHS:
            raise ValueError(f"compute_path must be one of {COMPUTE_PATHS}, got "
                             f"{self.compute_path!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"device {self.device!r} is not a torch device: {err}") from None

    @property
    def auto(self) -> bool:
        return isinstance(self.sampler, str)

    def with_overrides(self, **overrides) -> "EstimateSettings":
        """A copy with the named fields replaced; an unknown name is a TypeError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown setting(s) {unknown}; EstimateSettings has {sorted(known)}")
        return replace(self, **overrides) if overrides else self

    def resolve_nbeta(self, num_examples: int) -> tuple[float, str]:
        """(nβ, where it came from: "settings", "sampler" or "n/log n")."""
        if self.nbeta is not None:
            return self.nbeta, "settings"
        if not self.auto and self.sampler.nbeta is not None:
            return self.sampler.nbeta, "sampler"
        return default_nbeta(num_examples), "n/log n"

    def warmup_sampler(self) -> Sampler | None:
        """The sampler with its step size replaced by ``warmup_lr`` (None without one)."""
        return replace(self.sampler, lr=self.warmup_lr) if self.num_warmup else None

    def to_dict(self) -> dict:
        restrict = self.restrict_to
        if isinstance(restrict, dict):  # masks: how many weights of each parameter
            restrict = {name: int(torch.as_tensor(mask).bool().sum())
                        for name, mask in sorted(restrict.items())}
        elif restrict is not None:
            restrict = sorted(restrict)
        return {"sampler": self.sampler if self.auto else self.sampler.to_dict(),
                "num_chains": self.num_chains, "num_draws": self.num_draws,
                "num_burnin": self.num_burnin, "batch_size": self.batch_size,
                "seed": self.seed, "estimator": self.estimator, "loss_on": self.loss_on,
                "backend": self.backend, "nbeta": self.nbeta, "warmup_lr": self.warmup_lr,
                "num_warmup": self.num_warmup, "restrict_to": restrict,
                "gradient_correction": self.gradient_correction,
                "max_excess_ratio": self.max_excess_ratio,
                "reference_loss": self.reference_loss,
                "calibration_grid": (asdict(self.calibration_grid)
                                     if is_dataclass(self.calibration_grid) else None),
                "compile": self.compile,
                "chain_batch": self.chain_batch, "max_memory": self.max_memory,
                "precision": self.precision,
                "device": None if self.device is None else str(self.device),
                "compute_path": self.compute_path, "stream": self.stream}


def resolve_settings(settings: EstimateSettings | None, overrides: dict) -> EstimateSettings:
    """``settings`` (default ``EstimateSettings()``) with keyword overrides applied."""
    if settings is not None and not isinstance(settings, EstimateSettings):
        raise TypeError(f"settings must be an EstimateSettings, got {type(settings).__name__}")
    return (settings or EstimateSettings()).with_overrides(**overrides)
