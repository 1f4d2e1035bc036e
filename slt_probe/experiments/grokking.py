"""Grokking runs with the LLC probe attached: named presets, the training loop, the summary.

Three setups (../shared/SCIENCE.md): ``modadd-transformer`` (Nanda et al. 2023),
``modadd-mlp`` (the devinterp grokking MLP) and ``mnist-mlp`` (Omnigrok's large-init MNIST
MLP). Each has a full preset (the published configuration, deviations stated in
``notes``) and a quick preset that still groks in a couple of minutes on 2 CPU cores.
A run writes ``llc.csv`` (probe rows + train/test metrics), ``summary.json``,
``manifest.json`` and ``trajectory.png`` into its folder. Not here: plotting details
(``reports``), comparing activations (``experiments.compare``).
"""
from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..losses import resolve_loss
from ..models import ModAddMLP, ModAddTransformer, activation, mlp
from ..probe import MANIFEST_NAME, LLCProbe, log_spaced_steps, read_rows
from ..samplers import SGLD
from .tasks import Task, mnist_task, modadd_task

SUMMARY_NAME = "summary.json"
PLOT_NAME = "trajectory.png"
MODEL_NAME = "model.pt"  # the trained weights: comparisons read the runs' final functions


@dataclass(frozen=True)
class LLCSettings:
    """The probe's sampler, held fixed for every estimate of a run (and across runs of a
    comparison, so trajectories are comparable)."""

    lr: float
    localization: float
    nbeta: float
    num_chains: int = 4
    num_draws: int = 300
    num_burnin: int = 100
    batch_size: int = 128
    source: str = ""

    def sampler(self) -> SGLD:
        return SGLD(lr=self.lr, localization=self.localization, nbeta=self.nbeta)


