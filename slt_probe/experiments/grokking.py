"""One grokking run: train a preset with the LLC probe attached and write its folder
(``llc.csv`` with the probe's rows and the train/test metrics, ``summary.json``,
``manifest.json``, ``trajectory.png``, ``model.pt``). Not here: the presets
(``presets``), the summary (``summary``), comparing activations (``compare``).
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import MinibatchStream
from ..losses import resolve_loss
from ..probe import LLCProbe
from ..reports import plot_grokking
from ..run_log import CSV_NAME, MANIFEST_NAME, write_json_atomic
from .presets import (GrokkingConfig, LLCSettings, build_model, build_task, make_optimizer,
                      preset)
from .summary import MODEL_NAME, PLOT_NAME, SUMMARY_NAME, summarize
from .tasks import Task


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
        for name in (CSV_NAME, MANIFEST_NAME, SUMMARY_NAME):  # a run restarts from step 0
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
    full_batch = config.batch_size is None or config.batch_size >= len(task.x_train)
    batches = MinibatchStream(len(task.x_train), 1, config.batch_size or len(task.x_train),
                              torch.Generator().manual_seed(seed + 1), torch.device("cpu"),
                              drop_last=False)
    commit = git_commit()  # the code that trains, not whatever is checked out when it ends
    started = time.perf_counter()
    model.train()
    bar = tqdm(total=config.num_steps, desc=f"{setup} {act} seed {seed}", disable=not verbose)
    with probe:
        probe.log(0, **evaluate(model, task, config.loss))
        probe.attach(optimizer)
        for step in range(1, config.num_steps + 1):
            if full_batch:
                x, y = task.x_train, targets
            else:
                index = batches.next()[0]
                x, y = task.x_train[index], targets[index]
            output = model(x)
            loss = batch_loss(output.double() if config.float64_loss else output, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # the probe estimates here when the step is scheduled
            if step in eval_steps:
                metrics = evaluate(model, task, config.loss)
                probe.log(step, **metrics)
                last = probe.row(step).get("llc_mean")
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
                   num_params=probe.num_params, sampler=asdict(settings))
    if out is not None:
        _write_manifest(out, config, act, seed, quick, command, commit)
        torch.save(model.state_dict(), out / MODEL_NAME)
        write_json_atomic(out / SUMMARY_NAME, summary)
        plot_grokking(rows, out / PLOT_NAME, title=f"{setup} ({act}, seed {seed})",
                      grok_step=summary["grok_step"], grok_accuracy=config.grok_accuracy)
    return summary


def _write_manifest(out: Path, config, act, seed, quick, command, commit) -> None:
    path = out / MANIFEST_NAME
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest.update(command=command or " ".join(sys.argv), config=config.to_dict(),
                    activation=act, seed=seed, quick=quick, git_commit=commit,
                    machine=platform.platform(), torch_threads=torch.get_num_threads())
    write_json_atomic(path, manifest)
