import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import slt_probe
from slt_probe import CalibrationGrid, LLCProbe, calibrate, estimate_llc
from slt_probe.settings import EstimateSettings
from slt_probe.calibration import relative_gap
from slt_probe.ground_truth.validate import markdown
from slt_probe.reports import plot_validation

SMALL_GRID = CalibrationGrid(lrs=(1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6),
                             localizations=(1.0,), num_chains=4, level_steps=200)


@pytest.mark.parametrize("kwargs, name", [({"lrs": ()}, "lrs"), ({"lrs": (-1.0,)}, "lrs"),
                                          ({"localizations": (-1.0,)}, "localizations"),
                                          ({"tolerance": 0.0}, "tolerance"),
                                          ({"bias_tolerance": 1.5}, "bias_tolerance"),
                                          ({"num_chains": 1}, "num_chains"),
                                          ({"level_steps": 2}, "level_steps"),
                                          ({"max_steps": 10}, "max_steps"),
                                          ({"target_relative_sem": 0.0}, "target_relative_sem"),
                                          ({"max_chains": 0}, "max_chains")])
def test_grid_rejects_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CalibrationGrid(**kwargs)


def test_relative_gap_pairs_chains():
    # A shift common to each pair cancels: the gap is exact and its standard error zero.
    base = np.array([1.0, 5.0, 9.0, 13.0])
    gap, sem = relative_gap(base + 0.7, base)
    assert gap == pytest.approx(0.7 / 7.0) and sem == pytest.approx(0.0, abs=1e-12)
    gap, sem = relative_gap(np.array([2.0, 4.0]), np.array([1.0, 1.0]))
    assert gap == pytest.approx(2.0) and sem == pytest.approx(1.0)


def test_calibrate_then_estimate_lands_near_truth(regular_problem, tmp_path):
    p = regular_problem
    rng = torch.get_rng_state()
    weights = {k: v.clone() for k, v in p.model.state_dict().items()}
    cal = calibrate(p.model, (p.x, p.y), loss_fn=p.loss_fn, grid=SMALL_GRID, batch_size=500,
                    verbose=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, p.model.state_dict()[k]) for k, v in weights.items())
    assert cal.nbeta == pytest.approx(5000 / math.log(5000))
    stages = [r["stage"] for r in cal.table]
    assert stages.index("probe") < stages.index("warm-up") < stages.index("ladder")
    # The probe stops at the first stable ε; larger ones diverged.
    probes = [r for r in cal.table if r["stage"] == "probe"]
    assert probes[-1]["num_diverged"] == 0 and all(r["num_diverged"] for r in probes[:-1])
    warm = next(r for r in cal.table if r["stage"] == "warm-up")
    assert warm["lr"] < probes[-1]["lr"]
    assert warm["langevin_time"] >= SMALL_GRID.min_relax_time
    # The estimate warms up at 2ε for the Langevin time the warm-up needed.
    assert cal.warmup_lr == pytest.approx(2 * cal.sampler.lr) and cal.warmup_lr <= warm["lr"]
    assert cal.num_warmup * cal.warmup_lr == pytest.approx(warm["langevin_time"], rel=0.01)
    # Down the ladder every level but the chosen one is more than the tolerance above
    # the next; the chosen one is within it.
    ladder = [r for r in cal.table if r["stage"] == "ladder"]
    chosen = next(r for r in ladder if r["chosen"])
    assert chosen["lr"] == cal.sampler.lr and chosen is ladder[-1]
    assert abs(chosen["gap_to_double_lr"]) <= SMALL_GRID.bias_tolerance
    assert all(abs(r["gap_to_double_lr"]) > SMALL_GRID.bias_tolerance for r in ladder[1:-1])
    assert all(a["lr"] / b["lr"] == pytest.approx(2.0) for a, b in zip(ladder, ladder[1:]))
    settings = cal.apply(EstimateSettings(sampler=slt_probe.SGLD(), num_chains=4,
                                          num_draws=1000, batch_size=500))
    assert (settings.sampler, settings.warmup_lr, settings.num_warmup, settings.num_burnin) == \
        (cal.sampler, cal.warmup_lr, cal.num_warmup, cal.num_burnin)
    result = estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn, sampler=cal.sampler,
                          num_chains=4, num_draws=1000, num_burnin=cal.num_burnin,
                          batch_size=500, verbose=False)
    assert result.llc_mean == pytest.approx(5.0, rel=0.10)
    slt_probe.plot_calibration(cal, tmp_path / "calibration.png")
    assert (tmp_path / "calibration.png").stat().st_size > 1000
    assert cal.to_dict()["sampler"]["lr"] == cal.sampler.lr


