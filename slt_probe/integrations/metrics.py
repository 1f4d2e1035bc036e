"""The scalars an ``llc.csv`` row hands to a logger, under one prefix.

Not here: any logging framework (their modules in this package).
"""
from __future__ import annotations

import importlib
import math

from ..run_log import RESTRICTION_COLUMN

# row column -> metric name (after the prefix); booleans become 0/1
METRICS = {"llc_mean": "mean", "llc_std": "std", "llc_sem": "sem",
           "effective_params": "effective_params", "excess_ratio": "excess_ratio",
           "mean_sampled_loss": "mean_sampled_loss", "init_loss": "init_loss",
           "healthy": "healthy", "local": "local", "rhat": "rhat", "ess": "ess",
           "num_diverged": "num_diverged", "seconds": "seconds"}
# a restriction's metric suffixes (``LLCProbe(restrictions=...)``), by column kind
RESTRICTION_SUFFIX = {"llc": "", "llc_sem": "_sem", "healthy": "_healthy"}


def row_metrics(row: dict, prefix: str = "llc") -> dict[str, float]:
    """``{f"{prefix}/{name}": value}`` for every numeric value of the row; a restriction's
    columns ``llc[head0]``, ``llc_sem[head0]``, ``healthy[head0]`` become
    ``{prefix}/head0``, ``{prefix}/head0_sem``, ``{prefix}/head0_healthy``.

    Examples:
        >>> row_metrics({"step": 3, "llc_mean": 1.5, "healthy": True, "rhat": None})
        {'llc/mean': 1.5, 'llc/healthy': 1.0}
        >>> row_metrics({"llc[head0]": 2.0, "llc_sem[head0]": 0.1})
        {'llc/head0': 2.0, 'llc/head0_sem': 0.1}
    """
    out = {}
    names = dict(METRICS)
    for column in row:
        match = RESTRICTION_COLUMN.fullmatch(column)
        if match:
            kind, restriction = match.groups()
            names[column] = restriction + RESTRICTION_SUFFIX[kind]
    for column, name in names.items():
        value = row.get(column)
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"{prefix}/{name}"] = float(value)
    return out


def require(module: str, extra: str):
    """Import ``module`` or fail with the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this integration needs {module.split('.')[0]}: "
                          f'pip install "slt-probe[{extra}]"') from err
