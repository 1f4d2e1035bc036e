"""λ̂ at lower precision beside float32: the same checkpoint, sampler, seed and draws.

    python benchmarks/precision.py [--models modadd-mlp,modadd-transformer,mnist-mlp]
        [--runs runs/grokking] [--device cpu] [--out results/benchmarks]

For each bundled grokking setup, the checkpoint at the peak of its local-regime trajectory
(``RUNS/<setup>/seed0``, written by ``slt-probe grokking``), estimated with that run's
calibrated sampler, warm-up and burn-in, once per precision: float32, bfloat16 autocast,
and on a GPU TF32. The language models of ``bench_llc.py`` (``--models lm-21m``, GPU only:
random initialisation, γ = 100, ε = 1e-6) can be added. A precision agrees when its λ̂ is
within two standard errors of the difference from float32's. Writes ``OUT/precision.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import slt_probe
from slt_probe.calibration import Calibration
from slt_probe.experiments.grokking import default_activation
from slt_probe.experiments.presets import build_model, build_task, preset
from slt_probe.run_log import read_rows, write_text_atomic

sys.path.insert(0, str(Path(__file__).parent))
from bench_llc import LANGUAGE_MODELS, build  # noqa: E402 - a sibling script

DRAWS = 200


def _grokking_problem(setup: str, runs: Path, device: str):
    folder = runs / setup / "seed0"
    rows = [r for r in read_rows(folder / "local" / "llc.csv")
            if r["llc_mean"] is not None and r.get("local") is not False
            and r.get("critical_point") is not False]
    step = max(rows, key=lambda r: r["llc_mean"])["step"]
    config = preset(setup)
    model = build_model(config, default_activation(config), 0)
    model.load_state_dict(torch.load(folder / "checkpoints" / f"step_{step:09d}.pt"))
    task = build_task(config, 0)
    manifest = json.loads((folder / "local" / "manifest.json").read_text())
    calibration = Calibration.from_dict(manifest["calibration"])
    settings = calibration.apply(slt_probe.EstimateSettings(
        num_chains=4, num_draws=DRAWS, batch_size=config.local.batch_size, seed=0,
        gradient_correction=False, device=device))
    loss = config.loss
    return model, (task.x_train, task.targets(task.y_train, loss)), loss, settings, step


def _language_problem(name: str, device: str):
    model, x, y = build(name)
    settings = slt_probe.EstimateSettings(
        sampler=slt_probe.SGLD(lr=1e-6, localization=100.0), num_chains=4, num_draws=DRAWS,
        num_burnin=100, batch_size=64, seed=0, gradient_correction=False, device=device)
    return model, (x, y), "cross_entropy", settings, None


def compare(name: str, runs: Path, device: str) -> list[dict]:
    if name in LANGUAGE_MODELS or name == "gpt2-124m":
        model, data, loss, settings, step = _language_problem(name, device)
    else:
        model, data, loss, settings, step = _grokking_problem(name, runs, device)
    precisions = ["float32", "bfloat16"] + (["tf32"] if device.startswith("cuda") else [])
    rows = []
    for precision in precisions:
        started = time.perf_counter()
        result = slt_probe.estimate_llc(model, data, loss_fn=loss, verbose=False,
                                        settings=settings, precision=precision)
        rows.append({"model": name, "step": step, "precision": precision,
                     "llc": result.llc_mean, "sem": result.llc_sem,
                     "seconds": time.perf_counter() - started,
                     "path": result.config["compute_path"],
                     "sampler": result.config["sampler"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], command: str, device: str) -> str:
    lines = [f"Measured with `{command}` ({device}, torch {torch.__version__}). One "
             f"checkpoint per model, its run's calibrated sampler, 4 chains × {DRAWS} draws, "
             "seed 0; |Δ| in standard errors of the difference from float32.", "",
             "| model | step | precision | λ̂ ± SE | Δ from float32 | |Δ| / SE | agrees | s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"]
                    and r["precision"] == "float32")
        delta = row["llc"] - base["llc"]
        spread = math.hypot(row["sem"], base["sem"])
        score = abs(delta) / spread if spread else float("nan")
        agrees = "—" if row is base else ("yes" if score <= 2 else "no")
        lines.append(f"| {row['model']} | {row['step'] if row['step'] is not None else '—'} | "
                     f"{row['precision']} | {row['llc']:.4g} ± {row['sem']:.2g} | "
                     f"{delta:+.3g} | {score:.2f} | {agrees} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="modadd-mlp,modadd-transformer,mnist-mlp")
    parser.add_argument("--runs", default="runs/grokking")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    rows = [row for name in args.models.split(",")
            for row in compare(name, Path(args.runs), args.device)]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    command = "python benchmarks/precision.py " + " ".join(argv or sys.argv[1:])
    table = markdown(rows, command, device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out) / "precision.md", table)
    print(table)


if __name__ == "__main__":
    main()
