"""Data-refined λ̂ of the MNIST MLP: the trained weights' λ̂ on each digit's training
images, on all of them, and on held-out images, at one sampler.

    python benchmarks/data_refined.py --mnist-dir DIR
        [--run results/grokking/mnist-mlp/seed0] [--out results/benchmarks]

The run's final weights (``model.pt``) and its local regime's calibrated sampler
(``local/manifest.json``), nβ = n/log n of each subset, 8 chains; per subset λ̂ ± s.e.,
the gradient's noise ratio T (is w* a critical point of that subset's loss?), whether the
estimate is trusted, and the curvature baseline at the same nβ and γ. One thread. Writes
``OUT/data_refined.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import slt_probe
from slt_probe.experiments.presets import build_model, build_task, preset
from slt_probe.reports import markdown_table
from slt_probe.run_log import write_text_atomic


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist-dir", required=True)
    parser.add_argument("--run", default="results/grokking/mnist-mlp/seed0")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = preset("mnist-mlp")
    run = Path(args.run)
    model = build_model(config, "relu", 0)
    model.load_state_dict(torch.load(run / "model.pt"))
    calibration = json.loads((run / "local" / "manifest.json").read_text())["calibration"]
    sampler = slt_probe.SGLD(lr=calibration["sampler"]["lr"],
                             localization=calibration["sampler"]["localization"])
    task = build_task(config, 0, args.mnist_dir)
    targets = lambda y: task.targets(y, config.loss)  # noqa: E731
    labels = task.y_train
    subsets = {f"digit {d}": (task.x_train[labels == d], targets(labels[labels == d]))
               for d in range(10)}
    subsets["all training images"] = (task.x_train, targets(labels))
    held = slice(0, len(task.x_train))
    subsets["held-out images (as many)"] = (task.x_test[held], targets(task.y_test[held]))
    rows = []
    for name, data in subsets.items():
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = slt_probe.estimate_llc(model, data, loss_fn=config.loss, sampler=sampler,
                                       num_chains=8, num_draws=400, num_burnin=200,
                                       batch_size=min(200, len(data[1])), verbose=False)
        q = slt_probe.quadratic_llc(model, data, loss_fn=config.loss, nbeta=r.nbeta,
                                    localization=sampler.localization, method="hutchinson",
                                    num_probes=16, verbose=False)
        rows.append([name, len(data[1]), f"{r.nbeta:.1f}", f"{r.init_loss:.3g}",
                     f"{r.llc_mean:.3g} ± {r.llc_sem:.2g}", f"{q.value:.3g} ± {q.standard_error:.2g}",
                     f"{r.config['gradient_noise_ratio']:.3g}",
                     "yes" if r.diagnostics["healthy"] else ";".join(r.diagnostics["reasons"]),
                     f"{time.perf_counter() - started:.0f}"])
        print(" | ".join(map(str, rows[-1])), flush=True)
    command = "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:])
    text = ("# Data-refined λ̂ of the MNIST MLP\n\n"
            f"`{command.strip()}` (one thread; weights `{run / 'model.pt'}`; SGLD ε "
            f"{sampler.lr:.3g}, γ {sampler.localization:g} from the run's calibration; "
            "nβ = n/log n of each subset; 8 chains × 400 draws)\n\n"
            + "\n".join(markdown_table(["data the posterior's loss is taken on", "n", "nβ",
                                        "L_n(w*)", "λ̂ ± s.e.", "curvature baseline",
                                        "T = n‖g‖²/tr Σ̂", "healthy", "s"], rows)) + "\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out) / "data_refined.md", text)


if __name__ == "__main__":
    main()
