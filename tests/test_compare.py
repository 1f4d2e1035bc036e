"""The activation comparison: one sampler for every run, resumable, its claims at each
resolution; the simplicity measures of an untrained network's function."""
import json
import math

import numpy as np
import pytest
from test_grokking import _tiny_config

from slt_probe.experiments import compare, sweeps
from slt_probe.experiments.redshift import grid_points, lz_complexity, mean_frequency
from slt_probe.reports import plot_resolutions
from slt_probe.run_log import read_rows


def test_compare_summarises_per_activation_and_resumes(tmp_path, monkeypatch):

    kwargs = dict(config=_tiny_config(), out=tmp_path, scales=(1.0, 4.0), verbose=False,
                  regimes=("local", "local-x10", "notebook"))
    rows = compare.run_comparison("modadd-mlp", ["relu", "tanh"], 2, **kwargs)
    assert [(r["activation"], r["regime"]) for r in rows] == [
        ("relu", "local"), ("relu", "local-x10"), ("relu", "notebook"),
        ("tanh", "local"), ("tanh", "local-x10"), ("tanh", "notebook")]
    for row in rows:
        for key in ("llc_init", "llc_peak", "llc_final", "final_test_acc", "disagreement",
                    "prediction_variance", "init_mean_frequency", "init_lz"):
            assert row[key] is not None and math.isfinite(row[key]), key
        assert row["num_runs"] == 2
    summary = read_rows(tmp_path / "summary.csv")
    assert len(summary) == 6 and (tmp_path / "trajectories_local.png").exists()
    claims_table = (tmp_path / "claims.md").read_text()
    assert "| relu | local-x10 | " in claims_table and "| tanh | local | " in claims_table
    assert (tmp_path / "relu" / "resolutions.png").exists()
    assert json.loads((tmp_path / "notebook_sampler.json").read_text())["lr"] == \
        _tiny_config().llc.lr
    # one calibration for every run of the local regime: the first run's
    calibration = json.loads((tmp_path / "calibration.json").read_text())
    assert calibration["calibrated_on"] == "relu/seed0"
    gamma = calibration["calibration"]["sampler"]["localization"]
    for act in ("relu", "tanh"):
        for seed in (0, 1):
            local = read_rows(tmp_path / act / f"seed{seed}" / "local" / "llc.csv")
            assert {r["localization"] for r in local if r["llc_mean"] is not None} == {gamma}
            coarse = read_rows(tmp_path / act / f"seed{seed}" / "local-x10" / "llc.csv")
            assert [r["localization"] for r in coarse if r["llc_mean"] is not None] == \
                pytest.approx([10 * gamma] * len([r for r in coarse if r["llc_mean"] is not None]))

    def must_not_train(*args, **kw):
        raise AssertionError("a finished run was recomputed")


    monkeypatch.setattr(sweeps, "grokking_task", must_not_train)
    again = compare.run_comparison("modadd-mlp", ["relu", "tanh"], 2, **kwargs)
    assert [r["llc_final"] for r in again] == [r["llc_final"] for r in rows]


def test_redshift_measures_rank_linear_below_high_frequency_sine():

    s, t = (v.reshape(64, 64).numpy() for v in grid_points(64))
    linear = 0.3 * s - 0.7 * t
    wiggly = np.sin(25 * s) * np.cos(19 * t)
    assert mean_frequency(linear) < 0.5 * mean_frequency(wiggly)
    assert lz_complexity(linear) < 0.5 * lz_complexity(wiggly)
    assert lz_complexity(np.zeros((64, 64))) < lz_complexity(linear)
    with pytest.raises(ValueError, match="square"):
        mean_frequency(np.zeros((3, 4)))


def test_the_resolution_figure_shades_the_seeds_range_on_its_log_axis():
    # seeds five orders of magnitude apart: mean − std would be negative, the range is not
    seeds = [[{"step": 0, "llc_mean": 1.0}, {"step": 10, "llc_mean": 1e-5}],
             [{"step": 0, "llc_mean": 3.0}, {"step": 10, "llc_mean": 1.0}]]
    figure = plot_resolutions({"local": seeds})
    (band,) = figure.axes[0].collections
    heights = band.get_paths()[0].vertices[:, 1]
    assert heights.min() == pytest.approx(1e-5) and heights.max() == pytest.approx(3.0)
    assert figure.axes[0].lines[0].get_ydata().tolist() == pytest.approx([2.0, 0.500005])
