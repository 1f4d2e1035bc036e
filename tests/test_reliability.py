"""Defects a new user hits: two writers on one log folder, resuming with other settings,
command-line edges, a quick start that must not touch committed files, and inputs torch
would reject with an unnamed error."""
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import slt_probe.cli as cli
from slt_probe import SGLD, LLCProbe, estimate_llc
from slt_probe.cli import _setup_folder, build_parser, main
from slt_probe.experiments.compare import run_comparison

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(sampler=SGLD(lr=1e-4, localization=100.0), num_chains=2, num_draws=10,
            batch_size=32, verbose=False)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    return x, (x[:, 0] > 0).long()


HOLDER = textwrap.dedent("""
    import sys, time, torch
    import slt_probe
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g); y = (x[:, 0] > 0).long()
    probe = slt_probe.LLCProbe(model, (x, y), every=1, log_dir=sys.argv[1], num_draws=10,
                               sampler=slt_probe.SGLD(lr=1e-4, localization=100.0),
                               num_chains=2, batch_size=32, verbose=False)
    open(sys.argv[2], "w").write("ready")
    time.sleep(120)
""")


def _hold(log_dir: Path, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(log_dir), str(ready)])
    deadline = time.time() + 60
    while not ready.exists():
        assert holder.poll() is None and time.time() < deadline, "holder did not start"
        time.sleep(0.1)
    return holder


