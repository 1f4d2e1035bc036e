"""Training a preset: the loop, the train/test metrics, and checkpoints at the LLC steps.

A finished training run is a folder with ``metrics.csv`` (train/test loss and accuracy at
the evaluation steps), ``checkpoints/step_XXXXXXXXX.pt`` (the weights at every LLC step)
and ``model.pt`` (the final weights); a rerun on that folder reuses it instead of
training again. Not here: estimating (``grokking``), the presets (``presets``).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.data import MinibatchStream
from ..core.losses import resolve_loss
from ..run_log import read_rows, write_csv_atomic, write_json_atomic
from .presets import GrokkingConfig, build_model, build_task, make_optimizer
from .tasks import Task

METRICS_NAME = "metrics.csv"
TRAINING_NAME = "training.json"  # what was trained: a rerun reuses only the same
CHECKPOINT_DIR = "checkpoints"
MODEL_NAME = "model.pt"  # the trained weights: comparisons read the runs' final functions


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, loss: str) -> dict:
    """Loss and accuracy on the training and the held-out split (model left in its mode)."""
    was_training = model.training
    model.eval()
    metrics = {}
    for split, x, y in (("train", task.x_train, task.y_train), ("test", task.x_test, task.y_test)):
        out = torch.cat([model(chunk) for chunk in x.split(4096)])
        value = resolve_loss(loss).batch(out, task.targets(y, loss))
        metrics[f"{split}_loss"] = float(value)
        metrics[f"{split}_acc"] = float((out.argmax(1) == y).float().mean())
    model.train(was_training)
    return metrics


# settings that only shape the estimates, never the trained weights or the metrics
ESTIMATION_ONLY = ("llc", "local", "quadratic_baseline", "grok_accuracy", "notes")


def training_identity(config: GrokkingConfig, act: str, seed: int) -> dict:
    """What makes two trainings the same (a finished one is reused only for the same)."""
    training = {k: v for k, v in json.loads(json.dumps(config.to_dict())).items()
                if k not in ESTIMATION_ONLY}
    return {"config": training, "activation": act, "seed": seed}


def _same_training(done: dict, identity: dict) -> bool:
    recorded = {k: v for k, v in done.get("config", {}).items() if k not in ESTIMATION_ONLY}
    return (recorded == identity["config"]
            and all(done.get(k) == identity[k] for k in ("activation", "seed")))


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / CHECKPOINT_DIR / f"step_{step:09d}.pt"


@dataclass
class TrainedRun:
    """A trained preset: the final model, its task, the metric rows and the checkpoints."""

    model: nn.Module
    task: Task
    metrics: list[dict]
    checkpoints: dict[int, Path | dict]
    seconds: float | None = None

    def memorised_step(self) -> int:
        """The first LLC step at or after the network first fits its whole training set
        (train accuracy 1), or the last step if it never does: where the calibration of
        the local regime runs."""
        fitted = [r["step"] for r in self.metrics if (r.get("train_acc") or 0) >= 1.0]
        steps = sorted(self.checkpoints)
        if fitted:
            later = [s for s in steps if s >= fitted[0]]
            if later:
                return later[0]
        return steps[-1]


def train(config: GrokkingConfig, act: str, seed: int, *, out: str | Path | None = None,
          mnist_dir=None, verbose: bool = True) -> TrainedRun:
    """Train ``config`` with activation ``act`` from seed ``seed``; evaluate at
    ``config.eval_steps()`` and keep the weights at ``config.llc_steps()`` (on disk in
    ``out`` when given, else in memory). A folder that already holds a finished run of
    the same configuration is reused."""
    task = build_task(config, seed, mnist_dir)
    model = build_model(config, act, seed)
    folder = Path(out) if out is not None else None
    llc_steps = config.llc_steps()
    identity = training_identity(config, act, seed)
    if folder is not None and _finished(folder, llc_steps, identity):
        model.load_state_dict(torch.load(folder / MODEL_NAME))
        return TrainedRun(model, task, read_rows(folder / METRICS_NAME),
                          {s: checkpoint_path(folder, s) for s in llc_steps},
                          json.loads((folder / TRAINING_NAME).read_text()).get("seconds"))
    optimizer = make_optimizer(config, model)
    targets = task.targets(task.y_train, config.loss)
    batch_loss = resolve_loss(config.loss).batch
    n = len(task.x_train)
    full_batch = config.batch_size is None or config.batch_size >= n
    batches = MinibatchStream(n, 1, config.batch_size or n, torch.Generator().manual_seed(seed + 1),
                              torch.device("cpu"), drop_last=False)
    eval_steps, keep = set(config.eval_steps()), set(llc_steps)
    metrics: list[dict] = []
    checkpoints: dict[int, Path | dict] = {}
    if folder is not None:
        (folder / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)

    def record(step: int) -> None:
        if step in eval_steps:
            metrics.append({"step": step, **evaluate(model, task, config.loss)})
        if step in keep:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if folder is None:
                checkpoints[step] = state
            else:
                path = checkpoint_path(folder, step)
                torch.save(state, path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)
                checkpoints[step] = path

    started = time.perf_counter()
    model.train()
    record(0)
    bar = tqdm(range(1, config.num_steps + 1), desc=f"{config.setup} {act} seed {seed}",
               disable=not verbose)
    for step in bar:
        if full_batch:
            x, y = task.x_train, targets
        else:
            index = batches.next()[0]
            x, y = task.x_train[index], targets[index]
        output = model(x)
        loss = batch_loss(output.double() if config.float64_loss else output, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record(step)
        if step in eval_steps:
            bar.set_postfix(train_acc=f"{metrics[-1]['train_acc']:.2f}",
                            test_acc=f"{metrics[-1]['test_acc']:.2f}")
    seconds = time.perf_counter() - started
    if folder is not None:
        write_csv_atomic(folder / METRICS_NAME, metrics)
        write_json_atomic(folder / TRAINING_NAME, {**identity, "seconds": seconds})
        torch.save(model.state_dict(), folder / f"{MODEL_NAME}.tmp")
        (folder / f"{MODEL_NAME}.tmp").replace(folder / MODEL_NAME)
    return TrainedRun(model, task, metrics, checkpoints, seconds)


def _finished(folder: Path, llc_steps: list[int], identity: dict) -> bool:
    record = folder / TRAINING_NAME
    if not (record.exists() and (folder / MODEL_NAME).exists()
            and (folder / METRICS_NAME).exists()):
        return False
    done = json.loads(record.read_text())
    return _same_training(done, identity) and all(checkpoint_path(folder, s).exists() for s in llc_steps)
