"""Per-head λ̂ of the grokking transformer: every head's chains in one batched run against
one run per head, at the refined-LLC paper's settings.

    python benchmarks/refined.py [--checkpoint results/grokking/modadd-transformer/seed0/model.pt]
                                 [--out results/benchmarks]

The bundled modular-addition transformer (p = 113, d_model 128, 4 heads) at the given
weights, its training set (30 % of pairs), SGLD ε = 10⁻³, nβ = 30, γ = 100, 4 chains ×
200 draws per head, batch 32 (Wang et al. 2024). One thread. Writes ``OUT/refined.md``:
each head's λ̂ both ways (equal at the same seed), devinterp's weight-restricted estimate
of each head beside them, and the wall time of each way.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from pathlib import Path

import torch

import slt_probe
from slt_probe.experiments.presets import build_model, build_task, preset
from slt_probe.reports import markdown_table
from slt_probe.restrictions import attention_heads, preview
from slt_probe.run_log import write_text_atomic

SETTINGS = dict(sampler=slt_probe.SGLD(lr=1e-3, localization=100.0, nbeta=30.0),
                num_chains=4, num_draws=200, batch_size=32, seed=0, verbose=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint",
                        default="results/grokking/modadd-transformer/seed0/model.pt")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = preset("modadd-transformer")
    model = build_model(config, "relu", 0)
    model.load_state_dict(torch.load(args.checkpoint))
    task = build_task(config, 0)
    data = (task.x_train, task.targets(task.y_train, config.loss))
    heads = attention_heads(model)
    slt_probe.estimate_llc(model, data, restrict_to=heads["head0"], **{**SETTINGS,
                                                                       "num_draws": 5})
    started = time.perf_counter()
    together = slt_probe.estimate_restricted(model, data, heads, **SETTINGS)
    one_run = time.perf_counter() - started
    alone, separate = {}, 0.0
    for name, restriction in heads.items():
        started = time.perf_counter()
        alone[name] = slt_probe.estimate_llc(model, data, restrict_to=restriction, **SETTINGS)
        separate += time.perf_counter() - started
    # devinterp's weight-restricted estimate (its SGLD's optimize_over masks), one run per
    # head with its chains one after another: the same posterior, its own random stream
    reference, devinterp_seconds = {}, 0.0
    for name, restriction in heads.items():
        started = time.perf_counter()
        reference[name] = slt_probe.estimate_llc(model, data, restrict_to=restriction,
                                                 backend="devinterp", **SETTINGS)
        devinterp_seconds += time.perf_counter() - started
    rows = [[name, preview(model, heads[name])[-1]["sampled"],
             f"{together[name].llc_mean:.4f} ± {together[name].llc_sem:.4f}",
             f"{alone[name].llc_mean:.4f} ± {alone[name].llc_sem:.4f}",
             f"{reference[name].llc_mean:.4f} ± {reference[name].llc_sem:.4f}",
             together[name].config["gradient_correction"],
             together[name].diagnostics["healthy"]] for name in heads]
    command = "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:])
    text = ("# Per-head λ̂: one batched run against one run per head\n\n"
            f"`{command.strip()}` (one thread; checkpoint `{args.checkpoint}`; SGLD ε 1e-3, "
            "nβ 30, γ 100, 4 chains × 200 draws per head, batch 32)\n\n"
            + "\n".join(markdown_table(["head", "weights sampled", "λ̂, one run for all heads",
                                        "λ̂, one run per head", "λ̂, devinterp, one run per head",
                                        "corrected", "healthy"], rows))
            + f"\n\nWall time: **{one_run:.1f} s** for all {len(heads)} heads in one run, "
              f"**{separate:.1f} s** one run per head ({separate / one_run:.2f}×), "
              f"**{devinterp_seconds:.1f} s** with devinterp "
              f"{importlib.metadata.version('devinterp')}, one run per head "
              f"({devinterp_seconds / one_run:.2f}×).\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out) / "refined.md", text)
    print(text)


if __name__ == "__main__":
    main()