def test_a_second_writer_is_refused_and_a_killed_writers_lock_does_not_block(tmp_path):
    log_dir = tmp_path / "run"
    holder = _hold(log_dir, tmp_path)
    try:
        x, y = _data()
        with pytest.raises(RuntimeError, match="already being written.*pid") as error:
            LLCProbe(torch.nn.Linear(3, 2), (x, y), every=1, log_dir=log_dir, **FAST)
        assert str(holder.pid) in str(error.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without cleaning up: its lock went with it, so a resume proceeds
    probe = LLCProbe(torch.nn.Linear(3, 2), (x, y), every=1, log_dir=log_dir, **FAST)
    assert probe.maybe_estimate(0)["llc_mean"] is not None
    probe.detach()


def test_a_second_probe_in_one_process_is_refused_until_the_first_detaches(tmp_path):
    x, y = _data()
    first = LLCProbe(torch.nn.Linear(3, 2), (x, y), every=1, log_dir=tmp_path, **FAST)
    with pytest.raises(RuntimeError, match="already being written"):
        LLCProbe(torch.nn.Linear(3, 2), (x, y), every=1, log_dir=tmp_path, **FAST)
    first.detach()
    LLCProbe(torch.nn.Linear(3, 2), (x, y), every=1, log_dir=tmp_path, **FAST).detach()


def test_resuming_with_other_settings_names_them_unless_asked_to_continue(tmp_path):
    x, y = _data()
    model = torch.nn.Linear(3, 2)
    probe = LLCProbe(model, (x, y), every=1, log_dir=tmp_path, **FAST)
    probe.maybe_estimate(0)
    probe.maybe_estimate(1)
    probe.detach()
    other = {**FAST, "sampler": SGLD(lr=1e-3, localization=100.0)}
    with pytest.raises(ValueError, match=r"sampler\.lr: 0\.0001 → 0\.001.*resume_changed_settings"):
        LLCProbe(model, (x, y), every=1, log_dir=tmp_path, **other)
    resumed = LLCProbe(model, (x, y), every=1, log_dir=tmp_path, resume_changed_settings=True,
                       **other)
    resumed.maybe_estimate(2)
    resumed.detach()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    history = manifest["request_history"]
    assert [h["from_step"] for h in history] == [0, 2]
    assert [h["request"]["settings"]["sampler"]["lr"] for h in history] == [1e-4, 1e-3]
    assert manifest["request"]["settings"]["sampler"]["lr"] == 1e-3
    rows = {r["step"]: r for r in resumed.history}
    assert (rows[1]["lr"], rows[2]["lr"]) == (1e-4, 1e-3)


@pytest.mark.parametrize("argv, message", [
    (["estimate", "--lr", "0"], "--lr: '0' is not a number > 0"),
    (["estimate", "--draws", "0"], "--draws: '0' is not a whole number > 0"),
    (["estimate", "--chains", "0"], "--chains: '0' is not a whole number > 0"),
    (["estimate", "--chains", "-3"], "--chains"),
    (["estimate", "--burnin", "-1"], "--burnin: '-1' is not a whole number >= 0"),
    (["estimate", "--seed", "x"], "--seed"),
    (["validate", "--jobs", "0"], "--jobs"),
    (["grokking", "--setup", "modadd-mlp", "--seed", "-1"], "--seed"),
    (["grokking", "--setup", "modadd-mlp", "--seeds", "0,0"], "distinct seeds"),
    (["grokking", "--setup", "modadd-mlp", "--regimes", "local,hot"], "unknown regimes"),
    (["compare", "--setup", "modadd-mlp", "--activations", "relu,foo"], "unknown activations"),
    (["compare", "--setup", "modadd-mlp", "--seeds", "3,3"], "distinct seeds"),
    (["compare", "--setup", "modadd-mlp", "--seeds", "-1"], "--seeds"),
    (["homogeneity", "--setup", "mnist-mlp", "--init-seeds", "1"], "--init-seeds"),
    (["compare", "--setup", "modadd-mlp", "--executor", "dask"], "--executor"),
    (["grokking", "--setup", "modadd-mlp", "--ray-address", "auto"], "needs --executor ray"),
])
def test_every_bad_option_is_rejected_in_one_line_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_sweep_checks_every_activation_before_the_first_run(tmp_path):

    started = time.perf_counter()
    with pytest.raises(ValueError, match="activation must be one of"):
        run_comparison("modadd-mlp", ["relu", "foo"], 1, quick=True, out=tmp_path, verbose=False)
    assert time.perf_counter() - started < 5 and not list(tmp_path.glob("relu"))


def test_file_system_failures_end_in_one_line_and_status_two(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["estimate", "--case", "regular-20", "--draws", "5", "--burnin", "0",
                 "--quiet", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slt-probe: error:") and len(err.splitlines()) == 1

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr(cli, "write_json_atomic", denied)
    assert main(["estimate", "--case", "regular-20", "--draws", "5", "--burnin", "0",
                 "--quiet", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Permission denied" in err and len(err.splitlines()) == 1


def test_a_users_runs_go_to_an_untracked_folder(capsys):
    with pytest.raises(SystemExit):
        main(["grokking", "--help"])
    assert "runs/grokking/SETUP-quick" in " ".join(capsys.readouterr().out.split())

    args = build_parser().parse_args(["grokking", "--setup", "modadd-mlp", "--quick"])
    folder = _setup_folder(args, "grokking")
    assert folder == Path("runs/grokking/modadd-mlp-quick")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(folder / "seed0" / "model.pt")],
                             cwd=ROOT)
    if ignored.returncode != 128:  # 128: not a git checkout (an installed copy)
        assert ignored.returncode == 0, "runs/ must be ignored by git"


def test_inputs_torch_would_reject_get_a_named_error():
    x, y = _data()
    model = torch.nn.Linear(3, 2)
    with pytest.raises(TypeError, match="integer class labels"):
        estimate_llc(model, (x, y.float()), **FAST)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\].*got labels in \[0, 5\]"):
        estimate_llc(model, (x, y * 5), **FAST)
    with pytest.raises(TypeError, match="float64 but the data x is torch.float32"):
        estimate_llc(torch.nn.Linear(3, 2).double(), (x, y), **FAST)


def test_a_per_example_loss_callable_works_and_matches_the_built_in():
    x, y = _data()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    built_in = estimate_llc(model, (x, y), **FAST)
    for loss in (lambda out, target: F.cross_entropy(out, target, reduction="none"),
                 torch.nn.CrossEntropyLoss(), lambda out, target: F.cross_entropy(out, target)):
        other = estimate_llc(model, (x, y), loss_fn=loss, **FAST)
        assert other.llc_mean == pytest.approx(built_in.llc_mean, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_sampled_in_float32_and_say_so(dtype):
    x, y = _data()
    torch.manual_seed(0)
    low = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(dtype)
    same_weights = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 2))
    same_weights.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    half = estimate_llc(low, (x.to(dtype), y), **FAST)
    full = estimate_llc(same_weights, (x.to(dtype).float(), y), **FAST)
    assert half.llc_mean == full.llc_mean
    assert "sampled in float32" in half.config["precision"]
    assert next(low.parameters()).dtype == dtype  # the user's model is untouched
