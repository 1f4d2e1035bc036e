"""Compare LLC trajectories across activations and seeds, beside the simplicity bias at
initialisation and the run-to-run spread of the trained functions.

Every (activation, seed) run is a grokking run (``experiments.grokking``) in
``out/<activation>/seed<k>``, all with one sampler: held fixed for the whole comparison and
recorded in ``out/sampler.json`` (a resumed comparison reads it back, so adding runs later
cannot change it). Finished runs (a ``summary.json``) are reused, not recomputed.
Writes ``summary.csv``/``summary.md`` (one row per activation), ``redshift.csv``,
``trajectories.png`` and ``redshift.png``.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..reports import markdown_table, mean_pm_std, plot_comparison, plot_redshift
from ..run_log import write_csv_atomic, write_json_atomic, write_text_atomic
from .grokking import run_grokking
from .presets import GrokkingConfig, LLCSettings, build_model, build_task, preset
from .redshift import WEIGHT_SCALES, complexity_at_init
from .summary import MODEL_NAME, aggregate, load_run

SAMPLER_NAME = "sampler.json"


def _fixed_sampler(out: Path, config: GrokkingConfig) -> LLCSettings:
    path = out / SAMPLER_NAME
    if path.exists():
        return LLCSettings(**json.loads(path.read_text()))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, asdict(config.llc))
    return config.llc


def homogeneity(models: list[torch.nn.Module], x: torch.Tensor) -> dict:
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
                   mnist_dir=None, scales=WEIGHT_SCALES, command: str | None = None,
                   verbose: bool = True) -> list[dict]:
    if not activations:
        raise ValueError("activations is empty")
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise ValueError("need at least one seed")
    out = Path(out)
    config = config or preset(setup, quick)
    sampler = _fixed_sampler(out, config)
    config = replace(config, llc=sampler)
    runs: dict[str, list[tuple[dict, list[dict], Path]]] = {}
    jobs = [(a, s) for a in activations for s in seeds]
    for act, seed in tqdm(jobs, desc=f"compare {setup}", disable=not verbose):
        folder = out / act / f"seed{seed}"
        finished = load_run(folder)
        if finished is None:
            run_grokking(setup, activation_name=act, seed=seed, quick=quick, out=folder,
                         config=config, mnist_dir=mnist_dir, command=command, verbose=False)
            finished = load_run(folder)
        runs.setdefault(act, []).append((*finished, folder))

    tasks = [build_task(config, s, mnist_dir) for s in seeds]
    task = tasks[0]
    held_out = held_out_everywhere(tasks)
    redshift_rows = []
    summary_rows = []
    for act in activations:
        summaries = [s for s, _, _ in runs[act]]
        row = {"activation": act, **aggregate(summaries)}
        models = []
        for summary, _, folder in runs[act]:
            model = build_model(config, act, summary["seed"])
            model.load_state_dict(torch.load(folder / MODEL_NAME))
            model.eval()
            models.append(model)
        row.update(homogeneity(models, held_out))
        bias = complexity_at_init(lambda seed: build_model(config, act, seed),
                                  reference=task.x_train, scales=scales, seeds=seeds)
        redshift_rows += [{"activation": act, **r} for r in bias]
        at_default = [r for r in bias if r["scale"] == 1.0] or bias
        row["init_mean_frequency"] = float(np.mean([r["mean_frequency"] for r in at_default]))
        row["init_lz"] = float(np.mean([r["lz"] for r in at_default]))
        summary_rows.append(row)

    write_csv_atomic(out / "summary.csv", summary_rows)
    write_csv_atomic(out / "redshift.csv", redshift_rows)
    write_text_atomic(out / "summary.md", summary_markdown(summary_rows, setup, sampler, command))
    plot_comparison({a: [rows for _, rows, _ in runs[a]] for a in activations},
                    out / "trajectories.png", title=f"{setup}: λ̂ by activation "
                    f"(mean ± std over {len(seeds)} seeds)")
    plot_redshift(redshift_rows, out / "redshift.png")
    return summary_rows


def _pm(row: dict, key: str, fmt: str = ".3g") -> str:
    text = mean_pm_std(row.get(key), row.get(f"{key}_std"), fmt)
    count = row.get(f"{key}_count")
    if row.get(key) is not None and count is not None and count < row["num_runs"]:
        text += f" ({count}/{row['num_runs']} runs)"
    return text


def summary_markdown(rows: list[dict], setup: str, sampler: LLCSettings, command=None) -> str:
    lines = [f"# Activation comparison: {setup}", ""]
    if command:
        lines += [f"Regenerate: `{command}`", ""]
    lines += [f"Sampler (fixed for all runs): SGLD ε={sampler.lr:g}, γ={sampler.localization:g}, "
              f"nβ={sampler.nbeta:g}, {sampler.num_chains} chains × {sampler.num_draws} draws "
              f"after {sampler.num_burnin} burn-in ({sampler.source}).", ""]
    header = ["activation", "runs", "λ̂ init", "λ̂ peak", "peak step", "λ̂ final",
              "grokking step", "final test acc", "seed disagreement", "prediction variance",
              "init mean freq", "init LZ"]
    lines += markdown_table(header, [
        [r["activation"], r["num_runs"], _pm(r, "llc_init"), _pm(r, "llc_peak"),
         _pm(r, "llc_peak_step", ".0f"), _pm(r, "llc_final"), _pm(r, "grok_step", ".0f"),
         _pm(r, "final_test_acc"), mean_pm_std(r["disagreement"]),
         mean_pm_std(r["prediction_variance"]), mean_pm_std(r["init_mean_frequency"]),
         mean_pm_std(r["init_lz"])] for r in rows])
    lines += ["", "± is the std over seeds. Seed disagreement: mean pairwise fraction of held-out "
              "inputs where two seeds predict different classes; prediction variance: variance "
              "over seeds of predicted probabilities. Init mean freq / LZ: complexity of the "
              "untrained network's function on a 2-D input slice at the default weight scale "
              "(see redshift.csv and redshift.png for other scales).", ""]
    return "\n".join(lines)
