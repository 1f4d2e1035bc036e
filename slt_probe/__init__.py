"""slt_probe: the local learning coefficient (effective parameter count) of a network, fast."""
from .api import EstimateSettings, default_nbeta, estimate_llc
from .estimator import LLCResult, llc_from_losses
from .samplers import SGLD, SGNHT, RMSPropSGLD, Sampler

__version__ = "0.1.0"

__all__ = ["estimate_llc", "EstimateSettings", "default_nbeta", "LLCResult", "llc_from_losses",
           "SGLD", "RMSPropSGLD", "SGNHT", "Sampler", "__version__"]
