"""slt_probe: the local learning coefficient (effective parameter count) of a network, fast."""
from .api import EstimateSettings, default_nbeta, estimate_llc
from .calibration import Calibration, CalibrationGrid, calibrate
from .estimator import LLCResult, llc_from_losses
from .probe import LLCProbe, llc_trajectory, log_spaced_steps, read_rows
from .reports import plot_trace, plot_trajectory
from .samplers import SGLD, SGNHT, RMSPropSGLD, Sampler

__version__ = "0.1.0"

__all__ = ["estimate_llc", "EstimateSettings", "default_nbeta", "LLCResult", "llc_from_losses",
           "SGLD", "RMSPropSGLD", "SGNHT", "Sampler", "LLCProbe", "llc_trajectory",
           "log_spaced_steps", "read_rows", "plot_trajectory", "plot_trace", "calibrate",
           "Calibration", "CalibrationGrid", "__version__"]
