"""``LLCProbe``: log λ̂ (and the effective parameter count 2λ̂) while a model trains.

One object, one call site: ``probe.attach(optimizer)`` registers a step post-hook that
estimates on a schedule and leaves training bit-identical (global RNG streams, the
model's parameters, gradients and train/eval mode are restored around every estimate).
Rows go to ``log_dir/llc.csv`` as soon as they exist; a probe re-created on the same
``log_dir`` resumes without duplicating steps. ``llc_trajectory`` does the same over saved
checkpoints. Not here: the estimator itself (``api``), plotting (``reports``).
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .api import EstimateSettings, run_estimate
from .batching import as_tensors
from .losses import resolve_loss
from .samplers import SGLD, Sampler
from .stacked import StackedModel

CSV_NAME = "llc.csv"
MANIFEST_NAME = "manifest.json"
LLC_COLUMNS = ["step", "llc_mean", "llc_std", "llc_sem", "effective_params", "init_loss",
               "nbeta", "healthy", "rhat", "ess", "num_diverged", "seconds"]


def log_spaced_steps(last_step: int, num: int = 40, first_step: int = 1) -> list[int]:
    """About ``num`` distinct integer steps spaced evenly in log(step), from first to last."""
    if last_step < first_step or first_step < 1 or num < 1:
        raise ValueError(f"need 1 <= first_step <= last_step and num >= 1; got "
                         f"first_step={first_step}, last_step={last_step}, num={num}")
    grid = np.geomspace(first_step, last_step, num)
    return sorted({int(round(s)) for s in grid})


@contextmanager
def preserved_state(model: nn.Module):
    """Restore global RNG streams, the model's parameters, grads and modes on exit."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    py_state = random.getstate()
    np_state = np.random.get_state()
    modes = [m.training for m in model.modules()]
    params = [(p, p.detach().clone(), None if p.grad is None else p.grad.clone())
              for p in model.parameters()]
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(py_state)
        np.random.set_state(np_state)
        for module, mode in zip(model.modules(), modes):
            module.training = mode
        with torch.no_grad():
            for p, value, grad in params:
                if not torch.equal(p, value):
                    p.copy_(value)
                if grad is None:
                    p.grad = None
                elif p.grad is None or not torch.equal(p.grad, grad):
                    p.grad = grad


class TrajectoryLog:
    """Rows keyed by step, rewritten atomically to CSV on ``flush`` (after every estimate;
    metrics logged between estimates are written with the next one or on detach)."""

    def __init__(self, log_dir: str | Path | None, manifest: dict):
        self.rows: dict[int, dict] = {}
        self.path = None
        if log_dir is None:
            return
        log_dir = Path(log_dir)
        if log_dir.exists() and not log_dir.is_dir():
            raise ValueError(f"log_dir {log_dir} exists and is a file, not a directory")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / CSV_NAME
        if self.path.exists():
            for row in read_rows(self.path):
                self.rows[int(row["step"])] = row
        manifest_path = log_dir / MANIFEST_NAME
        if manifest_path.exists():
            previous = json.loads(manifest_path.read_text())
            previous.setdefault("resumed_at", []).append(manifest["started_at"])
            manifest = previous
        manifest_path.write_text(json.dumps(manifest, indent=1))

    def has_llc(self, step: int) -> bool:
        value = self.rows.get(step, {}).get("llc_mean")
        return value is not None and value != ""

    def update(self, step: int, values: Mapping, *, flush: bool = True) -> dict:
        row = self.rows.setdefault(step, {"step": step})
        row.update(values)
        if flush:
            self.flush()
        return row

    def history(self) -> list[dict]:
        return [self.rows[s] for s in sorted(self.rows)]

    def flush(self) -> None:
        if self.path is None:
            return
        rows = self.history()
        columns = list(LLC_COLUMNS)
        for row in rows:
            columns += [k for k in row if k not in columns]
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)


