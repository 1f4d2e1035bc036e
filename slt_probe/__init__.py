"""slt_probe: the local learning coefficient (effective parameter count) of a network."""
from importlib.metadata import PackageNotFoundError, version

from .api import estimate_llc
from .calibration import Calibration, CalibrationError, CalibrationGrid, calibrate
from .core.diagnostics import ess_bulk, ess_tail, excess_ratio, rank_rhat
from .core.estimator import DrawRecord, LLCAccumulator, LLCResult, llc_from_losses
from .core.memory_plan import MemoryBudgetError, MemoryPlan
from .core.record import EstimateRecord
from .core.samplers import SGLD, SGNHT, RMSPropSGLD, Sampler, SamplerState
from .core.settings import EstimateSettings, default_nbeta
from .probe import LLCProbe, llc_trajectory, log_spaced_steps
from .quadratic_baseline import QuadraticLLC, quadratic_llc
from .refined import estimate_restricted
from .reports import plot_calibration, plot_trace, plot_trajectory

try:
    __version__ = version("slt-probe")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["estimate_llc", "estimate_restricted", "EstimateSettings", "default_nbeta",
           "LLCResult", "EstimateRecord", "LLCAccumulator",
           "llc_from_losses", "SGLD", "RMSPropSGLD", "SGNHT", "Sampler", "SamplerState",
           "LLCProbe", "llc_trajectory", "log_spaced_steps", "plot_trajectory", "plot_trace",
           "plot_calibration", "quadratic_llc", "QuadraticLLC", "calibrate", "Calibration",
           "CalibrationError", "CalibrationGrid", "DrawRecord", "rank_rhat", "ess_bulk",
           "ess_tail", "excess_ratio", "MemoryBudgetError", "MemoryPlan", "__version__"]
