"""Time slt_probe against devinterp on identical settings, in one process, one thread.

    python benchmarks/bench_llc.py [--mnist-dir DIR] [--repeats 5] [--out results/benchmarks]

Models: the p=53 modular-addition MLP of the devinterp grokking notebook (briefly
trained) and a 784-256-256-10 ReLU MLP on real MNIST. Every timing is the fastest of three runs. Reports ms per chain·draw for
devinterp, slt_probe (eager, and compiled with the compile time separate) and the eager
floor (one forward+backward at the batch size plus drawing d Gaussians), then
time-to-precision: the spread of λ̂ over repeated estimates at equal wall time. devinterp
is called through its public API exactly as a user would (its own init-loss estimate).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

# A fresh inductor cache, so the reported compile time is a cold compile.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="slt_probe_bench_"))

import numpy as np
import torch
import torch.nn.functional as F

import slt_probe
from slt_probe import SGLD, estimate_llc
from slt_probe.mnist import load_mnist
from slt_probe.models import ModAddMLP, mlp, modadd_data

CHAINS, DRAWS, BATCH = 8, 200, 128


def trained_modadd(steps: int = 1500):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y = modadd_data(53)
    order = torch.randperm(len(x), generator=g)
    train = order[: int(0.4 * len(x))]
    model = ModAddMLP(53)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3, weight_decay=2e-4)
    for _ in range(steps):
        idx = train[torch.randint(len(train), (BATCH,), generator=g)]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model, x[train], y[train]


def mnist_model(directory, steps: int = 600):
    """The MLP after a few hundred Adam steps on 8,000 real MNIST images (near a minimum,
    so λ̂ is positive; at initialisation chains slide downhill and λ̂ < 0)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = load_mnist("test", directory)
    x, y = x[:8000], y[:8000]
    model = mlp([784, 256, 256, 10])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(len(x), (BATCH,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model, x, y


def eager_floor_ms(model, x, y, repeats: int = 300) -> float:
    d = sum(p.numel() for p in model.parameters())
    idx = torch.arange(BATCH)
    for _ in range(10):
        F.cross_entropy(model(x[idx]), y[idx]).backward()
    start = time.perf_counter()
    for i in range(repeats):
        idx = torch.randint(len(x), (BATCH,))
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        torch.randn(d)
    return (time.perf_counter() - start) / repeats * 1e3


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def best_of(fn, repeats: int = 3):
    """Fastest of a few runs: timings on a shared 2-core machine vary by ±30 %."""
    runs = [timed(fn) for _ in range(repeats)]
    return runs[-1][0], min(t for _, t in runs)


def devinterp_estimate(model, x, y, sampler, num_chains, num_draws, seed=0):
    """devinterp's public API as a user calls it (its own init-loss estimate included)."""
    import warnings

    from devinterp.optim import SGLD as DevSGLD
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = estimate_learning_coeff_with_summary(
            model, loader, evaluate=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
            sampling_method=DevSGLD,
            optimizer_kwargs=dict(lr=sampler.lr, localization=sampler.localization,
                                  nbeta=sampler.nbeta),
            num_chains=num_chains, num_draws=num_draws, seed=seed, verbose=False)
    return out["llc/mean"]


def bench_model(name, model, x, y, sampler, repeats):
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()),
           "n": len(x), "chains": CHAINS, "draws": DRAWS, "batch": BATCH,
           "lr": sampler.lr, "localization": sampler.localization, "nbeta": sampler.nbeta}
    common = dict(loss_fn="cross_entropy", sampler=sampler, num_chains=CHAINS,
                  num_draws=DRAWS, batch_size=BATCH, verbose=False)
    per = CHAINS * DRAWS
    estimate_llc(model, (x, y), **{**common, "num_draws": 20})  # warm-up
    rng = torch.get_rng_state()
    dev_llc, t_dev = best_of(lambda: devinterp_estimate(model, x, y, sampler, CHAINS, DRAWS))
    torch.set_rng_state(rng)
    plain, t_plain = best_of(lambda: estimate_llc(model, (x, y), estimator="plain", **common))
    cv, t_cv = best_of(lambda: estimate_llc(model, (x, y), **common))
    # Compiled: the first estimate pays the compile; a trajectory reuses the compiled step.
    from slt_probe.settings import EstimateSettings
    from slt_probe.engine import run_estimate
    from slt_probe.losses import resolve_loss
    from slt_probe.batched_model import BatchedModel

    stacked = BatchedModel(model, resolve_loss("cross_entropy"), compile=True)
    settings = EstimateSettings(sampler=sampler, num_chains=CHAINS, num_draws=DRAWS,
                                batch_size=BATCH)
    w = stacked.flatten(model)
    _, t_first = timed(lambda: run_estimate(stacked, w, x, y, settings, verbose=False))
    _, t_steady = best_of(lambda: run_estimate(stacked, w, x, y, settings, verbose=False))
    floor = min(eager_floor_ms(model, x, y) for _ in range(3))
    row.update({
        "devinterp_ms": t_dev / per * 1e3,
        "slt_probe_plain_ms": t_plain / per * 1e3,
        "slt_probe_cv_ms": t_cv / per * 1e3,
        "slt_probe_compiled_ms": t_steady / per * 1e3,
        "compile_seconds": max(t_first - t_steady, 0.0),
        "compiled": stacked.compiled,
        "eager_floor_ms": floor,
        "llc_devinterp": dev_llc, "llc_slt_probe_plain": plain.llc_mean,
        "llc_slt_probe_cv": cv.llc_mean,
    })
    row["speedup_vs_devinterp"] = row["devinterp_ms"] / row["slt_probe_cv_ms"]
    row["compiled_speedup_vs_devinterp"] = row["devinterp_ms"] / row["slt_probe_compiled_ms"]
    row["cv_over_floor"] = row["slt_probe_cv_ms"] / floor
    if repeats:
        row.update(time_to_precision(model, x, y, sampler, repeats, t_dev))
    return row


