"""How an estimate was made: a typed record built by the engine, read by the result's
row (``run_log.row_from_result``), its JSON and the summaries.

``EstimateRecord`` holds the settings actually used (the calibrated sampler, the held
gradient correction), what the data and nβ were, the correction decision with the
statistic behind it, the computation path with its timings and memory plan, and the
calibration that chose the sampler. ``to_dict`` flattens it into the keys of
``LLCResult.config`` (the settings' fields, overridden by what ran). Not here: running
anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: settings and calibration both import the estimator
    from ..calibration import Calibration
    from .settings import EstimateSettings


@dataclass(frozen=True)
class CorrectionDecision:
    """Whether the gradient correction was applied, the setting that asked, why not where
    it could not be (``note``), and the evidence it rests on (``gradient_evidence``'s
    summary: ‖g‖, the noise statistic and its threshold, the pull and its threshold)."""

    applied: bool
    setting: bool | str
    evidence: dict = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict:
        return {"gradient_correction": self.applied,
                "gradient_correction_setting": self.setting,
                "gradient_correction_note": self.note, **self.evidence}


@dataclass(frozen=True)
class ComputeRecord:
    """Which computation path ran, why, how fast each candidate was, how many chains it
    computed at once, in which precision on which device, and the memory plan."""

    path: str
    note: str
    seconds_per_step: dict
    chains_at_once: int
    compiled: bool
    precision: str
    device: str
    memory_plan: dict | None

    def to_dict(self) -> dict:
        return {"compute_path": self.path, "compute_path_note": self.note,
                "compute_path_seconds_per_step": dict(self.seconds_per_step),
                "chains_at_once": self.chains_at_once, "compiled": self.compiled,
                "precision": self.precision, "device": self.device,
                "memory_plan": self.memory_plan}


@dataclass
class EstimateRecord:
    """How one estimate was made (see the module docstring)."""

    settings: EstimateSettings
    num_examples: int
    batch_size_drawn: int
    nbeta: float
    nbeta_source: str
    num_params: int
    num_sampled_params: int
    loss_fn: str
    data: str  # "in memory" or "streamed"
    correction: CorrectionDecision
    compute: ComputeRecord
    seconds: float = 0.0  # the chains' (the target was prepared before they started)
    calibration: Calibration | None = field(default=None, repr=False)  # its table is long
    calibrated_on: str | None = None
    restriction: str | None = None
    restrictions_in_run: int | None = None

    @property
    def sampler(self):
        return self.settings.sampler

    def to_dict(self) -> dict:
        """The flat ``config`` form: the settings' fields, then what was measured and run
        (nβ, the correction applied, precision and device are what ran, not the request)."""
        record = {**self.settings.to_dict(), "num_examples": self.num_examples,
                  "batch_size_drawn": self.batch_size_drawn, "nbeta": self.nbeta,
                  "nbeta_source": self.nbeta_source, "num_params": self.num_params,
                  "num_sampled_params": self.num_sampled_params, "loss_fn": self.loss_fn,
                  "data": self.data, **self.correction.to_dict(), **self.compute.to_dict(),
                  "seconds": self.seconds}
        if self.calibration is not None:
            record["calibration"] = self.calibration.to_dict()
            if self.calibrated_on is not None:
                record["calibration"]["calibrated_on"] = self.calibrated_on
        if self.restriction is not None:
            record.update(restriction=self.restriction,
                          restrictions_in_run=self.restrictions_in_run)
        return record