def read_rows(path: str | Path) -> list[dict]:
    """Rows of an llc.csv with numbers parsed (empty cells become None)."""
    def parse(value: str):
        if value == "":
            return None
        if value in ("True", "False"):
            return value == "True"
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in value and "e" not in value else number

    with open(path, newline="") as fh:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _versions() -> dict:
    from . import __version__
    return {"slt_probe": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


class LLCProbe:
    """Estimate λ̂ of ``model`` on ``data`` every ``every`` optimizer steps (and/or at ``steps``).

    Every estimate uses the same sampler and seed, so differences along the trajectory
    are not blurred by fresh sampling noise (common random numbers).
    """

    def __init__(self, model: nn.Module, data, *, loss_fn="cross_entropy",
                 every: int | None = 200, steps: Iterable[int] | None = None,
                 sampler: Sampler | str | None = None, num_chains: int = 4,
                 num_draws: int = 200, num_burnin: int = 0, batch_size: int = 128,
                 seed: int = 0, estimator: str = "control_variate", restrict_to=None,
                 log_dir: str | Path | None = None, at_start: bool = True,
                 compile: bool = False, verbose: bool = True):
        if data is None:
            raise ValueError("data is required: the probe estimates λ̂ on the training data")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                                  or every <= 0):
            raise ValueError(f"every must be a positive int (or None with steps=...), got {every!r}")
        if every is None and steps is None:
            raise ValueError("give every=N, steps=[...], or both")
        self.model = model
        self.every = every
        self.steps = set(int(s) for s in steps) if steps is not None else set()
        if any(s < 0 for s in self.steps):
            raise ValueError("steps must be >= 0")
        self.at_start = at_start
        self.verbose = verbose
        self.restrict_to = restrict_to
        if isinstance(sampler, str) and sampler != "auto":
            raise ValueError(f"sampler must be a slt_probe sampler or 'auto', got {sampler!r}")
        # "auto": calibrate once, at the first estimate, then hold the sampler fixed.
        self._needs_calibration = sampler == "auto"
        self.calibration = None
        self.settings = EstimateSettings(sampler=SGLD() if sampler in (None, "auto") else sampler,
                                         num_chains=num_chains, num_draws=num_draws,
                                         num_burnin=num_burnin, batch_size=batch_size,
                                         seed=seed, estimator=estimator)
        self.x, self.y = as_tensors(data)
        self.stacked = StackedModel(model, resolve_loss(loss_fn), compile=compile)
        self.step_count = 0
        self.probe_seconds = 0.0
        self._attached_at: float | None = None
        self._handle = None
        manifest = {"started_at": datetime.now(timezone.utc).isoformat(),
                    "settings": self.settings.to_dict(), "loss_fn": self.stacked.loss.name,
                    "every": every, "steps": sorted(self.steps), "num_examples": len(self.x),
                    "num_params": self.stacked.dim, "versions": _versions()}
        self.log_file = TrajectoryLog(log_dir, manifest)
        self.log_dir = Path(log_dir) if log_dir is not None else None

    def use_calibration(self, calibration) -> None:
        """Hold the sampler of a ``slt_probe.calibrate`` result fixed for every estimate."""
        self.calibration = calibration
        self._needs_calibration = False
        self.settings = calibration.apply(self.settings)
        if self.log_dir is not None:
            path = self.log_dir / MANIFEST_NAME
            manifest = json.loads(path.read_text())
            manifest["settings"] = self.settings.to_dict()
            manifest["calibration"] = calibration.to_dict()
            path.write_text(json.dumps(manifest, indent=1))

    # -- schedule -------------------------------------------------------------------
    def due(self, step: int) -> bool:
        if self.log_file.has_llc(step):
            return False
        if step == 0:
            return self.at_start
        return step in self.steps or (self.every is not None and step % self.every == 0)

    # -- estimating -----------------------------------------------------------------
    def estimate(self, step: int) -> dict:
        """Estimate now and record it as ``step`` (training state is left untouched)."""
        started = time.perf_counter()
        if self._needs_calibration:
            from .calibration import calibrate

            with preserved_state(self.model):
                self.use_calibration(calibrate(
                    self.model, (self.x, self.y), batch_size=self.settings.batch_size,
                    seed=self.settings.seed, estimator=self.settings.estimator,
                    restrict_to=self.restrict_to, verbose=self.verbose, stacked=self.stacked))
        with preserved_state(self.model):
            w_star = self.stacked.load_state(self.model.state_dict())
            result = run_estimate(self.stacked, w_star, self.x, self.y, self.settings,
                                  restrict_to=self.restrict_to, verbose=self.verbose,
                                  desc=f"LLC step {step}")
        seconds = time.perf_counter() - started
        self.probe_seconds += seconds
        return self.log_file.update(step, row_from_result(result, seconds))

    def maybe_estimate(self, step: int) -> dict | None:
        """For loops without an optimizer object: estimate if ``step`` is on the schedule."""
        self.step_count = step
        return self.estimate(step) if self.due(step) else None

    def log(self, step: int, **metrics) -> None:
        """Add user metrics (train_loss=..., test_acc=...) to the row of ``step``; they reach
        the CSV with the next estimate or on ``detach()`` (no file write per call)."""
        clean = {}
        for key, value in metrics.items():
            if key in LLC_COLUMNS:
                raise ValueError(f"metric name {key!r} is reserved for the probe's own columns")
            clean[key] = float(value) if isinstance(value, (torch.Tensor, np.generic)) else value
        self.log_file.update(int(step), clean, flush=False)

    # -- hook -----------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer, start_step: int = 0) -> "LLCProbe":
        """Estimate after every scheduled optimizer step; ``start_step`` resumes a count."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._handle is not None:
            raise RuntimeError("probe is already attached; call detach() first")
        self._attached_at = time.perf_counter()
        self.step_count = start_step
        self._handle = optimizer.register_step_post_hook(self._after_step)
        self.maybe_estimate(start_step)
        return self

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.maybe_estimate(self.step_count + 1)

    def detach(self) -> None:
        """Remove the hook and write any metrics logged since the last estimate."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.log_file.flush()

    def __enter__(self) -> "LLCProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- reporting ------------------------------------------------------------------
    @property
    def history(self) -> list[dict]:
        return self.log_file.history()

    @property
    def overhead(self) -> dict:
        """Seconds spent estimating vs wall time since attach."""
        wall = time.perf_counter() - self._attached_at if self._attached_at else float("nan")
        return {"probe_seconds": self.probe_seconds, "wall_seconds": wall,
                "fraction": self.probe_seconds / wall if wall and wall > 0 else float("nan")}


