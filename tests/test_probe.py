import csv
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import slt_probe
from slt_probe import SGLD, LLCProbe, llc_trajectory

PROBE = dict(sampler=SGLD(lr=1e-4, localization=100.0), num_chains=2, num_draws=15,
             batch_size=32, verbose=False)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.2), torch.nn.Tanh(),
                                torch.nn.Linear(16, 2))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 3, generator=g)
    y = (x[:, 0] > 0).long()
    return model, x, y


def _train(steps, probe_kwargs=None, log_dir=None, start=1, model=None, optimizer=None):
    """Training loop that draws from torch, numpy and python RNGs (dropout, batches, noise)."""
    if model is None:
        model, x, y = _setup()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        _, x, y = _setup()
    probe = None
    if probe_kwargs is not None:
        probe = LLCProbe(model, (x, y), log_dir=log_dir, **probe_kwargs)
        probe.attach(optimizer, start_step=start - 1)
    model.train()
    for step in range(start, start + steps):
        idx = torch.randint(0, len(x), (32,))
        jitter = float(np.random.randn()) * 1e-3 + random.random() * 1e-3
        loss = F.cross_entropy(model(x[idx] + jitter), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if probe is not None:
            probe.log(step, train_loss=loss.item())
    if probe is not None:
        probe.detach()
    return model, optimizer, probe


def _seed_all():
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)


def test_training_with_probe_is_bit_identical():
    _seed_all()
    plain, _, _ = _train(12)
    after_plain = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    _seed_all()
    probed, _, probe = _train(12, {**PROBE, "every": 4})
    for a, b in zip(plain.parameters(), probed.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), after_plain[0])
    assert np.array_equal(np.random.get_state()[1], after_plain[1])
    assert random.getstate() == after_plain[2]
    assert [r["step"] for r in probe.history if r.get("llc_mean") is not None] == [0, 4, 8, 12]


def test_rows_reach_csv_immediately_and_resume_without_duplicates(tmp_path):
    kwargs = {**PROBE, "every": 3}
    _seed_all()
    model, optimizer, probe = _train(7, kwargs, log_dir=tmp_path)  # "killed" after step 7
    rows = list(csv.DictReader(open(tmp_path / "llc.csv")))
    assert [int(r["step"]) for r in rows if r["llc_mean"]] == [0, 3, 6]
    first = {int(r["step"]): r["llc_mean"] for r in rows if r["llc_mean"]}
    # Restart: a new probe on the same folder, training continues from step 8.
    _, _, resumed = _train(6, kwargs, log_dir=tmp_path, start=8, model=model, optimizer=optimizer)
    rows = list(csv.DictReader(open(tmp_path / "llc.csv")))
    steps = [int(r["step"]) for r in rows if r["llc_mean"]]
    assert steps == [0, 3, 6, 9, 12]
    assert len({int(r["step"]) for r in rows}) == len(rows), "duplicated steps"
    assert all(first[s] == r["llc_mean"] for r in rows for s in first if int(r["step"]) == s)
    manifest = (tmp_path / "manifest.json").read_text()
    assert "resumed_at" in manifest and "torch" in manifest


def test_offline_trajectory_matches_online_probe(tmp_path):
    model, x, y = _setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoints = []
    probe = LLCProbe(model, (x, y), every=5, **PROBE)
    probe.attach(optimizer)
    checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    for step in range(1, 11):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0:
            checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    probe.detach()
    torch.save(checkpoints[1], tmp_path / "ckpt5.pt")
    before = [p.detach().clone() for p in model.parameters()]
    offline = llc_trajectory(model, [checkpoints[0], tmp_path / "ckpt5.pt", checkpoints[2]],
                             (x, y), steps=[0, 5, 10], log_dir=tmp_path / "off", **PROBE)
    online = {r["step"]: r["llc_mean"] for r in probe.history}
    assert [r["step"] for r in offline] == [0, 5, 10]
    for r in offline:
        assert r["llc_mean"] == pytest.approx(online[r["step"]], rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert (tmp_path / "off" / "llc.csv").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"every": 0}, "every"), ({"every": -3}, "every"), ({"every": None}, "every=N"),
])
def test_bad_schedule_is_named(kwargs, message):
    model, x, y = _setup()
    with pytest.raises(ValueError, match=message):
        LLCProbe(model, (x, y), **{**PROBE, **kwargs})


def test_missing_data_and_file_log_dir_are_named(tmp_path):
    model, x, y = _setup()
    with pytest.raises(ValueError, match="data is required"):
        LLCProbe(model, None, every=5)
    path = tmp_path / "afile"
    path.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        LLCProbe(model, (x, y), every=5, log_dir=path)


def test_log_spaced_steps():
    steps = slt_probe.log_spaced_steps(10_000, num=40)
    assert steps[0] == 1 and steps[-1] == 10_000
    assert len(steps) > 25 and steps == sorted(set(steps))
    with pytest.raises(ValueError):
        slt_probe.log_spaced_steps(0)


def test_plot_trajectory_writes_png(tmp_path, assert_drawn):
    history = [{"step": s, "llc_mean": 1.0 + s, "llc_std": 0.1, "train_loss": 1 / (1 + s)}
               for s in range(5)]
    slt_probe.plot_trajectory(history, metrics=("train_loss",), path=tmp_path / "t.png")
    assert_drawn(tmp_path / "t.png")


def test_example_runs_in_quick_mode(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "examples" / "wrap_your_loop.py"),
                          "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(open(tmp_path / "llc.csv")))
    llc_rows = [r for r in rows if r["llc_mean"]]
    assert len(llc_rows) >= 6
    assert float(llc_rows[-1]["llc_mean"]) > float(llc_rows[0]["llc_mean"])
    assert any(r["test_acc"] for r in rows)
    assert (tmp_path / "trajectory.png").exists()
    assert "probe took" in out.stdout
