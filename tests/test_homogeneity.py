"""The width sweep: the variance decomposition on a case with a known answer, the sweep's
outputs, thresholds and resume."""
import json
from dataclasses import replace

import numpy as np
import pytest

from slt_probe.cli import _width_line, main
from slt_probe.experiments import homogeneity as hom
from slt_probe.run_log import read_rows


def test_the_variance_parts_recover_known_initialisation_and_data_variances():
    # f(x; θ_i, D_j) = a_i g(x) + b_j h(x): at fixed data only a_i varies, at fixed
    # initialisation only b_j, so the parts are σ_a² E[g²] and σ_b² E[h²]
    rng = np.random.default_rng(0)
    runs, inputs = 4000, 50
    g, h = rng.normal(size=inputs), rng.normal(size=inputs)
    a, b = rng.normal(scale=0.5, size=runs), rng.normal(scale=2.0, size=runs)
    init = (a[:, None] * g + b[0] * h)[..., None]
    data = (a[0] * g + b[:, None] * h)[..., None]
    parts = hom.variance_parts(init, data)
    expected_init, expected_data = 0.25 * np.mean(g ** 2), 4.0 * np.mean(h ** 2)
    tolerance = 3 * np.sqrt(2 / runs)  # relative s.e. of a sample variance
    assert parts["init_variance"] == pytest.approx(expected_init, rel=tolerance)
    assert parts["data_variance"] == pytest.approx(expected_data, rel=tolerance)
    assert parts["total_variance"] > parts["init_variance"]


def test_disagreement_counts_differing_classes_over_pairs():
    predictions = np.array([[[1, 0], [0, 1]], [[1, 0], [1, 0]], [[0, 1], [1, 0]]], float)
    assert hom.disagreement(predictions) == pytest.approx((0.5 + 1.0 + 0.5) / 3)


def _tiny():
    return replace(hom.preset("modadd-mlp", quick=True), widths=(4, 64), init_seeds=2,
                   data_seeds=2, max_steps=400, eval_every=100, llc_draws=20, num_eval=400)


def test_a_sweep_writes_its_table_marks_its_thresholds_and_resumes(tmp_path, monkeypatch, assert_drawn):
    config = _tiny()
    rows = hom.run_homogeneity("modadd-mlp", config=config, out=tmp_path, verbose=False)
    assert [r["width"] for r in rows] == [4, 64]
    table = read_rows(tmp_path / "homogeneity.csv")
    for column in ("train_error", "test_error", "init_variance", "data_variance",
                   "init_disagreement", "data_disagreement", "llc_mean", "llc_std",
                   "llc_per_param", "llc_healthy", "max_excess_ratio", "localization"):
        assert table[0][column] is not None, column
    assert rows[1]["train_error"] < rows[0]["train_error"]  # the wide network fits more
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["thresholds"]["examples_times_outputs"] == 1124 * 53
    assert_drawn(tmp_path / "homogeneity.png")
    assert "width" in (tmp_path / "summary.md").read_text()

    def must_not_train(**kwargs):
        raise AssertionError("a finished width was trained again")

    monkeypatch.setattr(hom, "train_network", must_not_train)
    again = hom.run_homogeneity("modadd-mlp", config=config, out=tmp_path, verbose=False)
    assert [r["llc_mean"] for r in again] == [r["llc_mean"] for r in rows]


def test_sweep_settings_are_checked():
    with pytest.raises(ValueError, match="widths"):
        replace(_tiny(), widths=(4, 4))
    with pytest.raises(ValueError, match="init_seeds"):
        replace(_tiny(), init_seeds=1)
    with pytest.raises(ValueError, match="exceed"):
        hom.split(replace(_tiny(), num_train=5000), *hom.load_pool("modadd-mlp"), 0)
    with pytest.raises(SystemExit):
        main(["homogeneity", "--setup", "modadd-mlp", "--widths", "4,0"])


def test_a_width_averages_only_the_estimates_whose_chains_stayed_local():
    config = replace(_tiny(), init_seeds=3, data_seeds=2)
    runs = [{"width": 4, "init_seed": i, "data_seed": j, "train_error": 0.0, "test_error": 0.2,
             "converged": True, "steps": 10, "seconds": 1.0,
             "prediction": np.full((5, 2), 0.1 * (i + j))}
            for i, j in [(0, 0), (1, 0), (2, 0), (0, 1)]]
    llc = {"calibration": None,
           "rows": [{"llc_mean": 10.0, "local": True}, {"llc_mean": 600.0, "local": False},
                    {"llc_mean": 14.0, "local": True}]}
    row = hom.width_row(config, 4, runs, llc)
    assert row["llc_mean"] == pytest.approx(12.0) and row["llc_local"] == 2
    assert [e["local"] for e in row["estimates"]] == [True, False, True]
    nowhere = hom.width_row(config, 4, runs, {"calibration": None,
                                             "rows": [{"llc_mean": 600.0, "local": False}]})
    assert nowhere["llc_mean"] is None and nowhere["llc_per_param"] is None


def test_an_interrupted_sweep_keeps_its_finished_widths(tmp_path, monkeypatch):
    config = _tiny()
    train = hom.train_network

    def fails_at_64(**kwargs):
        if kwargs["width"] == 64:
            raise RuntimeError("interrupted")
        return train(**kwargs)

    monkeypatch.setattr(hom, "train_network", fails_at_64)
    with pytest.raises(Exception, match="interrupted"):
        hom.run_homogeneity("modadd-mlp", config=config, out=tmp_path, verbose=False)
    assert (tmp_path / "widths" / "w4.json").exists()
    trained = []
    monkeypatch.setattr(hom, "train_network",
                        lambda **kwargs: trained.append(kwargs["width"]) or train(**kwargs))
    rows = hom.run_homogeneity("modadd-mlp", config=config, out=tmp_path, verbose=False)
    assert set(trained) == {64} and [r["width"] for r in rows] == [4, 64]


def test_a_width_with_one_or_no_local_network_prints_without_a_spread():
    row = {"width": 2, "train_error": 0.77, "test_error": 0.81, "init_variance": 0.0098,
           "data_variance": 6.5e-5, "llc_mean": 4.84, "llc_std": None}
    assert _width_line(row).endswith("λ̂ 4.84")
    assert _width_line({**row, "llc_mean": None}).endswith("λ̂ no network stayed local")
    assert _width_line({**row, "llc_std": 0.21}).endswith("λ̂ 4.84 ± 0.21")


def test_a_held_gamma_is_calibrated_on_the_widest_network_and_used_for_every_width(tmp_path):
    config = replace(_tiny(), init_seeds=2, data_seeds=2)
    rows = hom.run_homogeneity("modadd-mlp", config=config, out=tmp_path, hold_gamma=True,
                               verbose=False)
    held = json.loads((tmp_path / hom.HELD_NAME).read_text())
    assert held["calibrated_on"] == "width 64, init seed 0"
    gamma = held["calibration"]["sampler"]["localization"]
    assert [r["localization"] for r in rows] == [gamma, gamma]
    assert [r["lr"] for r in rows] == [held["calibration"]["sampler"]["lr"]] * 2
    assert "One sampler for every width" in (tmp_path / "summary.md").read_text()
