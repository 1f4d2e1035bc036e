"""Compare LLC trajectories across activations and seeds, beside the simplicity bias at
initialisation and how alike the trained functions of different seeds are.

Every (activation, seed) run is a grokking run (``experiments.grokking``) in
``out/<activation>/seed<k>``, with one sampler per regime for the whole comparison: the
local regime's calibration is made once, on the first run's checkpoint at the end of
memorisation, and recorded in ``out/calibration.json``; the notebook regime's hand
sampler in ``out/notebook_sampler.json``. A resumed comparison reads both back, so runs
added later cannot change them; finished runs are reused, not recomputed. Writes
``summary.csv``/``summary.md`` (one row per activation and regime), ``redshift.csv``,
``trajectories_<regime>.png`` and ``redshift.png``.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..calibration import Calibration
from ..executors import SerialExecutor
from ..reports import markdown_table, mean_pm_std, plot_comparison, plot_redshift
from ..run_log import write_csv_atomic, write_json_atomic, write_text_atomic
from .models import activation
from .presets import REGIMES, GrokkingConfig, build_model, build_task, preset
from .redshift import WEIGHT_SCALES, complexity_at_init
from .summary import aggregate, load_run, resolution_report
from .sweeps import grokking_sweep
from .training import MODEL_NAME

CALIBRATION_NAME = "calibration.json"
NOTEBOOK_NAME = "notebook_sampler.json"


def seed_agreement(models: list[torch.nn.Module], x: torch.Tensor) -> dict:
    """How different models trained from different seeds are as functions on inputs ``x``:
    mean pairwise disagreement of their predicted classes, and the variance over seeds of
    their predicted probabilities (averaged over inputs and classes)."""
    if len(models) < 2:
        return {"disagreement": None, "prediction_variance": None}
    with torch.no_grad():
        probs = torch.stack([torch.cat([m(c) for c in x.split(4096)]).softmax(-1)
                             for m in models])
    labels = probs.argmax(-1)
    pairs = list(itertools.combinations(range(len(models)), 2))
    disagreement = float(np.mean([(labels[i] != labels[j]).float().mean() for i, j in pairs]))
    return {"disagreement": disagreement,
            "prediction_variance": float(probs.var(dim=0, unbiased=True).mean())}


def held_out_everywhere(tasks) -> torch.Tensor:
    """Test inputs of the first task that no task trained on (seeds split differently)."""
    seen = {row.numpy().tobytes() for t in tasks for row in t.x_train}
    keep = [i for i, row in enumerate(tasks[0].x_test) if row.numpy().tobytes() not in seen]
    if not keep:
        raise ValueError("no input is held out from every seed's training set")
    return tasks[0].x_test[keep]


def run_comparison(setup: str, activations: list[str], seeds: int | list[int], *,
                   quick: bool = False, out: str | Path, config: GrokkingConfig | None = None,
                   regimes=REGIMES, mnist_dir=None, scales=WEIGHT_SCALES,
                   executor=None, command: str | None = None,
                   verbose: bool = True) -> list[dict]:
    """Every (activation, seed) run under one sampler per regime; one summary row per
    activation and regime. Every name is checked before the first run starts. The runs
    are tasks of ``executor`` (default: serial, in this process): the first alone (its
    checkpoint at the end of memorisation calibrates the local regime for all), then the
    rest at once."""
    if not activations:
        raise ValueError("activations is empty")
    for name in activations:
        activation(name)
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise ValueError("need at least one seed")
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown:
        raise ValueError(f"regimes must be among {REGIMES}, got {unknown}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or preset(setup, quick)
    if "notebook" in regimes:
        write_json_atomic(out / NOTEBOOK_NAME, asdict(config.llc))
    calibrations = _recorded_calibrations(out)
    executor = executor or SerialExecutor()
    jobs = [(a, s, out / a / f"seed{s}") for a in activations for s in seeds]
    sweep = dict(quick=quick, config=config, regimes=regimes, mnist_dir=mnist_dir,
                 executor=executor, command=command, verbose=verbose)
    first_act, first_seed, first_folder = jobs[0]
    if "local" in regimes and "local" not in calibrations:
        grokking_sweep(setup, jobs[:1], calibrations=calibrations, **sweep)
        manifest = json.loads((first_folder / "local" / "manifest.json").read_text())
        calibrations["local"] = Calibration.from_dict(manifest["calibration"])
        write_json_atomic(out / CALIBRATION_NAME, {
            "calibrated_on": f"{first_act}/seed{first_seed}",
            "calibration": manifest["calibration"]})
    grokking_sweep(setup, jobs, calibrations=calibrations, **sweep)
    runs: dict[tuple[str, str], list[tuple[dict, list[dict], Path]]] = {}
    for act, seed, folder in jobs:
        for regime in regimes:
            summary, rows = load_run(folder / regime)
            runs.setdefault((act, regime), []).append((summary, rows, folder))

    tasks = [build_task(config, s, mnist_dir) for s in seeds]
    held_out = held_out_everywhere(tasks)
    redshift_rows, summary_rows = [], []
    for act in activations:
        models = []
        for seed in seeds:
            model = build_model(config, act, seed)
            model.load_state_dict(torch.load(out / act / f"seed{seed}" / MODEL_NAME))
            models.append(model.eval())
        agreement = seed_agreement(models, held_out)
        bias = complexity_at_init(lambda seed: build_model(config, act, seed),
                                  reference=tasks[0].x_train, scales=scales, seeds=seeds)
        redshift_rows += [{"activation": act, **r} for r in bias]
        at_default = [r for r in bias if r["scale"] == 1.0] or bias
        for regime in regimes:
            summaries = [s for s, _, _ in runs[(act, regime)]]
            summary_rows.append({
                "activation": act, "regime": regime,
                **aggregate(summaries, keys=("llc_init", "llc_peak", "llc_final",
                                             "llc_peak_step", "grok_step", "final_test_acc",
                                             "llc_final_excess_ratio", "llc_seconds")),
                "not_local_points": sum(s.get("not_local_points") or 0 for s in summaries),
                "num_llc_points": sum(s.get("num_llc_points") or 0 for s in summaries),
                **agreement,
                "init_mean_frequency": float(np.mean([r["mean_frequency"] for r in at_default])),
                "init_lz": float(np.mean([r["lz"] for r in at_default]))})

    write_csv_atomic(out / "summary.csv", summary_rows)
    write_csv_atomic(out / "redshift.csv", redshift_rows)
    write_text_atomic(out / "summary.md", summary_markdown(summary_rows, setup, config,
                                                           calibrations, command))
    for regime in regimes:
        plot_comparison({a: [rows for _, rows, _ in runs[(a, regime)]] for a in activations},
                        out / f"trajectories_{regime}.png",
                        title=f"{setup}: λ̂ by activation, {regime} regime (mean ± std over "
                              f"{len(seeds)} seeds)")
    plot_redshift(redshift_rows, out / "redshift.png")
    claims = resolution_report(out)  # per activation: the claims at each γ, and its figure
    if claims:
        write_text_atomic(out / "claims.md", f"# Claims at each resolution: {setup}\n\n"
                          "One row per activation and γ (rows: activations). Regenerate "
                          f"with the command in `summary.md`.\n\n{claims}")
    return summary_rows


def _recorded_calibrations(out: Path) -> dict[str, Calibration]:
    path = out / CALIBRATION_NAME
    if not path.exists():
        return {}
    return {"local": Calibration.from_dict(json.loads(path.read_text())["calibration"])}


def _pm(row: dict, key: str, fmt: str = ".3g") -> str:
    text = mean_pm_std(row.get(key), row.get(f"{key}_std"), fmt)
    count = row.get(f"{key}_count")
    if row.get(key) is not None and count is not None and count < row["num_runs"]:
        text += f" ({count}/{row['num_runs']} runs)"
    return text


def summary_markdown(rows: list[dict], setup: str, config: GrokkingConfig,
                     calibrations: dict[str, Calibration], command=None) -> str:
    lines = [f"# Activation comparison: {setup}", ""]
    if command:
        lines += [f"Regenerate: `{command}`", ""]
    notebook = config.llc
    lines += [f"- notebook regime (fixed for all runs): SGLD ε={notebook.lr:g}, "
              f"γ={notebook.localization:g}, nβ={notebook.nbeta:g}, {notebook.num_chains} "
              f"chains × {notebook.num_draws} draws after {notebook.num_burnin} burn-in "
              f"({notebook.source})."]
    if "local" in calibrations:
        cal = calibrations["local"]
        lines += [f"- local regime (fixed for all runs): SGLD ε={cal.sampler.lr:.3g}, "
                  f"γ={cal.sampler.localization:g}, nβ={cal.nbeta:.4g} (n/log n), warm-up "
                  f"{cal.num_warmup:,} steps at ε={cal.warmup_lr:.3g}, burn-in "
                  f"{cal.num_burnin}, gradient correction "
                  f"{'on' if cal.gradient_correction else 'off'} for every point; chosen by "
                  f"`slt_probe.calibrate` on the first run at the end of memorisation: "
                  f"{cal.reason}."]
    lines.append("")
    header = ["activation", "regime", "runs", "λ̂ init", "λ̂ peak", "peak step", "λ̂ final",
              "r final", "points not local", "grokking step", "final test acc",
              "seed disagreement", "prediction variance", "init mean freq", "init LZ"]
    lines += markdown_table(header, [
        [r["activation"], r["regime"], r["num_runs"], _pm(r, "llc_init"), _pm(r, "llc_peak"),
         _pm(r, "llc_peak_step", ".0f"), _pm(r, "llc_final"),
         _pm(r, "llc_final_excess_ratio", ".2f"),
         f"{r['not_local_points']}/{r['num_llc_points']}", _pm(r, "grok_step", ".0f"),
         _pm(r, "final_test_acc"), mean_pm_std(r["disagreement"]),
         mean_pm_std(r["prediction_variance"]), mean_pm_std(r["init_mean_frequency"]),
         mean_pm_std(r["init_lz"])] for r in rows])
    lines += ["", "± is the std over seeds; r is the excess ratio of the final estimate (how "
              "much of the loss gap to the best constant predictor the chains gave back; "
              "above 0.25 the chains are not local). Seed disagreement: mean pairwise "
              "fraction of held-out inputs where two seeds predict different classes; "
              "prediction variance: variance over seeds of predicted probabilities. Init "
              "mean freq / LZ: complexity of the untrained network's function on a 2-D input "
              "slice at the default weight scale (see redshift.csv and redshift.png for "
              "other scales).", ""]
    return "\n".join(lines)
