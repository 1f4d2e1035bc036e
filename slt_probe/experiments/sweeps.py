"""Many grokking runs as independent tasks of one executor (serial or Ray): each task
computes a run in memory, the driver writes its folder when it arrives, and a resumed
sweep skips every run whose folder is finished. Not here: the runs themselves
(``grokking``), what a comparison does with them (``compare``).
"""
from __future__ import annotations

from pathlib import Path

from ..executors import SerialExecutor, Task
from .grokking import git_commit, grokking_task, write_run
from .presets import GrokkingConfig
from .summary import load_run


def finished(folder: Path, regimes) -> bool:
    return all(load_run(folder / regime) is not None for regime in regimes)


def grokking_sweep(setup: str, runs: list[tuple[str, int, Path]], *, quick: bool,
                   config: GrokkingConfig, regimes, calibrations: dict | None = None,
                   mnist_dir=None, executor=None, command: str | None = None,
                   verbose: bool = True) -> None:
    """Train and estimate every ``(activation, seed, folder)`` not finished yet."""
    executor = executor or SerialExecutor()
    commit = git_commit()
    todo = [(act, seed, Path(folder)) for act, seed, folder in runs
            if not finished(Path(folder), regimes)]
    tasks = [Task(grokking_task, dict(setup=setup, activation=act, seed=seed, quick=quick,
                                      config=config, regimes=list(regimes),
                                      calibrations=calibrations, mnist_dir=mnist_dir,
                                      command=command, commit=commit),
                  label=f"{setup} {act} seed {seed}") for act, seed, _ in todo]
    folders = {task.label: folder for task, (_, _, folder) in zip(tasks, todo)}
    executor.map(tasks, desc=f"{setup} runs", verbose=verbose,
                 on_result=lambda outcome: write_run(folders[outcome.task.label],
                                                     outcome.value))
