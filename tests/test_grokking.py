"""Grokking runs: a shortened modadd-mlp run in the default suite, the real quick presets
(which must grok) in the slow suite."""
import json
import os
from dataclasses import replace

import pytest

from slt_probe import read_rows
from slt_probe.cli import main
from slt_probe.experiments.grokking import (build_model, preset, run_grokking,
                                            summarize)
from slt_probe.models import ModAddTransformer


def test_short_modadd_run_memorises_and_its_llc_grows(tmp_path):
    config = replace(preset("modadd-mlp", quick=True), num_steps=4000, num_log_points=6,
                     num_regular_points=2, num_eval_points=10,
                     llc=replace(preset("modadd-mlp").llc, num_draws=80, num_burnin=100))
    summary = run_grokking("modadd-mlp", config=config, out=tmp_path, verbose=False)
    rows = read_rows(tmp_path / "llc.csv")
    llc = [r for r in rows if r["llc_mean"] is not None]
    assert len(llc) >= 6
    for column in ("step", "llc_mean", "llc_std", "effective_params", "train_loss",
                   "test_loss", "train_acc", "test_acc"):
        assert column in rows[0]
    assert summary["final_train_acc"] == 1.0
    # memorising phase: the fitted network has more effective parameters than at init
    assert summary["llc_final"] > summary["llc_init"] + 5 * summary["llc_init_std"]
    assert {"summary.json", "manifest.json", "trajectory.png", "model.pt"} <= {
        p.name for p in tmp_path.iterdir()}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["setup"] == "modadd-mlp" and "git_commit" in manifest


def test_summary_reads_peak_fall_and_grokking_step():
    rows = [{"step": s, "llc_mean": v, "llc_std": 0.1, "test_acc": a, "train_acc": 1.0}
            for s, v, a in [(0, 1.0, 0.0), (10, 5.0, 0.1), (20, 4.0, 0.6), (30, 2.0, 0.95)]]
    summary = summarize(rows)
    assert summary["llc_peak"] == 5.0 and summary["llc_peak_step"] == 10
    assert summary["test_acc_50_step"] == 20 and summary["test_acc_90_step"] == 30
    assert summary["llc_falls_after_grok"] is False  # λ̂ at grokking is already the lowest after
    assert summary["peak_before_grok"] and summary["llc_fall_fraction"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="no rows"):
        summarize([{"step": 0, "llc_mean": None}])


def test_presets_and_models_are_checked():
    with pytest.raises(ValueError, match="setup must be one of"):
        preset("cifar")
    with pytest.raises(ValueError, match="activation must be one of"):
        build_model(preset("modadd-mlp"), "swish-ish", 0)
    scaled = build_model(preset("mnist-mlp"), "relu", 0)
    plain = build_model(replace(preset("mnist-mlp"), init_scale=1.0), "relu", 0)
    first = next(scaled.parameters())
    assert float(first.abs().mean()) == pytest.approx(
        8 * float(next(plain.parameters()).abs().mean()), rel=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        ModAddTransformer(p=7, d_model=10, num_heads=4)


def test_cli_grokking_rejects_unknown_setup(capsys):
    with pytest.raises(SystemExit):
        main(["grokking", "--setup", "nope"])


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["modadd-mlp", "modadd-transformer", "mnist-mlp"])
def test_quick_preset_groks_with_llc_rows(setup, tmp_path):
    if setup == "mnist-mlp" and not os.environ.get("SLT_PROBE_MNIST_DIR"):
        pytest.skip("set SLT_PROBE_MNIST_DIR to the MNIST IDX folder")
    summary = run_grokking(setup, quick=True, out=tmp_path, verbose=False)
    assert summary["final_train_acc"] == 1.0
    assert summary["grokked"], summary
    assert summary["num_llc_points"] >= 15
    assert summary["llc_peak"] > summary["llc_init"]
    assert summary["wall_seconds"] < 180