def time_to_precision(model, x, y, sampler, repeats, t_dev):
    """Std of λ̂ over repeated estimates: devinterp (8 chains × 200 draws, as a user runs
    it) against slt_probe given the same seconds, spent on more chains of the same length
    so both estimate the same quantity."""
    common = dict(loss_fn="cross_entropy", sampler=sampler, num_draws=DRAWS,
                  batch_size=BATCH, verbose=False)
    chains = CHAINS
    while True:  # the most chains whose estimate still fits in devinterp's time
        _, t = timed(lambda: estimate_llc(model, (x, y), num_chains=chains * 2, **common))
        if t > t_dev:
            break
        chains *= 2
    rng = torch.get_rng_state()
    dev = [devinterp_estimate(model, x, y, sampler, CHAINS, DRAWS, seed=s)
           for s in range(repeats)]
    torch.set_rng_state(rng)
    ours, spent = [], 0.0
    for s in range(repeats):
        r, t = timed(lambda: estimate_llc(model, (x, y), seed=100 + s, num_chains=chains,
                                          **common))
        ours.append(r.llc_mean)
        spent += t
    return {"repeats": repeats, "devinterp_llc_over_repeats": dev,
            "slt_probe_llc_over_repeats": ours,
            "devinterp_seconds_per_estimate": t_dev,
            "slt_probe_seconds_per_estimate": spent / repeats,
            "slt_probe_chains_at_equal_time": chains,
            "devinterp_llc_std": float(np.std(dev, ddof=1)),
            "slt_probe_llc_std": float(np.std(ours, ddof=1)),
            "precision_gain": float(np.std(dev, ddof=1) / np.std(ours, ddof=1))}


def markdown(rows):
    lines = ["| model | d | devinterp ms | slt_probe plain ms | slt_probe CV ms | compiled ms "
             "(compile s) | eager floor ms | speed-up vs devinterp | CV / floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']} | {r['devinterp_ms']:.2f} | "
                     f"{r['slt_probe_plain_ms']:.2f} | {r['slt_probe_cv_ms']:.2f} | "
                     f"{r['slt_probe_compiled_ms']:.2f} ({r['compile_seconds']:.0f}) | "
                     f"{r['eager_floor_ms']:.2f} | {r['speedup_vs_devinterp']:.1f}× | "
                     f"{r['cv_over_floor']:.2f} |")
    lines += ["", "Time to precision (std of λ̂ over repeated estimates, equal wall time):", "",
              "| model | devinterp std (8 chains) | slt_probe std | gain | slt_probe chains × 200 "
              "draws at equal time | s per estimate (devinterp / slt_probe) |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if "precision_gain" in r:
            lines.append(f"| {r['model']} | {r['devinterp_llc_std']:.3f} | "
                         f"{r['slt_probe_llc_std']:.3f} | {r['precision_gain']:.1f}× | "
                         f"{r['slt_probe_chains_at_equal_time']} | "
                         f"{r['devinterp_seconds_per_estimate']:.1f} / "
                         f"{r['slt_probe_seconds_per_estimate']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist-dir", default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="results/benchmarks")
    parser.add_argument("--only", choices=["modadd", "mnist"], default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    if args.only in (None, "modadd"):
        model, x, y = trained_modadd()
        nbeta = len(x) / math.log(len(x))
        rows.append(bench_model("modadd MLP p=53", model, x, y,
                                SGLD(lr=1e-4, localization=100.0, nbeta=nbeta), args.repeats))
        print(markdown(rows), flush=True)
    if args.only in (None, "mnist"):
        model, x, y = mnist_model(args.mnist_dir)
        nbeta = len(x) / math.log(len(x))
        rows.append(bench_model("MNIST MLP 784-256-256-10", model, x, y,
                                SGLD(lr=1e-5, localization=100.0, nbeta=nbeta),
                                args.repeats))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "slt_probe": slt_probe.__version__,
            "python": platform.python_version(), "threads": 1,
            "command": "python benchmarks/bench_llc.py " + " ".join(argv or [])}
    (out / "benchmark.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows)
    (out / "benchmark.md").write_text(f"Measured with `{meta['command'].strip()}` "
                                      f"(torch {meta['torch']}, 1 thread).\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
