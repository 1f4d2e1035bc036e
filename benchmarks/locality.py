"""λ̂ against the localisation γ on a trained checkpoint: where the chains stay near w*.

    python benchmarks/locality.py --setup modadd-mlp --checkpoint PATH [--mnist-dir DIR]
        [--gammas 1,3,10,...] [--out results/benchmarks]
    python benchmarks/locality.py --setup mnist-cnn --mnist-dir DIR   # a small CNN, trained here

For the checkpoint: ``slt_probe.calibrate`` (its choice and its cost beside the estimate
it then makes), then at every γ an estimate at the calibrated step ε from w*, warmed up
at 2ε for Langevin time 2/γ (the localisation's time scale, so each γ relaxes; at most
``MAX_WARMUP`` steps), with its mean sampled loss, excess ratio r and health. When the
calibration fails, its message is recorded and the sweep runs at ``--fallback-lr``. One thread. Appends a Markdown block to
``OUT/locality.md`` and the rows to ``OUT/locality.csv``.
"""
from __future__ import annotations

import argparse
import math
import resource
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import slt_probe
from slt_probe.calibration import CalibrationError
from slt_probe.experiments.grokking import default_activation
from slt_probe.experiments.mnist import load_mnist
from slt_probe.experiments.presets import build_model, build_task, preset
from slt_probe.reports import markdown_table
from slt_probe.run_log import read_rows, write_csv_atomic, write_text_atomic

CNN_STEPS = 500
MAX_WARMUP = 20_000
DEFAULT_GAMMAS = "1,3,10,30,100,300,1000,3000,10000"


def small_cnn(mnist_dir, checkpoint=None):
    """A 5,994-parameter CNN on 1,000 MNIST images, as a new user might build one: two
    convolutions and a linear read-out, trained with Adam (or loaded)."""
    torch.manual_seed(0)
    x, y = load_mnist("test", mnist_dir)
    x, y = x[:1000].reshape(-1, 1, 28, 28), y[:1000]
    model = nn.Sequential(nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(256, 10))
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint))
        return model, (x, y), "cross_entropy"
    train_with_adam(model, x, y, steps=CNN_STEPS, lr=1e-3)
    return model, (x, y), "cross_entropy"