def test_calibration_sets_the_chains_for_a_target_standard_error(regular_problem):
    # The chosen level's spread across its 4 chains sets the chains for the target; the
    # estimate with that many chains then reaches about the target (chains are
    # independent, so the standard error falls as 1/√chains).
    p = regular_problem
    grid = replace(SMALL_GRID, target_relative_sem=0.01)
    cal = calibrate(p.model, (p.x, p.y), loss_fn=p.loss_fn, grid=grid, batch_size=500,
                    verbose=False)
    chosen = next(r for r in cal.table if r["chosen"])
    level_sem = chosen["llc_sem"] / chosen["llc_mean"]
    chains = cal.chains_for(cal.measured_draws)
    assert chains == math.ceil(4 * (level_sem / 0.01) ** 2) > 4
    assert cal.chains_for(cal.measured_draws // 2) == pytest.approx(2 * chains, abs=1)
    assert cal.chains_for(100 * cal.measured_draws) == chains  # draws beyond the level's
    assert replace(cal, grid=replace(grid, max_chains=3)).chains_for(10) == 3
    settings = cal.apply(EstimateSettings(sampler=slt_probe.SGLD(), num_chains=2,
                                          num_draws=cal.measured_draws, batch_size=500))
    assert settings.num_chains == chains
    assert cal.apply(replace(settings, num_chains=chains + 5)).num_chains == chains + 5
    result = estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn, sampler=cal.sampler,
                          num_chains=chains, num_draws=cal.measured_draws,
                          num_burnin=cal.num_burnin, warmup_lr=cal.warmup_lr,
                          num_warmup=cal.num_warmup, batch_size=500, seed=1, verbose=False)
    assert 0.005 < result.llc_sem / result.llc_mean < 0.02
    assert result.llc_mean == pytest.approx(5.0, rel=0.08)
    no_target = calibrate(p.model, (p.x, p.y), loss_fn=p.loss_fn, batch_size=500,
                          grid=replace(SMALL_GRID, target_relative_sem=None), verbose=False)
    assert no_target.chains_for(1000) == 0 and "standard error" not in no_target.reason


def test_calibration_reports_an_exhausted_budget(regular_problem):
    p = regular_problem
    grid = CalibrationGrid(lrs=(1e-3, 1e-4), localizations=(1.0, 10.0), num_chains=2,
                           min_steps=200, max_steps=300)
    with pytest.raises(RuntimeError, match="budget"):
        calibrate(p.model, (p.x, p.y), loss_fn=p.loss_fn, grid=grid, batch_size=500,
                  verbose=False)


def test_a_localisation_too_weak_to_relax_in_the_budget_is_passed_over(regular_problem):
    # Relaxing for min_relax_time/γ = 8 at γ = 1 cannot fit 12,000 steps at the warm-up's
    # ε; at γ = 10 (0.8) it can. The shortfall is foreseen, not spent.
    p = regular_problem
    grid = replace(SMALL_GRID, localizations=(1.0, 10.0), min_relax_time=8.0,
                   max_steps=12_000)
    cal = calibrate(p.model, (p.x, p.y), loss_fn=p.loss_fn, grid=grid, batch_size=500,
                    verbose=False)
    assert cal.sampler.localization == 10.0
    assert "γ = 1: the warm-up" in cal.reason and "would need" in cal.reason
    assert not [r for r in cal.table if r["localization"] == 1.0 and r["stage"] == "warm-up"]
    warm = next(r for r in cal.table if r["localization"] == 10.0 and r["stage"] == "warm-up")
    assert warm["langevin_time"] >= 0.8
    assert cal.num_warmup * cal.warmup_lr == pytest.approx(warm["langevin_time"], rel=0.01)


