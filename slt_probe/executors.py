"""Where a sweep's independent tasks run: in this process one after another, or on Ray.

A task is a picklable function and its keyword arguments; it returns what the sweep
writes, and only the caller (the driver process) writes files, so no two workers ever
write one file. Both executors run every task with the same number of threads, so a Ray
sweep gives the serial sweep's numbers. A task that fails (an exception, or a worker that
dies) is retried once; one that fails twice is reported with its inputs while the sweep
keeps every other result. Not here: what the tasks are (``experiments``).
"""
from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

EXECUTORS = ("serial", "ray")


@dataclass
class Task:
    """One unit of a sweep: ``fn(**kwargs)``, with a label for progress and errors."""

    fn: Callable
    kwargs: dict
    label: str
    threads: int = 1


@dataclass
class Outcome:
    task: Task
    value: object = None
    error: str | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None


class SweepFailed(RuntimeError):
    """Some tasks failed twice; ``outcomes`` holds every task's result or error."""

    def __init__(self, failed: list[Outcome], outcomes: list[Outcome]):
        self.outcomes = outcomes
        lines = [f"{o.task.label} ({o.attempts} attempts; inputs "
                 f"{ {k: v for k, v in o.task.kwargs.items() if _short(v)} }): "
                 f"{o.error.strip().splitlines()[-1]}" for o in failed]
        super().__init__(f"{len(failed)} of {len(outcomes)} tasks failed after a retry; the "
                         "others finished:\n  " + "\n  ".join(lines))


def _short(value) -> bool:
    return isinstance(value, (str, int, float, bool, type(None))) or (
        isinstance(value, (list, tuple)) and len(value) <= 8)


def run_task(task: Task):
    """Run one task with its own thread count (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(task.threads)
    try:
        return task.fn(**task.kwargs)
    finally:
        torch.set_num_threads(previous)


class SerialExecutor:
    """Every task in this process, in order."""

    name = "serial"

    def map(self, tasks: list[Task], *, desc: str = "tasks", verbose: bool = True,
            on_result: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        outcomes = []
        for task in tqdm(tasks, desc=desc, disable=not verbose):
            outcome = _attempt(task)
            if not outcome.ok:
                outcome = _attempt(task, attempts=2)
            if on_result is not None and outcome.ok:
                on_result(outcome)
            outcomes.append(outcome)
        return _checked(outcomes)


def _attempt(task: Task, attempts: int = 1) -> Outcome:
    try:
        return Outcome(task, value=run_task(task), attempts=attempts)
    except Exception:  # noqa: BLE001 - a task's failure is reported, the sweep goes on
        return Outcome(task, error=traceback.format_exc(), attempts=attempts)


def _checked(outcomes: list[Outcome]) -> list[Outcome]:
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise SweepFailed(failed, outcomes)
    return outcomes


@dataclass
class RayExecutor:
    """Tasks on Ray: a local instance started here (``address=None``) or the cluster at
    ``address`` (``"auto"``, or ``"ray://host:10001"``). slt_probe must be importable on
    the workers (the same environment, or a ``runtime_env``)."""

    address: str | None = None
    num_cpus: int | None = None
    runtime_env: dict = field(default_factory=dict)
    name = "ray"

    def __post_init__(self):
        try:
            import ray
        except ImportError as err:
            raise ImportError('running on Ray needs ray: pip install "slt-probe[ray]"') from err
        self.ray = ray
        if not ray.is_initialized():
            options = {"address": self.address, "include_dashboard": False,
                       "log_to_driver": False}
            if self.address is None:
                options["num_cpus"] = self.num_cpus or os.cpu_count()
            if self.runtime_env:
                options["runtime_env"] = self.runtime_env
            ray.init(**options)

    def map(self, tasks: list[Task], *, desc: str = "tasks", verbose: bool = True,
            on_result: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        ray = self.ray
        # one retry for a worker that dies and for an exception, with the task's threads
        remote = ray.remote(_remote_task)
        pending = {remote.options(num_cpus=task.threads, max_retries=1,
                                  retry_exceptions=True).remote(task): i
                   for i, task in enumerate(tasks)}
        outcomes: list[Outcome | None] = [None] * len(tasks)
        with tqdm(total=len(tasks), desc=f"{desc} (ray)", disable=not verbose) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(done[0])
                try:
                    outcomes[i] = Outcome(tasks[i], value=ray.get(done[0]), attempts=1)
                except Exception as err:  # noqa: BLE001 - reported with the task's inputs
                    outcomes[i] = Outcome(tasks[i], error=_ray_error(err), attempts=2)
                if on_result is not None and outcomes[i].ok:
                    on_result(outcomes[i])
                bar.update()
        return _checked(outcomes)


def _remote_task(task: Task):
    return run_task(task)


def _ray_error(err: Exception) -> str:
    cause = getattr(err, "cause", None)
    return "".join(traceback.format_exception(cause)) if cause is not None else repr(err)


def make_executor(name: str = "serial", *, address: str | None = None,
                  num_cpus: int | None = None):
    """``"serial"`` or ``"ray"`` (a local Ray instance, or the cluster at ``address``).

    Raises:
        ValueError: an unknown name, or an address without Ray.
        ImportError: Ray is not installed.

    Examples:
        >>> outcomes = make_executor("serial").map([Task(pow, dict(base=2, exp=10), "2^10")],
        ...                                        verbose=False)
        >>> outcomes[0].value
        1024
    """
    if name == "serial":
        if address is not None:
            raise ValueError("a Ray address needs executor='ray'")
        return SerialExecutor()
    if name == "ray":
        return RayExecutor(address=address, num_cpus=num_cpus)
    raise ValueError(f"executor must be one of {EXECUTORS}, got {name!r}")