@dataclass(frozen=True)
class GrokkingConfig:
    """Everything a run depends on besides the activation and the seed."""

    setup: str
    model: str  # "modadd-mlp" | "modadd-transformer" | "mlp"
    model_kwargs: dict
    task: str  # "modadd" | "mnist"
    task_kwargs: dict
    loss: str  # "cross_entropy" | "mse"
    optimizer: str  # "adam" | "adamw"
    lr: float
    weight_decay: float
    num_steps: int
    llc: LLCSettings
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int | None = None  # None: full batch
    init_scale: float = 1.0  # Omnigrok's α: every initial parameter multiplied by it
    num_log_points: int = 30  # log-spaced LLC estimates …
    num_regular_points: int = 20  # … plus evenly spaced ones
    num_eval_points: int = 100
    grok_accuracy: float = 0.9  # test accuracy that counts as grokked
    # Nanda et al. take the training loss in float64: in float32 the softmax of a confidently
    # right logit rounds to exactly 1, so those examples stop giving gradient.
    float64_loss: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        if self.loss not in ("cross_entropy", "mse"):
            raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {self.loss!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size}")

    def llc_steps(self) -> list[int]:
        regular = range(0, self.num_steps + 1, max(1, self.num_steps // self.num_regular_points))
        return sorted({0, self.num_steps, *regular,
                       *log_spaced_steps(self.num_steps, self.num_log_points)})

    def eval_steps(self) -> list[int]:
        regular = range(0, self.num_steps + 1, max(1, self.num_steps // self.num_eval_points))
        return sorted({*regular, *self.llc_steps()})

    def to_dict(self) -> dict:
        return asdict(self)


MODADD_MLP = GrokkingConfig(
    setup="modadd-mlp", model="modadd-mlp", model_kwargs={"p": 53, "embed_dim": 12, "hidden": 48},
    task="modadd", task_kwargs={"p": 53, "train_fraction": 0.4}, loss="cross_entropy",
    optimizer="adam", lr=5e-3, weight_decay=2e-3, batch_size=128, num_steps=12_000,
    llc=LLCSettings(lr=3e-3, localization=5.0, nbeta=2.0, num_draws=400, num_burnin=300,
                    source="devinterp grokking notebook regime (SGLD ε=3e-3, γ=5, nβ=2)"),
    notes="weight decay 2e-3 instead of the notebook's 2e-4: with 2e-4 test accuracy was "
          "1.6 % after 30k steps (no grokking); with 2e-3 it groks at ~6-8k steps")

MODADD_TRANSFORMER = GrokkingConfig(
    setup="modadd-transformer", model="modadd-transformer",
    model_kwargs={"p": 113, "d_model": 128, "num_heads": 4, "d_mlp": 512},
    task="modadd", task_kwargs={"p": 113, "train_fraction": 0.3}, loss="cross_entropy",
    optimizer="adamw", lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98), batch_size=None,
    num_steps=20_000, num_log_points=27, num_regular_points=15, float64_loss=True,
    llc=LLCSettings(lr=1e-4, localization=100.0, nbeta=2.0, num_draws=200, num_burnin=200,
                    source="nβ=2 as in the devinterp grokking notebook; ε by hand sweep on the "
                           "trained quick model (γ=5: ε=1e-4 accepts 0.80, 3e-4 0.45, 1e-3 0); "
                           "γ=100 so chains relax within burn-in (2/(εγ)=200 steps)"),
    notes="Nanda et al. configuration (their initialisation, float64 training loss); the = "
          "token is appended inside the model; 20k steps because 12k did not reach grokking")

MNIST_MLP = GrokkingConfig(
    setup="mnist-mlp", model="mlp", model_kwargs={"widths": [784, 200, 200, 10]},
    task="mnist", task_kwargs={"num_train": 1000}, loss="mse", optimizer="adamw", lr=1e-3,
    weight_decay=0.01, batch_size=200, init_scale=8.0, num_steps=100_000,
    llc=LLCSettings(lr=3e-4, localization=100.0, nbeta=2.0, num_burnin=200, batch_size=200,
                    source="nβ=2 as in the devinterp grokking notebook; ε, γ by hand sweep on "
                           "the trained quick model: (3e-4, 100) accepts 0.79 with R-hat 1.24; "
                           "γ=5 did not relax within 600 steps (R-hat > 1.8)"),
    grok_accuracy=0.85,  # 1,000 training images cap MNIST test accuracy near 0.9
    notes="Omnigrok (Liu et al. 2022) with the 10k MNIST test split: 1,000 images train, "
          "9,000 held out")

FULL = {c.setup: c for c in (MODADD_TRANSFORMER, MODADD_MLP, MNIST_MLP)}
QUICK = {
    "modadd-mlp": replace(MODADD_MLP, num_steps=8_000, num_log_points=12, num_regular_points=8,
                          llc=replace(MODADD_MLP.llc, num_draws=200)),
    "modadd-transformer": replace(
        MODADD_TRANSFORMER, model_kwargs={"p": 31, "d_model": 64, "num_heads": 4, "d_mlp": 256},
        task_kwargs={"p": 31, "train_fraction": 0.6}, weight_decay=3.0, num_steps=3_000,
        num_log_points=10, num_regular_points=6, llc=replace(MODADD_TRANSFORMER.llc, num_draws=150)),
    "mnist-mlp": replace(MNIST_MLP, num_steps=8_000, num_log_points=10, num_regular_points=5,
                         lr=2e-3, weight_decay=0.1,
                         llc=replace(MNIST_MLP.llc, num_draws=100, num_burnin=150)),
}
SETUPS = tuple(FULL)


def preset(setup: str, quick: bool = False) -> GrokkingConfig:
    if setup not in FULL:
        raise ValueError(f"setup must be one of {list(FULL)}, got {setup!r}")
    return (QUICK if quick else FULL)[setup]


def build_model(config: GrokkingConfig, act: str, seed: int) -> nn.Module:
    activation(act)  # fails early with the list of names
    torch.manual_seed(seed)
    if config.model == "modadd-mlp":
        model = ModAddMLP(act=act, **config.model_kwargs)
    elif config.model == "modadd-transformer":
        model = ModAddTransformer(act=act, **config.model_kwargs)
    elif config.model == "mlp":
        model = mlp(act=act, **config.model_kwargs)
    else:
        raise ValueError(f"unknown model {config.model!r}")
    if config.init_scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(config.init_scale)
    return model


def build_task(config: GrokkingConfig, seed: int, mnist_dir=None) -> Task:
    if config.task == "modadd":
        return modadd_task(seed=seed, **config.task_kwargs)
    if config.task == "mnist":
        return mnist_task(seed=seed, directory=mnist_dir, **config.task_kwargs)
    raise ValueError(f"unknown task {config.task!r}")


def make_optimizer(config: GrokkingConfig, model: nn.Module) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
               betas=config.betas)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, loss: str) -> dict:
    was_training = model.training
    model.eval()
    metrics = {}
    for split, x, y in (("train", task.x_train, task.y_train), ("test", task.x_test, task.y_test)):
        out = torch.cat([model(chunk) for chunk in x.split(4096)])
        target = task.targets(y, loss)
        value = resolve_loss(loss).batch(out, target)
        metrics[f"{split}_loss"] = float(value)
        metrics[f"{split}_acc"] = float((out.argmax(1) == y).float().mean())
    model.train(was_training)
    return metrics


class Batches:
    """Shuffled epochs of training indices from the run's own generator (or the full batch)."""

    def __init__(self, n: int, batch_size: int | None, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed + 1)
        self._queue: list[torch.Tensor] = []

    def next(self) -> torch.Tensor | None:
        if self.batch_size is None or self.batch_size >= self.n:
            return None
        if not self._queue:
            self._queue = list(torch.randperm(self.n, generator=self.generator).split(self.batch_size))
        return self._queue.pop(0)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def run_grokking(setup: str, *, activation_name: str | None = None, seed: int = 0,
                 quick: bool = False, out: str | Path | None = None,
                 config: GrokkingConfig | None = None, llc: LLCSettings | None = None,
                 mnist_dir=None, command: str | None = None, verbose: bool = True) -> dict:
    """Train one setup with the probe attached; return the summary (also written to ``out``).

    ``config`` overrides the preset, ``llc`` the sampler (a comparison holds one fixed).
    """
    config = config or preset(setup, quick)
    if llc is not None:
        config = replace(config, llc=llc)
    act = activation_name or ("gelu" if config.model == "modadd-mlp" else "relu")
    task = build_task(config, seed, mnist_dir)
    model = build_model(config, act, seed)
    optimizer = make_optimizer(config, model)
    out = Path(out) if out is not None else None
    if out is not None:
        for name in ("llc.csv", MANIFEST_NAME, SUMMARY_NAME):  # a run restarts from step 0
            (out / name).unlink(missing_ok=True)
    targets = task.targets(task.y_train, config.loss)
    settings = config.llc
    probe = LLCProbe(model, (task.x_train, targets), loss_fn=config.loss, every=None,
                     steps=config.llc_steps(), sampler=settings.sampler(),
                     num_chains=settings.num_chains, num_draws=settings.num_draws,
                     num_burnin=settings.num_burnin, batch_size=settings.batch_size,
                     seed=seed, log_dir=out, verbose=False)
    eval_steps = set(config.eval_steps())
    batch_loss = resolve_loss(config.loss).batch
    batches = Batches(len(task.x_train), config.batch_size, seed)
    commit = git_commit()  # the code that trains, not whatever is checked out when it ends
    started = time.perf_counter()
    model.train()
    bar = tqdm(total=config.num_steps, desc=f"{setup} {act} seed {seed}", disable=not verbose)
    with probe:
        probe.log(0, **evaluate(model, task, config.loss))
        probe.attach(optimizer)
        for step in range(1, config.num_steps + 1):
            index = batches.next()
            x, y = (task.x_train, targets) if index is None else (task.x_train[index], targets[index])
            output = model(x)
            loss = batch_loss(output.double() if config.float64_loss else output, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # the probe estimates here when the step is scheduled
            if step in eval_steps:
                metrics = evaluate(model, task, config.loss)
                probe.log(step, **metrics)
                last = probe.log_file.rows.get(step, {}).get("llc_mean")
                bar.set_postfix(train_acc=f"{metrics['train_acc']:.2f}",
                                test_acc=f"{metrics['test_acc']:.2f}",
                                **({"llc": f"{last:.1f}"} if last is not None else {}))
            bar.update()
    bar.close()
    wall = time.perf_counter() - started
    rows = probe.history
    summary = summarize(rows, wall_seconds=wall, probe_seconds=probe.probe_seconds,
                        grok_accuracy=config.grok_accuracy)
    summary.update(setup=setup, activation=act, seed=seed, quick=quick,
                   num_params=probe.stacked.dim, sampler=asdict(settings))
    if out is not None:
        _write_manifest(out, config, act, seed, quick, command, commit)
        torch.save(model.state_dict(), out / MODEL_NAME)
        (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))
        plot_grokking(rows, out / PLOT_NAME, title=f"{setup} ({act}, seed {seed})",
                      grok_step=summary["grok_step"], grok_accuracy=config.grok_accuracy)
    return summary


def _write_manifest(out: Path, config, act, seed, quick, command, commit) -> None:
    path = out / MANIFEST_NAME
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest.update(command=command or " ".join(sys.argv), config=config.to_dict(),
                    activation=act, seed=seed, quick=quick, git_commit=commit,
                    machine=platform.platform(), torch_threads=torch.get_num_threads())
    path.write_text(json.dumps(manifest, indent=1))


def _first_step(rows: list[dict], key: str, threshold: float) -> int | None:
    for row in rows:
        value = row.get(key)
        if value is not None and value >= threshold:
            return int(row["step"])
    return None


def summarize(rows: list[dict], *, wall_seconds: float | None = None,
              probe_seconds: float | None = None, grok_accuracy: float = 0.9) -> dict:
    """LLC at init, peak and end; when train/test accuracy cross 50 %/90 %/100 %; and
    whether λ̂ falls after its peak, read from a run's rows."""
    llc_rows = [r for r in rows if r.get("llc_mean") is not None]
    if not llc_rows:
        raise ValueError("no rows with an LLC estimate")
    peak = max(llc_rows, key=lambda r: r["llc_mean"])
    final, init = llc_rows[-1], llc_rows[0]
    metric_rows = [r for r in rows if r.get("test_acc") is not None]
    grok = _first_step(metric_rows, "test_acc", grok_accuracy)
    summary = {
        "llc_init": init["llc_mean"], "llc_init_std": init["llc_std"],
        "llc_peak": peak["llc_mean"], "llc_peak_std": peak["llc_std"], "llc_peak_step": peak["step"],
        "llc_final": final["llc_mean"], "llc_final_std": final["llc_std"],
        "final_step": final["step"],
        "llc_fall_fraction": ((peak["llc_mean"] - final["llc_mean"]) / abs(peak["llc_mean"])
                              if peak["llc_mean"] else None),
        "train_acc_100_step": _first_step(metric_rows, "train_acc", 1.0),
        "test_acc_50_step": _first_step(metric_rows, "test_acc", 0.5),
        "test_acc_90_step": _first_step(metric_rows, "test_acc", 0.9),
        "grok_accuracy": grok_accuracy, "grok_step": grok,
        "final_train_acc": metric_rows[-1]["train_acc"] if metric_rows else None,
        "final_test_acc": metric_rows[-1]["test_acc"] if metric_rows else None,
        "grokked": grok is not None,
        "num_llc_points": len(llc_rows),
        "unhealthy_points": sum(1 for r in llc_rows if r.get("healthy") is False),
        "wall_seconds": wall_seconds, "probe_seconds": probe_seconds,
    }
    if grok is not None:
        before = [r["llc_mean"] for r in llc_rows if r["step"] <= grok]
        after = [r["llc_mean"] for r in llc_rows if r["step"] >= grok]
        summary["llc_at_grok"] = before[-1] if before else None
        summary["llc_falls_after_grok"] = bool(after and before and min(after) < before[-1])
        summary["peak_before_grok"] = peak["step"] <= grok
    return summary


def plot_grokking(rows: list[dict], path, *, title: str = "", grok_step: int | None = None,
                  grok_accuracy: float = 0.9):
    """λ̂ ± std (left) with train/test accuracy (right); losses below; grokking step marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    llc = [r for r in rows if r.get("llc_mean") is not None]
    metric = [r for r in rows if r.get("test_acc") is not None]
    shift = lambda steps: [s + 1 for s in steps]  # noqa: E731 — step 0 on a log axis
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    steps = shift([r["step"] for r in llc])
    mean = [r["llc_mean"] for r in llc]
    std = [r["llc_std"] or 0.0 for r in llc]
    top.plot(steps, mean, color="tab:purple", label="λ̂ (train set)")
    top.fill_between(steps, [m - s for m, s in zip(mean, std)],
                     [m + s for m, s in zip(mean, std)], color="tab:purple", alpha=0.25)
    top.set_ylabel("λ̂  (effective params = 2λ̂)")
    if min(mean) < 0 and -min(mean) > 3 * max(max(mean), 1e-12):
        # far from a minimum (e.g. a large init) λ̂ is hugely negative; a linear axis
        # would flatten the rest of the trajectory
        top.set_yscale("symlog", linthresh=max(max(mean), 1.0))
    acc = top.twinx()
    for key, colour in (("train_acc", "tab:blue"), ("test_acc", "tab:orange")):
        acc.plot(shift([r["step"] for r in metric]), [r[key] for r in metric], color=colour,
                 lw=1, alpha=0.8, label=key.replace("_", " "))
    acc.set_ylabel("accuracy")
    acc.set_ylim(-0.02, 1.02)
    for key, colour in (("train_loss", "tab:blue"), ("test_loss", "tab:orange")):
        bottom.plot(shift([r["step"] for r in metric]), [r[key] for r in metric], color=colour,
                    label=key.replace("_", " "))
    bottom.set_yscale("log")
    bottom.set_ylabel("loss")
    bottom.set_xscale("log")
    bottom.set_xlabel("step + 1")
    if grok_step is not None:
        for ax in (top, bottom):
            ax.axvline(grok_step + 1, color="grey", ls="--", lw=1)
        top.text(grok_step + 1, top.get_ylim()[1], f" test acc ≥ {grok_accuracy:.0%}", va="top",
                 fontsize=8,
                 color="grey")
    handles = top.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
    top.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    bottom.legend(fontsize=8)
    top.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_run(folder: str | Path) -> tuple[dict, list[dict]] | None:
    """A finished run's summary and rows, or None if the folder has no finished run."""
    folder = Path(folder)
    if not (folder / SUMMARY_NAME).exists() or not (folder / "llc.csv").exists():
        return None
    return json.loads((folder / SUMMARY_NAME).read_text()), read_rows(folder / "llc.csv")


def aggregate(summaries: list[dict], keys=("llc_init", "llc_peak", "llc_final", "llc_peak_step",
                                           "grok_step", "final_test_acc",
                                           "wall_seconds")) -> dict:
    """Mean and std over runs of each key (None where a run lacks it, e.g. never grokked)."""
    import numpy as np

    result = {"num_runs": len(summaries)}
    for key in keys:
        values = [s.get(key) for s in summaries]
        finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        result[key] = float(np.mean(finite)) if finite else None
        result[f"{key}_std"] = float(np.std(finite)) if len(finite) > 1 else (0.0 if finite else None)
        result[f"{key}_count"] = len(finite)
    return result


def report(root: str | Path, replot: bool = False) -> str:
    """Markdown table over every finished run under ``root/<setup>/seed<k>``: LLC at init,
    peak and end (mean ± std over seeds), where the peak and the fall sit relative to the
    test-accuracy jump, and wall time. ``replot`` redraws each run's trajectory.png from
    its llc.csv."""
    root = Path(root)
    lines = ["| setup | seeds | grokked | λ̂ init | λ̂ peak (step) | λ̂ final | grokking step | "
             "peak before grokking | λ̂ falls after grokking | fall from peak | wall s/run |",
             "|" + "---|" * 11]
    for setup_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        folders = sorted(setup_dir.glob("seed*"))
        runs = [load_run(d) for d in folders]
        summaries = [r[0] for r in runs if r is not None]
        if replot:
            for folder, run in zip(folders, runs):
                if run is not None:
                    summary, rows = run
                    plot_grokking(rows, folder / PLOT_NAME, grok_step=summary["grok_step"],
                                  grok_accuracy=summary.get("grok_accuracy", 0.9),
                                  title=f"{summary['setup']} ({summary['activation']}, "
                                        f"seed {summary['seed']})")
        if not summaries:
            continue
        agg = aggregate(summaries, keys=("llc_init", "llc_peak", "llc_peak_step", "llc_final",
                                         "grok_step", "llc_fall_fraction", "wall_seconds"))

        def pm(key, fmt=".3g"):
            if agg[key] is None:
                return "—"
            return f"{agg[key]:{fmt}} ± {agg[f'{key}_std']:{fmt}}"

        count = lambda key: sum(bool(s.get(key)) for s in summaries)  # noqa: E731
        lines.append(
            f"| {setup_dir.name} | {len(summaries)} | {count('grokked')}/{len(summaries)} | "
            f"{pm('llc_init')} | {pm('llc_peak')} ({pm('llc_peak_step', '.0f')}) | "
            f"{pm('llc_final')} | {pm('grok_step', '.0f')} | "
            f"{count('peak_before_grok')}/{len(summaries)} | "
            f"{count('llc_falls_after_grok')}/{len(summaries)} | "
            f"{pm('llc_fall_fraction', '.0%')} | {pm('wall_seconds', '.0f')} |")
    return "\n".join(lines) + "\n"
