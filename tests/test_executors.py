"""Sweeps on Ray give the serial numbers, write only from the driver, resume, and report a
task that fails twice while keeping the rest."""
import os
from pathlib import Path

import pytest
import torch
from test_grokking import _tiny_config

import slt_probe
from slt_probe.executors import SerialExecutor, SweepFailed, Task, make_executor
from slt_probe.experiments import compare, sweeps
from slt_probe.run_log import read_rows


def flaky(path: str, value: int, failures: int = 1, crash: bool = False) -> int:
    """Fail (raise, or kill the worker) the first ``failures`` calls, then return value."""
    marker = Path(path)
    calls = int(marker.read_text()) if marker.exists() else 0
    marker.write_text(str(calls + 1))
    if calls < failures:
        if crash:
            os._exit(1)
        raise RuntimeError(f"failure {calls + 1} of {value}")
    return value * 10


@pytest.fixture(scope="module")
def ray_executor():
    ray = pytest.importorskip("ray")
    # the tasks of these tests live in this folder: the local workers must import them
    previous = os.environ.get("PYTHONPATH")
    here = str(Path(__file__).parent)
    os.environ["PYTHONPATH"] = here + (os.pathsep + previous if previous else "")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        executor = make_executor("ray", num_cpus=2)
        yield executor
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = previous


def _tasks(tmp_path, failures, crash=False):
    return [Task(flaky, dict(path=str(tmp_path / f"calls{i}"), value=i,
                             failures=failures[i], crash=crash), label=f"task {i}")
            for i in range(len(failures))]


@pytest.mark.parametrize("kind", ["serial", "ray"])
def test_a_task_is_retried_once_and_a_twice_failed_one_is_named_with_its_inputs(
        kind, tmp_path, request):
    executor = SerialExecutor() if kind == "serial" else request.getfixturevalue("ray_executor")
    written = []
    outcomes = executor.map(_tasks(tmp_path, [0, 1, 0]), verbose=False,
                            on_result=lambda o: written.append(o.value))
    assert [o.value for o in outcomes] == [0, 10, 20] and sorted(written) == [0, 10, 20]
    written.clear()
    (tmp_path / "again").mkdir()
    with pytest.raises(SweepFailed, match=r"(?s)1 of 3 tasks failed.*task 1.*'value': 1") as error:
        executor.map(_tasks(tmp_path / "again", [0, 5, 0]), verbose=False,
                     on_result=lambda o: written.append(o.value))
    assert sorted(written) == [0, 20]  # the others were kept
    assert [o.ok for o in error.value.outcomes] == [True, False, True]


def test_a_killed_ray_worker_is_retried(ray_executor, tmp_path):
    outcomes = ray_executor.map(_tasks(tmp_path, [1, 0], crash=True), verbose=False)
    assert [o.value for o in outcomes] == [0, 10]


def test_a_comparison_on_ray_gives_the_serial_numbers_and_resumes(ray_executor, tmp_path,
                                                                  monkeypatch):
    # the sweep machinery is the same for both regimes; the local regime's calibration
    # (its first run alone, then the rest) is covered serially in test_grokking
    kwargs = dict(config=_tiny_config(), scales=(1.0,), regimes=["notebook"], verbose=False)
    serial = compare.run_comparison("modadd-mlp", ["relu"], 3, out=tmp_path / "serial",
                                    **kwargs)
    on_ray = compare.run_comparison("modadd-mlp", ["relu"], 3, out=tmp_path / "ray",
                                    executor=ray_executor, **kwargs)
    assert [r["llc_final"] for r in on_ray] == [r["llc_final"] for r in serial]
    for act in ("relu",):
        for seed in (0, 1, 2):
            for regime in ("notebook",):
                a = read_rows(tmp_path / "serial" / act / f"seed{seed}" / regime / "llc.csv")
                b = read_rows(tmp_path / "ray" / act / f"seed{seed}" / regime / "llc.csv")
                assert [r["llc_mean"] for r in a] == [r["llc_mean"] for r in b]

    def must_not_run(**kwargs):
        raise AssertionError("a finished run was sent to a worker again")

    monkeypatch.setattr(sweeps, "grokking_task", must_not_run)
    again = compare.run_comparison("modadd-mlp", ["relu"], 3, out=tmp_path / "ray",
                                   executor=ray_executor, **kwargs)
    assert [r["llc_final"] for r in again] == [r["llc_final"] for r in on_ray]


def test_executor_names_are_checked():
    with pytest.raises(ValueError, match="executor must be one of"):
        make_executor("dask")
    with pytest.raises(ValueError, match="needs executor='ray'"):
        make_executor("serial", address="auto")


def test_a_trajectory_over_checkpoints_on_ray_gives_the_in_process_rows_and_resumes(
        ray_executor, tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x = torch.randn(256, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    states = []
    for _ in range(3):
        for _ in range(20):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
        states.append({k: v.clone() for k, v in net.state_dict().items()})
    kwargs = dict(sampler=slt_probe.SGLD(lr=1e-4, localization=100.0), num_chains=2,
                  num_draws=30, verbose=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tasks' thread count, so the in-process rows match
    try:
        here = slt_probe.llc_trajectory(net, states, (x, y), steps=[20, 40, 60], **kwargs)
    finally:
        torch.set_num_threads(threads)
    first = slt_probe.llc_trajectory(net, states[:2], (x, y), steps=[20, 40],
                                     log_dir=tmp_path, executor=ray_executor, **kwargs)
    resumed = slt_probe.llc_trajectory(net, states, (x, y), steps=[20, 40, 60],
                                       log_dir=tmp_path, executor=ray_executor, **kwargs)
    assert [r["llc_mean"] for r in resumed] == [r["llc_mean"] for r in here]
    # the finished steps were not estimated again: their rows (with their timings) stayed
    assert [r["seconds"] for r in resumed[:2]] == [r["seconds"] for r in first]
    assert [r["step"] for r in read_rows(tmp_path / "llc.csv")] == [20, 40, 60]
