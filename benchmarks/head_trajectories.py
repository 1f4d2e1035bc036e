"""Per-head and per-layer λ̂ along the grokking transformer's training, beside the whole
model's, with one calibration for all.

    python benchmarks/head_trajectories.py [--run runs/grokking/modadd-transformer/seed0]
        [--points 14] [--out results/grokking/modadd-transformer/seed0/heads]

Reads a finished ``slt-probe grokking --setup modadd-transformer`` run folder: its
checkpoints, its training metrics and the local regime's calibration (sampler, warm-up,
burn-in and held estimator, chosen on the whole model at the end of memorisation). At
``--points`` of its checkpoints (log-spaced, with the first, the last, the local regime's
peak and the first step at 90 % test accuracy) every attention head (its Q, K, V rows and
output columns) and every layer group (embeddings, attention, MLP, unembedding) is
estimated, all restrictions' chains in one batched run per checkpoint, 4 chains × 200
draws each, seed 0. Writes ``llc.csv`` (resumable), ``heads.png`` and ``heads.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import slt_probe
from slt_probe.calibration import Calibration
from slt_probe.experiments.presets import build_model, build_task, preset
from slt_probe.reports import markdown_table
from slt_probe.restrictions import attention_heads
from slt_probe.run_log import read_rows, write_text_atomic

LAYER_GROUPS = {"embeddings": ["embed", "pos_embed"], "attention": ["qkv", "attn_out"],
                "mlp": ["mlp_in", "mlp_out"], "unembedding": ["unembed"]}


def chosen_steps(run: Path, points: int) -> tuple[list[int], int | None, int]:
    """Checkpoints to estimate: log-spaced, plus the first, the last, the local peak and
    the grokking step (first ≥ 90 % test accuracy); also returns those two."""
    local = [r for r in read_rows(run / "local" / "llc.csv") if r["llc_mean"] is not None]
    steps = [r["step"] for r in local]
    peak = max(local, key=lambda r: r["llc_mean"])["step"]
    grok = next((r["step"] for r in read_rows(run / "metrics.csv")
                 if (r.get("test_acc") or 0) >= 0.9), None)
    wanted = {steps[0], steps[-1], peak}
    grid = np.geomspace(1, steps[-1], points)
    wanted |= {min(steps, key=lambda s: abs(math.log1p(s) - math.log1p(g))) for g in grid}
    if grok is not None:
        wanted.add(min((s for s in steps if s >= grok), default=steps[-1]))
    return sorted(wanted), grok, peak


def differentiation(rows: list[dict], heads: list[str]) -> list[dict]:
    """The heads' spread at each step: coefficient of variation and max/min."""
    out = []
    for row in rows:
        values = np.array([row[f"llc[{h}]"] for h in heads], dtype=float)
        mean = values.mean()
        out.append({"step": row["step"], "cv": float(values.std() / mean) if mean > 0 else None,
                    "max_over_min": float(values.max() / values.min())
                    if values.min() > 0 else None})
    return out


def plot(rows, heads, groups, grok, path: Path, title: str) -> None:
    steps = np.array([max(r["step"], 1) for r in rows])
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for axis, names, label in ((top, heads, "head"), (bottom, groups, "layer")):
        axis.plot(steps, [r["llc_mean"] for r in rows], "k-", lw=2.5, label="whole model")
        for name in names:
            mean = np.array([r[f"llc[{name}]"] for r in rows], dtype=float)
            sem = np.array([r[f"llc_sem[{name}]"] for r in rows], dtype=float)
            axis.plot(steps, mean, marker="o", ms=3, label=name)
            axis.fill_between(steps, mean - 2 * sem, mean + 2 * sem, alpha=0.2)
        if grok is not None:
            axis.axvline(max(grok, 1), color="grey", ls="--", label="90 % test accuracy")
        axis.set_xscale("log")
        axis.set_ylabel(f"λ̂ (per {label})")
        axis.legend(fontsize=8, ncol=2)
    bottom.set_xlabel("training step (step 0 drawn at 1)")
    top.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/grokking/modadd-transformer/seed0")
    parser.add_argument("--points", type=int, default=14)
    parser.add_argument("--out", default="results/grokking/modadd-transformer/seed0/heads")
    args = parser.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = preset("modadd-transformer")
    seed = json.loads((run / "training.json").read_text())["seed"]
    model = build_model(config, "relu", seed)
    task = build_task(config, seed)
    data = (task.x_train, task.targets(task.y_train, config.loss))
    manifest = json.loads((run / "local" / "manifest.json").read_text())
    calibration = Calibration.from_dict(manifest["calibration"])
    held = manifest["settings"]["gradient_correction"]
    settings = calibration.apply(slt_probe.EstimateSettings(
        num_chains=4, num_draws=200, batch_size=config.local.batch_size, seed=0,
        gradient_correction=held))
    heads = attention_heads(model)
    groups = dict(LAYER_GROUPS)
    steps, grok, peak = chosen_steps(run, args.points)
    paths = [run / "checkpoints" / f"step_{s:09d}.pt" for s in steps]
    rows = slt_probe.llc_trajectory(model, paths, data, settings, steps=steps,
                                    loss_fn=config.loss, log_dir=out,
                                    restrictions={**heads, **groups})
    names = list(heads)
    spread = differentiation(rows, names)
    title = (f"modadd transformer seed {seed}: per-head and per-layer λ̂, one calibration "
             f"(γ {settings.sampler.localization:g}, ε {settings.sampler.lr:.3g})")
    plot(rows, names, list(groups), grok, out / "heads.png", title)
    table = [[r["step"], f"{r['llc_mean']:.3g}",
              *[f"{r[f'llc[{h}]']:.3g}" for h in names],
              *[f"{r[f'llc[{g}]']:.3g}" for g in groups],
              "—" if s["cv"] is None else f"{s['cv']:.2f}"] for r, s in zip(rows, spread)]
    command = "python benchmarks/head_trajectories.py " + " ".join(argv or sys.argv[1:])
    text = (f"# Per-head and per-layer λ̂, seed {seed}\n\n`{command.strip()}`. One "
            f"calibration for every restriction and checkpoint: the local regime's, chosen on "
            f"the whole model (SGLD ε {settings.sampler.lr:.3g}, γ "
            f"{settings.sampler.localization:g}, nβ = n/log n, warm-up "
            f"{settings.num_warmup}, burn-in {settings.num_burnin}, gradient correction "
            f"{held}); 4 chains × 200 draws per restriction. Local peak of the whole model "
            f"at step {peak}; 90 % test accuracy first at step {grok}. cv: the heads' "
            "standard deviation over their mean.\n\n"
            + "\n".join(markdown_table(["step", "whole model", *names, *groups, "cv (heads)"],
                                       table)) + "\n")
    write_text_atomic(out / "heads.md", text)
    print(text)


if __name__ == "__main__":
    main()
