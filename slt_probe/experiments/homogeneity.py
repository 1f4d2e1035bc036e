"""Do independently trained networks become alike as they grow? Run-to-run variance of the
predictions, and λ̂, against network width.

For every width: K networks that differ only in their initialisation seed (training
subset 0) and J networks that differ only in their training subset (initialisation seed
0; run (0, 0) is shared), each trained with the setup's optimiser until it fits its
training set (train error 0 and train loss below ``converged_loss``) or the step budget
ends. Measured on a fixed evaluation set that no training subset draws from:

- train and test error;
- the variance of the predictions across runs, split one factor at a time: the
  initialisation part is the variance over the K seeds at fixed data, the data part the
  variance over the J subsets at fixed initialisation (each averaged over evaluation
  inputs and outputs; ``variance_parts``). They are conditional variances, not an additive
  split of the total: with an interaction between the factors each contains it;
- the pairwise disagreement of the predicted classes;
- λ̂ of each of the K networks, with the sampler calibrated automatically on the seed-0
  network of that width and held fixed for the others, and λ̂/d.

The interpolation threshold is the smallest width whose K networks all reach zero
training error; the width where parameters ≈ examples × outputs is marked beside it.
Writes ``homogeneity.csv`` (one row per width), ``summary.md``, ``manifest.json``,
``homogeneity.png``; finished widths (``widths/w<width>.json``) are reused on resume.
Trainings and estimates are tasks of an executor (serial or Ray).
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibration import Calibration, CalibrationGrid
from ..core.data import MinibatchStream
from ..core.losses import resolve_loss
from ..core.settings import EstimateSettings
from ..executors import SerialExecutor, Task
from ..probe import llc_trajectory
from ..reports import markdown_table, mean_pm_std, plot_homogeneity
from ..run_log import versions, write_csv_atomic, write_json_atomic, write_text_atomic
from .mnist import load_available_mnist
from .models import ModAddMLP, mlp, modadd_data

SETUPS = ("mnist-mlp", "modadd-mlp")
# what a width's record keeps of each network's estimate
ESTIMATE_FIELDS = ("llc_mean", "llc_std", "excess_ratio", "local", "healthy", "reasons",
                   "rhat", "seconds")


@dataclass(frozen=True)
class HomogeneityConfig:
    """A width sweep. ``widths`` are the hidden widths (MNIST: 784-w-w-10; modular
    addition: the MLP's hidden layer)."""

    setup: str
    widths: tuple[int, ...]
    init_seeds: int = 4
    data_seeds: int = 4
    num_train: int = 1000
    num_eval: int = 2000
    max_steps: int = 10_000
    converged_loss: float = 1e-3
    eval_every: int = 250
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 200
    llc_draws: int = 200
    llc_chains: int = 4

    def __post_init__(self) -> None:
        if self.setup not in SETUPS:
            raise ValueError(f"setup must be one of {SETUPS}, got {self.setup!r}")
        if not self.widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1
                                  for w in self.widths):
            raise ValueError(f"widths must be positive whole numbers, got {self.widths}")
        if len(set(self.widths)) != len(self.widths):
            raise ValueError(f"widths must be distinct, got {self.widths}")
        for name, low in (("init_seeds", 2), ("data_seeds", 2), ("num_train", 2),
                          ("num_eval", 2), ("max_steps", 1), ("eval_every", 1),
                          ("batch_size", 1), ("llc_draws", 1), ("llc_chains", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
        if not self.converged_loss > 0:
            raise ValueError(f"converged_loss must be > 0, got {self.converged_loss}")

    @property
    def loss(self) -> str:
        return "mse" if self.setup == "mnist-mlp" else "cross_entropy"

    @property
    def outputs(self) -> int:
        return 10 if self.setup == "mnist-mlp" else 53

    def num_params(self, width: int) -> int:
        return sum(p.numel() for p in build_network(self, width, 0).parameters())


def preset(setup: str, quick: bool = False) -> HomogeneityConfig:
    """The full sweep (widths 2 … 512, 4 + 4 seeds) or a quick one (4 widths across the
    interpolation threshold, 2 + 2 seeds, shorter budgets)."""
    if setup not in SETUPS:
        raise ValueError(f"setup must be one of {SETUPS}, got {setup!r}")
    if setup == "mnist-mlp":
        full = HomogeneityConfig("mnist-mlp", widths=(2, 4, 8, 16, 32, 64, 128, 256, 512))
        quick_config = replace(full, widths=(2, 8, 32, 128), init_seeds=2, data_seeds=2,
                               max_steps=2000, num_eval=1000, llc_draws=100)
    else:
        full = HomogeneityConfig("modadd-mlp", widths=(4, 8, 16, 32, 64, 128, 256, 512),
                                 num_train=1124, num_eval=800, lr=5e-3, weight_decay=2e-4,
                                 batch_size=128, converged_loss=1e-2, max_steps=8000)
        quick_config = replace(full, widths=(4, 16, 64, 256), init_seeds=2, data_seeds=2,
                               max_steps=2000, llc_draws=100)
    return quick_config if quick else full


@functools.lru_cache(maxsize=4)
def load_pool(setup: str, mnist_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All examples of the setup (read once per process: sweep tasks call it too)."""
    if setup == "mnist-mlp":
        images, labels = load_available_mnist(mnist_dir)
        return images.reshape(len(images), -1), labels
    return modadd_data(53)


def split(config: HomogeneityConfig, x, y, data_seed: int):
    """(x_train, y_train, x_eval, y_eval): a fixed evaluation set (the pool's permutation
    by seed 0), and ``num_train`` training examples drawn from the rest by ``data_seed``."""
    if config.num_eval + config.num_train > len(x):
        raise ValueError(f"num_eval + num_train ({config.num_eval + config.num_train}) exceed "
                         f"the {len(x)} examples available")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    evaluation, rest = order[:config.num_eval], order[config.num_eval:]
    pick = torch.randperm(len(rest), generator=torch.Generator().manual_seed(1000 + data_seed))
    train = rest[pick[:config.num_train]]
    return x[train], y[train], x[evaluation], y[evaluation]


def build_network(config: HomogeneityConfig, width: int, init_seed: int) -> torch.nn.Module:
    torch.manual_seed(init_seed)
    if config.setup == "mnist-mlp":
        return mlp([784, width, width, 10], act="relu")
    return ModAddMLP(p=53, embed_dim=12, hidden=width, act="gelu")


def _targets(config, labels):
    return F.one_hot(labels, config.outputs).float() if config.loss == "mse" else labels


@torch.no_grad()
def _evaluate(model, config, x, labels):
    out = torch.cat([model(c) for c in x.split(4096)])
    loss = float(resolve_loss(config.loss).batch(out, _targets(config, labels)))
    error = float((out.argmax(1) != labels).float().mean())
    return out, loss, error


def train_network(config: HomogeneityConfig, width: int, init_seed: int, data_seed: int,
                  mnist_dir=None) -> dict:
    """One network (a sweep task): trained until it fits or the budget ends; returns its
    weights, errors, losses, steps and its predictions on the evaluation set."""
    x, labels, x_eval, y_eval = split(config, *load_pool(config.setup, mnist_dir), data_seed)
    model = build_network(config, width, init_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    targets = _targets(config, labels)
    batch_loss = resolve_loss(config.loss).batch
    stream = MinibatchStream(len(x), 1, config.batch_size,
                             torch.Generator().manual_seed(init_seed + 1), torch.device("cpu"),
                             drop_last=False)
    started = time.perf_counter()
    converged, step = False, 0
    for step in range(1, config.max_steps + 1):
        index = stream.next()[0]
        optimizer.zero_grad(set_to_none=True)
        batch_loss(model(x[index]), targets[index]).backward()
        optimizer.step()
        if step % config.eval_every == 0 or step == config.max_steps:
            _, train_loss, train_error = _evaluate(model, config, x, labels)
            if train_error == 0 and train_loss < config.converged_loss:
                converged = True
                break
    model.eval()
    _, train_loss, train_error = _evaluate(model, config, x, labels)
    out, test_loss, test_error = _evaluate(model, config, x_eval, y_eval)
    prediction = out if config.loss == "mse" else out.softmax(-1)
    return {"width": width, "init_seed": init_seed, "data_seed": data_seed, "steps": step,
            "converged": converged, "train_error": train_error, "train_loss": train_loss,
            "test_error": test_error, "test_loss": test_loss,
            "prediction": prediction.numpy(), "state": model.state_dict(),
            "seconds": time.perf_counter() - started}


def estimate_width(config: HomogeneityConfig, width: int, states: list[dict],
                   mnist_dir=None, calibration: dict | None = None) -> dict:
    """λ̂ of the width's K init-seed networks (a sweep task): ``sampler="auto"`` calibrated
    on the first and held fixed for all (one trajectory over the K networks), or the given
    ``calibration`` (a ``Calibration.to_dict``) held instead."""
    x, labels, _, _ = split(config, *load_pool(config.setup, mnist_dir), 0)
    settings = EstimateSettings(sampler="auto", num_chains=config.llc_chains,
                                num_draws=config.llc_draws, batch_size=config.batch_size,
                                calibration_grid=CalibrationGrid(max_chains=16))
    if calibration is not None:
        settings = Calibration.from_dict(calibration).apply(settings)
    trajectory = llc_trajectory(build_network(config, width, 0), states,
                                     (x, _targets(config, labels)), settings,
                                     loss_fn=config.loss, calibrate_on=0, verbose=False)
    return {"rows": trajectory.rows,
            "calibration": calibration or trajectory.manifest()["calibration"]}


def variance_parts(init_predictions: np.ndarray, data_predictions: np.ndarray) -> dict:
    """Run-to-run variance of predictions (runs, inputs, outputs), one factor at a time:
    the initialisation part is the unbiased variance over the init-seed runs (fixed data),
    the data part over the data-seed runs (fixed initialisation), both averaged over
    inputs and outputs; the total is the variance over all distinct runs.

    Examples:
        >>> a = np.array([[[0.0]], [[2.0]]]); b = np.array([[[0.0]], [[4.0]]])
        >>> variance_parts(a, b)
        {'init_variance': 2.0, 'data_variance': 8.0, 'total_variance': 4.0}
    """
    runs = np.concatenate([init_predictions, data_predictions[1:]])  # run 0 is shared
    return {"init_variance": float(init_predictions.var(axis=0, ddof=1).mean()),
            "data_variance": float(data_predictions.var(axis=0, ddof=1).mean()),
            "total_variance": float(runs.var(axis=0, ddof=1).mean())}


def disagreement(predictions: np.ndarray) -> float:
    """Mean over pairs of runs of the fraction of inputs where their classes differ."""
    labels = predictions.argmax(-1)
    pairs = itertools.combinations(range(len(labels)), 2)
    return float(np.mean([(labels[i] != labels[j]).mean() for i, j in pairs]))


def width_row(config: HomogeneityConfig, width: int, runs: list[dict], llc: dict) -> dict:
    init = [r for r in runs if r["data_seed"] == 0]
    data = [r for r in runs if r["init_seed"] == 0]
    init.sort(key=lambda r: r["init_seed"])
    data.sort(key=lambda r: r["data_seed"])
    estimates = [r for r in llc["rows"] if r.get("llc_mean") is not None]
    d = config.num_params(width)
    # an estimate whose chains left w* is counted, never averaged in
    local = np.array([r["llc_mean"] for r in estimates if r.get("local") is not False])
    cal = llc["calibration"] or {}
    return {
        "width": width, "num_params": d,
        "train_error": float(np.mean([r["train_error"] for r in init])),
        "train_error_max": float(max(r["train_error"] for r in init)),
        "test_error": float(np.mean([r["test_error"] for r in init])),
        "test_error_std": float(np.std([r["test_error"] for r in init], ddof=1)),
        "converged": sum(r["converged"] for r in runs), "runs": len(runs),
        "steps": float(np.mean([r["steps"] for r in runs])),
        **variance_parts(np.stack([r["prediction"] for r in init]),
                         np.stack([r["prediction"] for r in data])),
        "init_disagreement": disagreement(np.stack([r["prediction"] for r in init])),
        "data_disagreement": disagreement(np.stack([r["prediction"] for r in data])),
        "llc_mean": float(local.mean()) if len(local) else None,
        "llc_std": float(local.std(ddof=1)) if len(local) > 1 else None,
        "llc_per_param": float(local.mean() / d) if len(local) else None,
        "llc_healthy": sum(bool(r.get("healthy")) for r in estimates),
        "llc_local": sum(r.get("local") is not False for r in estimates),
        "max_excess_ratio": max((r["excess_ratio"] for r in estimates
                                 if r.get("excess_ratio") is not None), default=None),
        "lr": (cal.get("sampler") or {}).get("lr"),
        "localization": (cal.get("sampler") or {}).get("localization"),
        "nbeta": estimates[0].get("nbeta") if estimates else None,
        "train_seconds": float(sum(r["seconds"] for r in runs)),
        "llc_seconds": float(sum(r.get("seconds") or 0.0 for r in estimates)),
        "estimates": [{k: r.get(k) for k in ESTIMATE_FIELDS} for r in estimates],
    }


def thresholds(config: HomogeneityConfig, rows: list[dict]) -> dict:
    """The smallest width whose init-seed networks all fit their training set, and the
    width nearest to parameters = examples × outputs."""
    fitted = [r["width"] for r in rows if r["train_error_max"] == 0]
    target = config.num_train * config.outputs
    nearest = min(rows, key=lambda r: abs(math.log(r["num_params"] / target)))["width"]
    return {"interpolation_width": min(fitted) if fitted else None,
            "params_equal_examples_width": nearest, "examples_times_outputs": target}


HELD_NAME = "held_calibration.json"


def run_homogeneity(setup: str, *, quick: bool = False, config: HomogeneityConfig | None = None,
                    out: str | Path, mnist_dir=None, executor=None, command: str | None = None,
                    hold_gamma: bool = False, verbose: bool = True) -> list[dict]:
    """The whole sweep; returns one row per width (also written to ``out``).

    ``hold_gamma``: one calibration for every width, so λ̂ can be read across widths: run
    on the seed-0 network of the widest width (estimated first), the most
    over-parameterised network and the one whose chains the largest γ keeps local (so
    the held γ is local there, and each width's locality is reported), and held for the
    others (``held_calibration.json``)."""
    config = config or preset(setup, quick)
    out = Path(out)
    (out / "widths").mkdir(parents=True, exist_ok=True)
    executor = executor or SerialExecutor()
    split(config, *load_pool(config.setup, mnist_dir), 0)  # fails before any training
    done = {w: json.loads(p.read_text()) for w in config.widths
            if (p := out / "widths" / f"w{w}.json").exists()}
    todo = [w for w in config.widths if w not in done]
    held_path = out / HELD_NAME
    held = json.loads(held_path.read_text())["calibration"] if held_path.exists() else None
    if hold_gamma:
        todo.sort(reverse=True)  # the widest first: it calibrates for all
    # one width at a time (its trainings in parallel on Ray), written as soon as it is done,
    # so an interrupted sweep loses at most the width it was on
    for width in tqdm(todo, desc="widths", disable=not verbose):
        pairs = [(i, 0) for i in range(config.init_seeds)]
        pairs += [(0, j) for j in range(1, config.data_seeds)]
        tasks = [Task(train_network, dict(config=config, width=width, init_seed=i,
                                          data_seed=j, mnist_dir=mnist_dir),
                      label=f"width {width} init {i} data {j}") for i, j in pairs]
        trained = [o.value for o in executor.map(tasks, desc=f"trainings at width {width}",
                                                 verbose=False)]
        states = [r["state"] for r in sorted(trained, key=lambda r: r["init_seed"])
                  if r["data_seed"] == 0]
        llc_task = Task(estimate_width, dict(config=config, width=width, states=states,
                                             mnist_dir=mnist_dir,
                                             calibration=held if hold_gamma else None),
                        label=f"λ̂ at width {width}")
        llc = executor.map([llc_task], desc=f"λ̂ at width {width}", verbose=False)[0].value
        if hold_gamma and held is None:
            held = llc["calibration"]
            write_json_atomic(held_path, {"calibrated_on": f"width {width}, init seed 0",
                                          "calibration": held})
        done[width] = width_row(config, width, trained, llc)
        write_json_atomic(out / "widths" / f"w{width}.json", done[width])
    rows = [done[w] for w in config.widths]
    marks = thresholds(config, rows)
    write_csv_atomic(out / "homogeneity.csv",
                     [{k: v for k, v in r.items() if k != "estimates"} for r in rows])
    write_json_atomic(out / "manifest.json", {"config": asdict(config), "quick": quick,
                                              "command": command, "thresholds": marks,
                                              "versions": versions()})
    write_text_atomic(out / "summary.md", summary_markdown(config, rows, marks, command,
                                                           held_on=_held_on(held_path)))
    plot_homogeneity(rows, marks, out / "homogeneity.png",
                     title=f"{config.setup}: {config.num_train} training examples, "
                           f"{config.init_seeds} init × {config.data_seeds} data seeds")
    return rows


def _held_on(path: Path) -> str | None:
    return json.loads(path.read_text())["calibrated_on"] if path.exists() else None


def summary_markdown(config: HomogeneityConfig, rows: list[dict], marks: dict,
                     command: str | None, held_on: str | None = None) -> str:
    lines = [f"# Homogeneity across training runs: {config.setup}", ""]
    if command:
        lines += [f"Regenerate: `{command}`", ""]
    if held_on:
        lines += [f"One sampler for every width (γ held): calibrated on the network of "
                  f"{held_on}; λ̂ reads across widths, each width's locality in its row.", ""]
    lines += [f"{config.num_train} training examples per run, evaluation on {config.num_eval} "
              f"held out from every subset; {config.init_seeds} initialisation seeds (subset 0) "
              f"and {config.data_seeds} training subsets (initialisation 0) per width. Each run "
              f"trains (AdamW lr {config.lr:g}, weight decay {config.weight_decay:g}, batch "
              f"{config.batch_size}) until train error 0 and train loss < "
              f"{config.converged_loss:g}, or {config.max_steps:,} steps. Interpolation "
              f"threshold (all init-seed runs at zero train error): width "
              f"{marks['interpolation_width']}; parameters ≈ examples × outputs "
              f"({marks['examples_times_outputs']:,}) near width "
              f"{marks['params_equal_examples_width']}. λ̂: `sampler=\"auto\"` calibrated on "
              "the seed-0 network of each width and held for its seeds (ε, γ in the table; "
              "nβ = n/log n); mean ± std over the networks whose chains stayed local "
              "(`local`), an estimate that left w* is counted there, not averaged in.", ""]
    header = ["width", "d", "train err", "test err", "converged", "var init", "var data",
              "var total", "disagree init", "disagree data", "λ̂", "λ̂/d", "healthy",
              "local", "max r", "ε, γ"]
    lines += markdown_table(header, [
        [r["width"], f"{r['num_params']:,}", f"{r['train_error']:.3f}",
         f"{r['test_error']:.3f} ± {r['test_error_std']:.3f}", f"{r['converged']}/{r['runs']}",
         f"{r['init_variance']:.3g}", f"{r['data_variance']:.3g}",
         f"{r['total_variance']:.3g}", f"{r['init_disagreement']:.3f}",
         f"{r['data_disagreement']:.3f}", mean_pm_std(r["llc_mean"], r["llc_std"]),
         mean_pm_std(r["llc_per_param"], None, ".2e"), f"{r['llc_healthy']}/{config.init_seeds}",
         f"{r['llc_local']}/{config.init_seeds}",
         mean_pm_std(r["max_excess_ratio"], None, ".2f"),
         f"{r['lr']:.2g}, {r['localization']:g}" if r["lr"] else "—"] for r in rows])
    return "\n".join(lines) + "\n"
