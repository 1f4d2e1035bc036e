"""``LLCProbe``: log λ̂ (and the effective parameter count 2λ̂) while a model trains;
``llc_trajectory``: the same over saved checkpoints.

One object, one call site: ``probe.attach(optimizer)`` registers a step post-hook that
estimates on a schedule and leaves training bit-identical (global RNG streams, the
model's parameters, gradients and train/eval mode are restored around every estimate).
Rows go to ``log_dir/llc.csv`` as soon as they exist; a probe re-created on the same
``log_dir`` resumes without duplicating steps. Not here: the estimator (``engine``), the
files (``run_log``), plotting (``reports``).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import Calibration, calibrate_target
from .core.batched_model import BatchedModel
from .core.data import as_source
from .core.engine import run_estimate
from .core.losses import resolve_loss
from .core.record import CorrectionDecision
from .core.settings import EstimateSettings, resolve_settings
from .core.target import Target
from .executors import Task, make_executor
from .refined import run_restricted
from .run_log import (
    LLC_COLUMNS,
    TrajectoryLog,
    restriction_columns,
    row_from_result,
    versions,
)
from .state import preserved_state

logger = logging.getLogger("slt_probe")
PENDING_DIR = "pending"


def log_spaced_steps(last_step: int, num: int = 40, first_step: int = 1) -> list[int]:
    """About ``num`` distinct integer steps spaced evenly in log(step), from first to last.

    Examples:
        >>> log_spaced_steps(1000, num=4)
        [1, 10, 100, 1000]
    """
    if last_step < first_step or first_step < 1 or num < 1:
        raise ValueError(f"need 1 <= first_step <= last_step and num >= 1; got "
                         f"first_step={first_step}, last_step={last_step}, num={num}")
    grid = np.geomspace(first_step, last_step, num)
    return sorted({int(round(s)) for s in grid})


def _checked_restrictions(restrictions, settings: EstimateSettings) -> dict:
    if not restrictions:
        return {}
    if not isinstance(restrictions, Mapping):
        raise TypeError("restrictions must map a name to what restrict_to takes, got "
                        f"{type(restrictions).__name__}")
    if settings.restrict_to is not None:
        raise ValueError("give restrict_to or restrictions, not both: the row's λ̂ is the "
                         "whole model's, the restrictions' are its columns")
    for name in restrictions:
        if not isinstance(name, str) or not name or any(c in name for c in "[]/,"):
            raise ValueError(f"restriction names must be non-empty strings without '[', "
                             f"']', '/' or ',' (they name columns and metrics), got {name!r}")
    return dict(restrictions)


class LLCProbe:
    """Estimate λ̂ of ``model`` on ``data`` every ``every`` optimizer steps (and/or at
    ``steps``).

    Args:
        model: the model being trained.
        data: the training data: a DataLoader, a map-style Dataset or a tuple ``(x, y)``.
        settings: an ``EstimateSettings``; keyword ``**overrides`` replace its fields.
        loss_fn, output: as for ``estimate_llc``.
        every: estimate after every ``every``-th optimizer step (None: only ``steps``).
        steps: further steps to estimate at (e.g. ``log_spaced_steps(10_000)``).
        log_dir: folder for ``llc.csv`` and ``manifest.json`` (None: keep rows in memory).
        at_start: estimate at step 0 (when attached).
        calibrate_at: with ``sampler="auto"``, the step whose weights the calibration runs
            on (default: the last weights, when the probe is detached). Until then the
            weights of every scheduled step are kept (under ``log_dir/pending/``, or in
            memory without a log_dir) and estimated right after the calibration, so the
            whole trajectory shares one sampler chosen on a trained network; training is
            never blocked before that step.
        resume_changed_settings: continue a ``log_dir`` that holds a run with other
            settings (otherwise an error names the differing fields); the manifest records
            from which step on each set of settings applies.
        on_estimate: called as ``on_estimate(step, row)`` after every estimate, with the
            values written to ``llc.csv`` (TensorBoard and W&B sinks in
            ``slt_probe.integrations`` are such callables).
        exclude_from_copy: objects the model refers to that the probe's private copy of
            it must not copy (a training framework's trainer).
        restrictions: name → what ``restrict_to`` takes (e.g.
            ``slt_probe.restrictions.attention_heads(model)``): at every estimate, each
            restriction's λ̂ too, all in one batched run with the probe's sampler, as
            columns ``llc[name]``, ``llc_sem[name]`` and ``healthy[name]`` of the row
            (loggers get ``llc/name``).
        verbose: progress bars.

    One probe writes a ``log_dir`` at a time: a second writer (another process, or
    another probe) is refused until the first is detached or ends.

    Every estimate uses the same sampler and seed, so differences along the trajectory
    are not blurred by fresh sampling noise (common random numbers). A calibration
    recorded in ``log_dir/manifest.json`` is reused when the probe resumes there.

    Examples:
        >>> import torch, slt_probe
        >>> net = torch.nn.Linear(2, 2)
        >>> x, y = torch.randn(64, 2), torch.randint(0, 2, (64,))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> probe = slt_probe.LLCProbe(net, (x, y), every=2, num_draws=5, num_chains=2,
        ...                            verbose=False).attach(opt)
        >>> for _ in range(4):
        ...     opt.zero_grad(); torch.nn.functional.cross_entropy(net(x), y).backward(); opt.step()
        >>> probe.detach()
        >>> [row["step"] for row in probe.history]
        [0, 2, 4]
    """

    def __init__(self, model: nn.Module, data, settings: EstimateSettings | None = None, *,
                 loss_fn="cross_entropy", output=None, every: int | None = 200,
                 steps: Iterable[int] | None = None, log_dir: str | Path | None = None,
                 at_start: bool = True, calibrate_at: int | None = None,
                 resume_changed_settings: bool = False, on_estimate=None,
                 exclude_from_copy=(), restrictions: Mapping[str, object] | None = None,
                 verbose: bool = True, **overrides):
        if data is None:
            raise ValueError("data is required: the probe estimates λ̂ on the training data")
        if on_estimate is not None and not callable(on_estimate):
            raise TypeError(f"on_estimate must be callable (step, row), got "
                            f"{type(on_estimate).__name__}")
        self.on_estimate = on_estimate
        if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                                  or every <= 0):
            raise ValueError(f"every must be a positive int (or None with steps=...), got {every!r}")
        if every is None and steps is None:
            raise ValueError("give every=N, steps=[...], or both")
        self.model = model
        self.every = every
        self.scheduled_steps = set(int(s) for s in steps) if steps is not None else set()
        if any(s < 0 for s in self.scheduled_steps):
            raise ValueError("steps must be >= 0")
        self.at_start = at_start
        self.verbose = verbose
        self.settings = resolve_settings(settings, overrides)
        if calibrate_at is not None and not self.settings.auto:
            raise ValueError("calibrate_at applies only to sampler='auto'")
        if calibrate_at is not None and (isinstance(calibrate_at, bool)
                                         or not isinstance(calibrate_at, int) or calibrate_at < 0):
            raise ValueError(f"calibrate_at must be a step >= 0, got {calibrate_at!r}")
        self.calibrate_at = calibrate_at
        self.restrictions = _checked_restrictions(restrictions, self.settings)
        self.calibration: Calibration | None = None
        self._pending: dict[int, object] = {}  # step -> state_dict or its file
        self.source = as_source(data, stream=self.settings.stream)
        self.batched = BatchedModel.for_settings(model, resolve_loss(loss_fn), self.settings,
                                                 output=output, exclude_from_copy=exclude_from_copy)
        self.step_count = 0
        self.probe_seconds = 0.0
        self._attached_at: float | None = None
        self._handle = None
        request = {"settings": self.settings.to_dict(), "loss_fn": self.batched.loss.name,
                   "num_examples": self.source.n, "num_params": self.batched.dim}
        manifest = {"started_at": datetime.now(timezone.utc).isoformat(), "request": request,
                    "settings": self.settings.to_dict(), "every": every,
                    "steps": sorted(self.scheduled_steps), "versions": versions(),
                    "restrictions": sorted(self.restrictions)}
        self._log = TrajectoryLog(log_dir, manifest, allow_changed=resume_changed_settings)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        held = self._log.manifest().get("gradient_correction_held") if log_dir else None
        if held is not None and self.settings.gradient_correction == "auto":
            self.settings = replace(self.settings, gradient_correction=held["applied"])
        if self.settings.auto and self.log_dir is not None:
            recorded = self._log.manifest().get("calibration")
            if recorded is not None:
                self.use_calibration(Calibration.from_dict(recorded))
            for path in sorted((self.log_dir / PENDING_DIR).glob("step_*.pt")):
                self._pending[int(path.stem.split("_")[1])] = path

    @property
    def num_params(self) -> int:
        return self.batched.dim

    def use_calibration(self, calibration: Calibration, step: int | None = None) -> None:
        """Hold the sampler of a ``slt_probe.calibrate`` result fixed for every estimate;
        ``step``: the step whose weights it ran on (recorded with its correction decision;
        None when re-read from the manifest, which already holds it)."""
        self.calibration = calibration
        self.settings = calibration.apply(self.settings)
        self._log.update_manifest(settings=self.settings.to_dict(),
                                      calibration=calibration.to_dict())
        if step is not None:
            self._log.update_manifest(calibrated_at_step=step)
            self._record_held_correction(calibration.gradient_correction, step,
                                         calibration.gradient_evidence)

    # -- schedule -------------------------------------------------------------------
    def due(self, step: int) -> bool:
        if self._log.has_llc(step) or step in self._pending:
            return False
        if step == 0:
            return self.at_start
        return step in self.scheduled_steps or (self.every is not None and step % self.every == 0)

    # -- estimating -----------------------------------------------------------------
    def estimate(self, step: int) -> dict:
        """Estimate now and record it as ``step`` (training state is left untouched). Before
        an automatic calibration has run, keep the weights to estimate later instead."""
        if self.settings.auto:
            self._keep(step)
            return self.row(step)
        return self._estimate_state(step, self.model.state_dict())

    def target_at(self, state) -> Target:
        """The probe's prepared problem at the weights ``state``: its batched model and
        data, built once, with w* and its point measured for these weights (not kept
        between estimates: on a large model w* and ∇L_n(w*) are two copies of it)."""
        return Target.prepare(self.batched, self.source, self.settings, state)

    def _estimate_state(self, step: int, state) -> dict:
        started = time.perf_counter()
        with preserved_state(self.model):
            target = self.target_at(state)
            result = run_estimate(target, self.settings, verbose=self.verbose,
                                  desc=f"LLC step {step}")
            if self.settings.gradient_correction == "auto":
                self._hold_correction(result.record.correction, step)
            restricted = run_restricted(
                target, self.settings, self.restrictions, verbose=self.verbose,
                desc=f"LLC step {step}, {len(self.restrictions)} restrictions"
            ) if self.restrictions else {}
        seconds = time.perf_counter() - started
        self.probe_seconds += seconds
        row = row_from_result(result, seconds)
        for name, value in restricted.items():
            row.update(restriction_columns(name, value))
        return self.record(step, row)

    def _hold_correction(self, decision: CorrectionDecision, step: int) -> None:
        """One estimator per trajectory: with an explicit sampler, ``"auto"`` is decided at
        the first estimate and held for every later one (recorded in the manifest)."""
        self.settings = replace(self.settings, gradient_correction=decision.applied)
        self._record_held_correction(decision.applied, step, decision.evidence)

    def _record_held_correction(self, applied: bool, step: int, evidence: dict) -> None:
        self._log.update_manifest(gradient_correction_held={
            "applied": applied, "decided_at_step": step, "evidence": evidence})

    def record(self, step: int, values: dict) -> dict:
        """Write an estimate made elsewhere (``row_from_result``) as ``step``'s row."""
        row = self._log.update(step, values)
        if self.on_estimate is not None:
            self.on_estimate(step, dict(row))
        return row

    def _keep(self, step: int) -> None:
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        if self.log_dir is None:
            self._pending[step] = state
            return
        folder = self.log_dir / PENDING_DIR
        folder.mkdir(exist_ok=True)
        path = folder / f"step_{step:09d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        self._pending[step] = path

    def calibrate_on_state(self, state, step: int, *, verbose: bool) -> Calibration:
        """Calibrate on the weights ``state`` (those of ``step``) and hold the result."""
        started = time.perf_counter()
        with preserved_state(self.model):
            calibration = calibrate_target(self.target_at(state), self.settings,
                                           verbose=verbose)
        self.probe_seconds += time.perf_counter() - started
        self.use_calibration(calibration, step=step)
        return calibration

    def calibrate_now(self) -> Calibration:
        """Calibrate on the model's current weights, then estimate every kept step. Blocks
        until done (a progress bar with the calibration's step budget and the kept steps
        shows how long)."""
        if not self.settings.auto:
            raise RuntimeError("the probe's sampler is already fixed")
        logger.info("slt_probe: calibrating on the weights at step %d (training waits); "
                    "%d kept steps follow", self.step_count, len(self._pending))
        calibration = self.calibrate_on_state(self.model.state_dict(), self.step_count,
                                              verbose=self.verbose)
        for step in tqdm(sorted(self._pending), desc="LLC of kept steps",
                         disable=not self.verbose, leave=False):
            kept = self._pending.pop(step)
            self._estimate_state(step, read_checkpoint(kept, step))
            if isinstance(kept, Path):
                kept.unlink()
        return calibration

    def maybe_estimate(self, step: int) -> dict | None:
        """For loops without an optimizer object: estimate if ``step`` is on the schedule."""
        self.step_count = step
        if self.settings.auto and self.calibrate_at is not None and step >= self.calibrate_at:
            self.calibrate_now()
        return self.estimate(step) if self.due(step) else None

    def log(self, step: int, **metrics) -> None:
        """Add user metrics (train_loss=..., test_acc=...) to the row of ``step``; they reach
        the CSV with the next estimate or on ``detach()`` (no file write per call)."""
        clean = {}
        for key, value in metrics.items():
            if key in LLC_COLUMNS:
                raise ValueError(f"metric name {key!r} is reserved for the probe's own columns")
            clean[key] = float(value) if isinstance(value, (torch.Tensor, np.generic)) else value
        self._log.update(int(step), clean, flush=False)

    # -- hook -----------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer, start_step: int = 0) -> "LLCProbe":
        """Estimate after every scheduled optimizer step; ``start_step`` resumes a count."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._handle is not None:
            raise RuntimeError("probe is already attached; call detach() first")
        self._log.ensure_locked()
        self._attached_at = time.perf_counter()
        self.step_count = start_step
        self._handle = optimizer.register_step_post_hook(self._after_step)
        self.maybe_estimate(start_step)
        return self

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.maybe_estimate(self.step_count + 1)

    def detach(self) -> None:
        """Remove the hook, run a pending automatic calibration on the final weights (and
        estimate the kept steps), write any metrics logged since the last estimate, and
        release the log folder for another writer."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        try:
            if self.settings.auto and self._pending:
                self.calibrate_now()
            self._log.flush()
        finally:
            self._log.release()

    def close(self) -> None:
        """Remove the hook, write the rows so far and release the log folder, without the
        pending calibration ``detach`` would run: the way out after training failed."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        try:
            self._log.flush()
        finally:
            self._log.release()

    def __enter__(self) -> "LLCProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- reporting ------------------------------------------------------------------
    @property
    def history(self) -> list[dict]:
        """Every row so far (one per step with an estimate or logged metrics), by step."""
        return self._log.history()

    def row(self, step: int) -> dict:
        """A copy of the row of ``step`` (empty if there is none)."""
        return dict(self._log.rows.get(step, {}))

    def llc_rows(self) -> list[dict]:
        """The rows that hold an estimate."""
        return [r for r in self.history if r.get("llc_mean") is not None]

    @property
    def overhead(self) -> dict:
        """Seconds spent estimating vs wall time since attach."""
        wall = time.perf_counter() - self._attached_at if self._attached_at else float("nan")
        return {"probe_seconds": self.probe_seconds, "wall_seconds": wall,
                "fraction": self.probe_seconds / wall if wall and wall > 0 else float("nan")}


class Trajectory(list):
    """λ̂ over checkpoints: the rows (this list, by step), and the settings and calibration
    behind them."""

    def __init__(self, rows: list[dict], settings: EstimateSettings,
                 calibration: Calibration | None):
        super().__init__(rows)
        self.settings = settings
        self.calibration = calibration

    @property
    def rows(self) -> list[dict]:
        return list(self)

    def manifest(self) -> dict:
        return {"settings": self.settings.to_dict(),
                "calibration": None if self.calibration is None else self.calibration.to_dict()}


def read_checkpoint(checkpoint, step: int, load: Callable = torch.load) -> Mapping:
    """The state_dict of a checkpoint: the dict itself, or ``load(path)``."""
    state = load(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint for step {step} is not a state_dict or a path")
    return state


def checkpoint_row(model: nn.Module, checkpoint, data, settings: EstimateSettings, *,
                   loss_fn, output, load: Callable, step: int) -> tuple[int, dict]:
    """One checkpoint's ``llc.csv`` row, as a task of a sweep executor: the target is
    prepared here (``model``'s architecture at the checkpoint's weights; ``model`` itself
    is not touched); the driver writes the row."""
    state = read_checkpoint(checkpoint, step, load)
    started = time.perf_counter()
    target = Target.of(model, data, settings, loss_fn=loss_fn, output=output, state=state)
    result = run_estimate(target, settings, verbose=False)
    return step, row_from_result(result, time.perf_counter() - started)


def llc_trajectory(model: nn.Module, checkpoints: Iterable, data,
                   settings: EstimateSettings | None = None, *,
                   steps: Iterable[int] | None = None, loss_fn="cross_entropy", output=None,
                   calibrate_on: int = -1, log_dir: str | Path | None = None,
                   verbose: bool = True, load: Callable = torch.load, executor=None,
                   **overrides) -> Trajectory:
    """λ̂ over saved checkpoints (state_dicts or paths) with one sampler for all.

    Args:
        model: supplies the architecture; it is left as it was.
        checkpoints: state_dicts or paths to them.
        data, settings, loss_fn, output, **overrides: as for ``estimate_llc``.
        steps: the step of each checkpoint (default 0, 1, 2, …).
        calibrate_on: with ``sampler="auto"``, the index of the checkpoint the one
            calibration runs on (default: the last, the most trained).
        log_dir: rows go to ``log_dir/llc.csv``; steps already there are skipped.
        verbose: a progress bar over checkpoints.
        executor: ``None`` estimates the checkpoints here, one after another;
            ``"serial"``, ``"ray"`` or an executor from ``slt_probe.executors`` runs each
            checkpoint as an independent task (one thread each; on Ray, paths must be
            readable by the workers). The calibration runs first, here; rows are
            written by this process only. The same seed gives the same rows on every
            executor.

    Returns:
        The rows, one per checkpoint, by step: a ``Trajectory`` (a list) that also holds
        the settings used (``.settings``) and the calibration (``.calibration``).

    Raises:
        ValueError, TypeError: no checkpoints, steps that do not match them, or a
            checkpoint that is not a state_dict or a path.

    Examples:
        >>> import torch, slt_probe
        >>> net = torch.nn.Linear(2, 2)
        >>> x, y = torch.randn(64, 2), torch.randint(0, 2, (64,))
        >>> states = [{k: v * s for k, v in net.state_dict().items()} for s in (0.5, 1.0)]
        >>> rows = slt_probe.llc_trajectory(net, states, (x, y), steps=[10, 20],
        ...                                 num_draws=5, num_chains=2, verbose=False)
        >>> [r["step"] for r in rows], all("excess_ratio" in r for r in rows)
        ([10, 20], True)
    """
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("checkpoints is empty")
    steps = list(range(len(checkpoints))) if steps is None else [int(s) for s in steps]
    if len(steps) != len(checkpoints):
        raise ValueError(f"got {len(steps)} steps for {len(checkpoints)} checkpoints")
    if executor is not None and overrides.get("restrictions"):
        raise ValueError("restrictions are estimated here, with the probe's batched model; "
                         "leave executor=None to estimate them along checkpoints")
    probe = LLCProbe(model, data, settings, loss_fn=loss_fn, output=output, every=None,
                     steps=steps, log_dir=log_dir, verbose=False, **overrides)
    try:
        if probe.settings.auto:
            step = steps[calibrate_on]
            probe.calibrate_on_state(read_checkpoint(checkpoints[calibrate_on], step, load),
                                     step, verbose=verbose)
        todo = [(step, checkpoint) for step, checkpoint in zip(steps, checkpoints)
                if not probe._log.has_llc(step)]
        if executor is not None and probe.settings.gradient_correction == "auto" and todo:
            # the first estimate decides the correction for all (one estimator per curve)
            step, checkpoint = todo.pop(0)
            probe._estimate_state(step, read_checkpoint(checkpoint, step, load))
        if executor is None:
            for step, checkpoint in tqdm(todo, desc="checkpoints", disable=not verbose):
                probe._estimate_state(step, read_checkpoint(checkpoint, step, load))
        else:
            runner = make_executor(executor) if isinstance(executor, str) else executor
            tasks = [Task(checkpoint_row, dict(model=model, checkpoint=checkpoint, data=data,
                                               settings=probe.settings, loss_fn=loss_fn,
                                               output=output, load=load, step=step),
                          label=f"checkpoint of step {step}")
                     for step, checkpoint in todo]
            runner.map(tasks, desc="checkpoints", verbose=verbose,
                       on_result=lambda outcome: probe.record(*outcome.value))
    finally:
        probe.detach()
    return Trajectory(rows=probe.history, settings=probe.settings,
                      calibration=probe.calibration)