def train_with_adam(model, x, y, *, steps: int, lr: float, batch_size: int = 64) -> None:
    """Minibatch Adam on cross-entropy, as a new user trains a classifier (seeded batches)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randint(len(x), (batch_size,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", required=True, help="a grokking setup, or mnist-cnn")
    parser.add_argument("--checkpoint", default=None,
                        help="its weights (mnist-cnn: trained here when not given)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (its data split)")
    parser.add_argument("--gammas", default=DEFAULT_GAMMAS)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--mnist-dir", default=None)
    parser.add_argument("--fallback-lr", type=float, default=1e-5,
                        help="ε of the γ sweep when the calibration fails")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    checkpoint_given = args.checkpoint is not None
    if args.setup == "mnist-cnn":
        model, data, loss = small_cnn(args.mnist_dir, args.checkpoint)
        args.checkpoint = args.checkpoint or f"trained here ({CNN_STEPS} Adam steps)"
    elif args.checkpoint is None:
        parser.error("--checkpoint is required for a grokking setup")
    else:
        config = preset(args.setup)
        task = build_task(config, args.seed, args.mnist_dir)
        model = build_model(config, default_activation(config), args.seed)
        model.load_state_dict(torch.load(args.checkpoint))
        data, loss = (task.x_train, task.targets(task.y_train, config.loss)), config.loss
    settings = slt_probe.EstimateSettings(num_draws=args.draws, batch_size=128)
    started = time.perf_counter()
    try:
        cal = slt_probe.calibrate(model, data, settings, loss_fn=loss, verbose=False)
        failure = None
    except CalibrationError as err:
        cal, failure = None, str(err)
    calibration_seconds = time.perf_counter() - started
    if cal is not None:
        chosen = slt_probe.estimate_llc(model, data, cal.apply(settings), loss_fn=loss,
                                        verbose=False)
        lr, num_burnin, num_chains = cal.sampler.lr, cal.num_burnin, chosen.config["num_chains"]
    else:
        lr, num_burnin, num_chains = args.fallback_lr, 100, 4
    rows, results = [], []
    for gamma in [float(g) for g in args.gammas.split(",")]:
        step = min(lr, 0.5 / gamma)
        # Langevin time 2/γ, capped: at a weak γ and a tiny ε it would take hours
        warmup = min(math.ceil(2.0 / gamma / (2 * step)), MAX_WARMUP)
        result = slt_probe.estimate_llc(
            model, data, settings, loss_fn=loss, verbose=False,
            sampler=slt_probe.SGLD(lr=step, localization=gamma), warmup_lr=2 * step,
            num_warmup=warmup, num_burnin=max(100, num_burnin), num_chains=max(4, num_chains))
        results.append(result)
        d = result.diagnostics
        rows.append({"setup": args.setup, "checkpoint": args.checkpoint, "gamma": gamma,
                     "lr": step, "num_warmup": warmup, "llc_mean": result.llc_mean,
                     "llc_sem": result.llc_sem, "init_loss": result.init_loss,
                     "mean_sampled_loss": d["mean_sampled_loss"],
                     "constant_predictor_loss": d["constant_predictor_loss"],
                     "excess_ratio": d["excess_ratio"], "healthy": d["healthy"],
                     "reasons": ";".join(d["reasons"]), "rhat": d["rhat"],
                     "seconds": result.config["seconds"]})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = read_rows(out / "locality.csv") if (out / "locality.csv").exists() else []
    previous = [r for r in previous if r["checkpoint"] != args.checkpoint]
    write_csv_atomic(out / "locality.csv", previous + rows)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cal is not None:
        calibration_text = (
            f"Calibration: γ = {cal.sampler.localization:g}, ε = {lr:.3g}, {cal.steps:,} steps "
            f"in {calibration_seconds:.1f} s; the estimate it then makes: λ̂ = "
            f"{chosen.llc_mean:.4g} ± {chosen.llc_sem:.2g}, r = "
            f"{chosen.diagnostics['excess_ratio']:.3g}, healthy {chosen.diagnostics['healthy']}, "
            f"{chosen.config['num_chains']} chains × {chosen.config['num_draws']} draws "
            f"(+{chosen.config['num_warmup']:,} warm-up, {chosen.config['num_burnin']} burn-in) "
            f"in {chosen.config['seconds']:.1f} s: calibration / estimate = "
            f"{calibration_seconds / chosen.config['seconds']:.1f}×.")
    else:
        calibration_text = (f"Calibration failed after {calibration_seconds:.1f} s: {failure}. "
                            f"The sweep below runs at ε = {lr:.3g} (capped at 0.5/γ).")
    reference = chosen if cal is not None else results[0]  # any estimate states the problem
    summary = (f"n = {len(data[0])}, nβ = {reference.nbeta:.4g}, d = "
               f"{reference.config['num_params']:,}, L_n(w*) = {reference.init_loss:.4g}, "
               f"constant predictor {reference.diagnostics['constant_predictor_loss']:.4g}.")
    command = " ".join(
        [f"--setup {args.setup}"]
        + ([f"--checkpoint {args.checkpoint}"] if checkpoint_given else [])
        + ([f"--gammas {args.gammas}"] if args.gammas != DEFAULT_GAMMAS else [])
        + (["--mnist-dir DIR"] if args.mnist_dir else []))
    lines = [f"### {args.setup}: `{args.checkpoint}`", "",
             f"`python benchmarks/locality.py {command}` (1 thread). "
             f"{summary}", "", f"{calibration_text} Peak RSS {peak_rss:.0f} MB.", ""]
    lines += markdown_table(
        ["γ", "ε", "λ̂ ± s.e.", "mean sampled loss", "r", "healthy", "R-hat", "s"],
        [[f"{r['gamma']:g}", f"{r['lr']:.2g}", f"{r['llc_mean']:.4g} ± {r['llc_sem']:.2g}",
          f"{r['mean_sampled_loss']:.4g}",
          "n/a" if r["excess_ratio"] is None else f"{r['excess_ratio']:.3g}",
          "yes" if r["healthy"] else f"no ({r['reasons']})", f"{r['rhat']:.3g}",
          f"{r['seconds']:.0f}"] for r in rows])
    # one block per checkpoint: a rerun replaces its own block
    blocks = ((out / "locality.md").read_text().split("\n### ")
              if (out / "locality.md").exists() else [])
    blocks = [b.removeprefix("### ") for b in blocks if b.strip()]
    blocks = [b for b in blocks if not b.startswith(lines[0].removeprefix("### "))]
    blocks.append("\n".join(lines).removeprefix("### "))
    write_text_atomic(out / "locality.md", "\n".join("### " + b.strip() + "\n" for b in blocks))


if __name__ == "__main__":
    main()
