import math

import numpy as np
import pytest
import torch

import slt_probe
from slt_probe import CalibrationGrid, LLCProbe, calibrate, estimate_llc
from slt_probe.calibration import choose
from slt_probe.validation import markdown, scatter

SMALL_GRID = CalibrationGrid(lrs=(1e-3, 1e-4, 3e-5, 1e-5, 3e-6), localizations=(1.0,),
                             num_chains=4, num_draws=200, num_burnin=300)


def _row(lr, gamma, llc, accept=0.8, diverged=0, stationary=True):
    return {"lr": lr, "localization": gamma, "llc_mean": llc, "llc_std": 0.1, "llc_sem": 0.05,
            "mala_acceptance": accept, "num_diverged": diverged, "stationary": stationary,
            "rhat": 1.0}


@pytest.mark.parametrize("kwargs, name", [({"lrs": ()}, "lrs"), ({"lrs": (-1.0,)}, "lrs"),
                                          ({"localizations": (-1.0,)}, "localizations"),
                                          ({"tolerance": 0.0}, "tolerance"),
                                          ({"acceptance_target": 1.5}, "acceptance_target")])
def test_grid_rejects_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CalibrationGrid(**kwargs)


def test_choose_takes_largest_eps_on_plateau_at_weakest_gamma():
    grid = CalibrationGrid()
    table = [_row(1e-3, 1.0, float("nan"), diverged=4), _row(1e-4, 1.0, 20.0, accept=0.3),
             _row(3e-5, 1.0, 10.5), _row(1e-5, 1.0, 10.0), _row(3e-6, 1.0, 6.0),
             _row(3e-5, 10.0, 9.0), _row(1e-5, 10.0, 9.1)]
    best, reason = choose(table, grid)
    assert (best["lr"], best["localization"]) == (3e-5, 1.0)
    assert "plateau" in reason
    assert [r["lr"] for r in table if r["on_plateau"]] == [3e-5, 1e-5, 3e-5, 1e-5]
    assert not table[1]["usable"] and not table[0]["usable"]


def test_choose_falls_back_to_acceptance_and_then_gives_up():
    grid = CalibrationGrid()
    table = [_row(1e-4, 1.0, 20.0, accept=0.3), _row(3e-5, 1.0, 12.0, accept=0.7),
             _row(1e-5, 1.0, 6.0, accept=0.9)]
    best, reason = choose(table, grid)
    assert best["lr"] == 3e-5 and "no plateau" in reason
    none, why = choose([_row(1e-3, 1.0, float("nan"), diverged=4)], grid)
    assert none is None and "no usable point" in why


def test_calibrate_then_estimate_lands_near_truth(regular_problem, tmp_path):
    p = regular_problem
    rng = torch.get_rng_state()
    cal = calibrate(p.model, (p.x, p.y), loss_fn=p.loss_fn, grid=SMALL_GRID, batch_size=500,
                    verbose=False)
    assert torch.equal(torch.get_rng_state(), rng)
    chosen = next(r for r in cal.table if r["chosen"])
    assert chosen["lr"] == cal.sampler.lr and chosen["mala_acceptance"] >= 0.55
    assert chosen["num_diverged"] == 0
    assert cal.nbeta == pytest.approx(5000 / math.log(5000))
    assert any(r["chosen"] for r in cal.table) and cal.reason
    assert any(r["num_diverged"] > 0 or r["mala_acceptance"] < 0.55 for r in cal.table)
    result = estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn, sampler=cal.sampler,
                          num_chains=4, num_draws=1000, num_burnin=cal.num_burnin,
                          batch_size=500, verbose=False)
    assert result.llc_mean == pytest.approx(5.0, rel=0.10)
    cal.plot(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert cal.to_dict()["sampler"]["lr"] == cal.sampler.lr


def test_unknown_sampler_name_is_rejected(tiny_classifier):
    model, x, y = tiny_classifier
    with pytest.raises(ValueError, match="'auto'"):
        estimate_llc(model, (x, y), sampler="automatic", num_chains=2, num_draws=5,
                     verbose=False)


def test_auto_sampler_on_regular_model(regular_problem):
    p = regular_problem
    result = estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn, sampler="auto",
                          num_chains=4, num_draws=500, batch_size=500, verbose=False)
    cal = result.config["calibration"]
    assert result.config["sampler"]["lr"] == cal["sampler"]["lr"]
    assert result.config["num_burnin"] >= cal["num_burnin"]
    assert len(cal["table"]) >= 3 and cal["reason"]
    assert result.llc_mean == pytest.approx(5.0, rel=0.15)


def test_probe_calibrates_once_and_holds_the_sampler(regular_problem, tmp_path):
    p = regular_problem
    probe = LLCProbe(p.model, (p.x, p.y), loss_fn=p.loss_fn, every=1, sampler="auto",
                     num_chains=2, num_draws=20, batch_size=500, log_dir=tmp_path,
                     verbose=False)
    calls = []
    original = slt_probe.calibration.calibrate

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **{**kwargs, "grid": SMALL_GRID})

    slt_probe.calibration.calibrate = counting
    try:
        probe.maybe_estimate(0)
        probe.maybe_estimate(1)
    finally:
        slt_probe.calibration.calibrate = original
    assert len(calls) == 1
    assert probe.settings.sampler.lr == probe.calibration.sampler.lr
    assert "calibration" in (tmp_path / "manifest.json").read_text()


def test_validation_report_marks_misses(tmp_path):
    rows = [{"case": "a", "d": 2, "true_lambda": 1.0, "true_lambda_exact": "1",
             "llc_mean": 1.05, "llc_std": 0.1, "relative_error": 0.05, "healthy": True,
             "lr": 1e-4, "localization": 1.0, "seconds": 3.0},
            {"case": "b", "d": 4, "true_lambda": 2.0, "true_lambda_exact": "2",
             "llc_mean": 1.5, "llc_std": 0.1, "relative_error": -0.25, "healthy": False,
             "lr": 1e-5, "localization": 1.0, "seconds": 3.0}]
    text = markdown(rows, "slt-probe validate")
    assert "-25.0% ✗" in text and "+5.0% |" in text and "1 of 2 cases within 10%" in text
    scatter(rows, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_plot_trace_writes_png(regular_problem, tmp_path):
    p = regular_problem
    result = estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn, num_chains=2, num_draws=20,
                          batch_size=500, verbose=False)
    slt_probe.plot_trace(result, path=tmp_path / "trace.png")
    assert (tmp_path / "trace.png").stat().st_size > 1000
    assert np.isfinite(result.llc_trace).all()