def row_from_result(result, seconds: float) -> dict:
    d = result.diagnostics
    return {"llc_mean": result.llc_mean, "llc_std": result.llc_std, "llc_sem": result.llc_sem,
            "effective_params": result.effective_params, "init_loss": result.init_loss,
            "nbeta": result.nbeta, "healthy": d["healthy"],
            "rhat": d["rhat"] if math.isfinite(d["rhat"]) else None,
            "ess": d["ess"] if math.isfinite(d["ess"]) else None,
            "num_diverged": d["num_diverged"], "seconds": seconds}


def llc_trajectory(model: nn.Module, checkpoints: Iterable, data, *, steps: Iterable[int] | None = None,
                   loss_fn="cross_entropy", sampler: Sampler | str | None = None,
                   calibrate_on: int = -1, num_chains: int = 4,
                   num_draws: int = 200, num_burnin: int = 0, batch_size: int = 128,
                   seed: int = 0, estimator: str = "control_variate", restrict_to=None,
                   log_dir: str | Path | None = None, compile: bool = False,
                   verbose: bool = True, load: Callable = torch.load) -> list[dict]:
    """λ̂ over saved checkpoints (state_dicts or paths) with one sampler for all.

    ``model`` supplies the architecture; it is left as it was. Rows (one per checkpoint,
    at ``steps`` or 0, 1, 2, …) go to ``log_dir/llc.csv`` when given; steps already there
    are skipped. ``sampler="auto"`` calibrates once on checkpoint ``calibrate_on`` (default:
    the last, the most trained) and holds that sampler fixed for all of them.
    """
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("checkpoints is empty")
    steps = list(range(len(checkpoints))) if steps is None else [int(s) for s in steps]
    if len(steps) != len(checkpoints):
        raise ValueError(f"got {len(steps)} steps for {len(checkpoints)} checkpoints")
    auto = sampler == "auto"
    probe = LLCProbe(model, data, loss_fn=loss_fn, every=None, steps=steps,
                     sampler=None if auto else sampler,
                     num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin,
                     batch_size=batch_size, seed=seed, estimator=estimator,
                     restrict_to=restrict_to, log_dir=log_dir, compile=compile, verbose=False)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def load_checkpoint(checkpoint, step):
        state = load(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
        if not isinstance(state, Mapping):
            raise TypeError(f"checkpoint for step {step} is not a state_dict or a path")
        model.load_state_dict(state)

    try:
        if auto:
            from .calibration import calibrate

            load_checkpoint(checkpoints[calibrate_on], steps[calibrate_on])
            probe.use_calibration(calibrate(model, data, loss_fn=loss_fn,
                                            batch_size=batch_size, seed=seed,
                                            estimator=estimator, restrict_to=restrict_to,
                                            verbose=verbose, stacked=probe.stacked))
        for step, checkpoint in tqdm(list(zip(steps, checkpoints)), desc="checkpoints",
                                     disable=not verbose):
            if probe.log_file.has_llc(step):
                continue
            load_checkpoint(checkpoint, step)
            probe.estimate(step)
    finally:
        model.load_state_dict(original)
    return probe.history