def test_unknown_sampler_name_is_rejected(tiny_classifier):
    model, x, y = tiny_classifier
    with pytest.raises(ValueError, match="'auto'"):
        estimate_llc(model, (x, y), sampler="automatic", num_chains=2, num_draws=5,
                     verbose=False)
    with pytest.raises(ValueError, match="calibration_grid"):
        estimate_llc(model, (x, y), sampler=slt_probe.SGLD(), calibration_grid=SMALL_GRID,
                     num_chains=2, num_draws=5, verbose=False)


def test_auto_sampler_on_regular_model(regular_problem):
    p = regular_problem
    result = estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn, sampler="auto",
                          num_chains=4, num_draws=500, batch_size=500, verbose=False)
    cal = result.config["calibration"]
    assert result.config["sampler"]["lr"] == cal["sampler"]["lr"]
    assert result.config["num_burnin"] >= cal["num_burnin"]
    assert result.config["num_warmup"] == cal["num_warmup"] > 0
    assert result.config["warmup_lr"] == cal["warmup_lr"] > cal["sampler"]["lr"]
    assert len(cal["table"]) >= 3 and cal["reason"]
    # Chains are raised to what the 3 % standard-error target needs.
    needed = math.ceil(cal["chain_draws_for_target"] / min(500, cal["measured_draws"]))
    assert result.config["num_chains"] == len(result.llc_per_chain) == max(4, min(256, needed))
    assert result.llc_mean == pytest.approx(5.0, rel=0.10)


def test_probe_calibrates_once_and_holds_the_sampler(regular_problem, tmp_path):
    p = regular_problem
    probe = LLCProbe(p.model, (p.x, p.y), loss_fn=p.loss_fn, every=1, sampler="auto",
                     calibration_grid=SMALL_GRID, num_chains=2, num_draws=20, batch_size=500,
                     log_dir=tmp_path, verbose=False)
    probe.maybe_estimate(0)
    first = probe.calibration
    probe.maybe_estimate(1)
    assert first is not None and probe.calibration is first  # not calibrated again
    assert probe.settings.sampler.lr == probe.calibration.sampler.lr
    assert (probe.settings.warmup_lr, probe.settings.num_warmup) == \
        (probe.calibration.warmup_lr, probe.calibration.num_warmup)
    assert probe.history[-1]["llc_mean"] == pytest.approx(5.0, rel=0.5)
    assert "calibration" in (tmp_path / "manifest.json").read_text()


def test_validation_report_marks_misses(tmp_path):
    rows = [{"case": "a", "d": 2, "true_lambda": 1.0, "true_lambda_exact": "1",
             "llc_mean": 1.05, "llc_std": 0.1, "llc_sem": 0.02, "relative_error": 0.05,
             "healthy": True, "lr": 1e-4, "localization": 1.0, "seconds": 3.0,
             "num_chains": 8, "num_draws": 2000, "expected_llc": 0.9,
             "error_vs_expected": 1.05 / 0.9 - 1},
            {"case": "b", "d": 4, "true_lambda": 2.0, "true_lambda_exact": "2",
             "llc_mean": 1.5, "llc_std": 0.1, "llc_sem": 0.05, "relative_error": -0.25,
             "healthy": False, "lr": 1e-5, "localization": 1.0, "seconds": 3.0,
             "num_chains": 40, "num_draws": 2000, "expected_llc": None}]
    text = markdown(rows, "slt-probe validate")
    assert "| 0.9 (λ̂ +16.7%) |" in text and "| 2 | — |" in text
    assert "-25.0% ± 2.5% ✗" in text and "+5.0% ± 2.0% |" in text
    assert "| 40 |" in text and "1 of 2 cases within 10%" in text
    plot_validation(rows, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_plot_trace_writes_png(regular_problem, tmp_path):
    p = regular_problem
    result = estimate_llc(p.model, (p.x, p.y), loss_fn=p.loss_fn, num_chains=2, num_draws=20,
                          batch_size=500, verbose=False)
    slt_probe.plot_trace(result, path=tmp_path / "trace.png")
    assert (tmp_path / "trace.png").stat().st_size > 1000
    assert np.isfinite(result.llc_trace).all()
