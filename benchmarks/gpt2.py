"""λ̂ of a GPT-2-sized language model (124 M parameters), built from ``transformers``' own
config (no download), trained briefly with the Hugging Face Trainer while the callback
estimates λ̂, then estimated once more with ``estimate_llc``.

    python benchmarks/gpt2.py [--steps 20] [--draws 10] [--device cpu] [--out results/benchmarks]

The corpus is a counting language (each token is the previous one plus a step, modulo 97,
sequences of 16 tokens, 32 of them: small enough for a CPU), so a few optimizer steps lower the loss measurably. Writes
``OUT/gpt2.md`` with the training loss, each estimate (λ̂, its excess ratio and verdict,
the computation path, the chains computed at once and the memory plan) and the times.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
import transformers

import slt_probe
from slt_probe.integrations.hf import LLCCallback
from slt_probe.run_log import read_rows, write_text_atomic

VOCAB_USED, LENGTH, SEQUENCES = 97, 16, 32


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


class CountingSentences(torch.utils.data.Dataset):
    def __init__(self, n=SEQUENCES, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB_USED, (n, 1), generator=g)
        step = torch.randint(1, 6, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(LENGTH)) % VOCAB_USED

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-memory", default=None,
                        help="the estimates' memory budget (default: the library's)")
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args(argv)
    transformers.set_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(attn_implementation="sdpa"))
    params = sum(p.numel() for p in model.parameters())
    data = CountingSentences()
    probe = dict(sampler=slt_probe.SGLD(lr=1e-7, localization=1000.0), loss_fn="next_token",
                 num_chains=args.chains, num_draws=args.draws, batch_size=8,
                 device=args.device, max_memory=args.max_memory)
    out = Path(args.out)
    log_dir = out / "gpt2_llc"
    callback = LLCCallback(data, every=args.steps, log_dir=log_dir,
                           resume_changed_settings=True, **probe)
    training = transformers.TrainingArguments(
        output_dir=str(out / "gpt2_trainer"), max_steps=args.steps,
        per_device_train_batch_size=8, learning_rate=3e-4, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, use_cpu=args.device == "cpu", seed=0)
    started = time.perf_counter()
    trainer = transformers.Trainer(model=model, args=training, train_dataset=data,
                                   callbacks=[callback])
    trainer.train()
    trained = time.perf_counter() - started
    started = time.perf_counter()
    ids = data.ids
    result = slt_probe.estimate_llc(model, ({"input_ids": ids}, ids), verbose=False,
                                    **{**probe, "num_draws": 2 * args.draws})
    alone = time.perf_counter() - started
    plan = result.config["memory_plan"]
    lines = [f"Measured with `python benchmarks/gpt2.py {' '.join(argv or sys.argv[1:])}` "
             f"(torch {torch.__version__}, transformers {transformers.__version__}, "
             f"{args.device}). GPT-2 from `GPT2Config()`: {params:,} parameters, random "
             f"initialisation, then {args.steps} AdamW steps (batch 8, lr 3e-4) on "
             f"{SEQUENCES} counting sentences of {LENGTH} tokens; SGLD ε 1e-7, γ 1000, "
             f"nβ = n/log n, batch 8, loss `next_token`.", "",
             "| estimate | step | chains × draws | L_n(w*) | λ̂ ± SE | excess ratio | "
             "verdict | path | chains at once | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in read_rows(log_dir / "llc.csv"):
        lines.append(f"| Hugging Face callback | {row['step']} | {row['num_chains']} × "
                     f"{row['num_draws']} | {row['init_loss']:.3f} | {row['llc_mean']:.3g} ± "
                     f"{row['llc_sem']:.2g} | {row['excess_ratio']} | "
                     f"{row['reasons'] or 'healthy'} | {row['compute_path']} | "
                     f"{row['chains_at_once']} | {row['seconds']:.0f} |")
    verdict = ";".join(result.diagnostics["reasons"]) or "healthy"
    lines.append(f"| estimate_llc | {args.steps} | {args.chains} × {2 * args.draws} | "
                 f"{result.init_loss:.3f} | {result.llc_mean:.3g} ± {result.llc_sem:.2g} | "
                 f"{result.diagnostics.get('excess_ratio')} | {verdict} | "
                 f"{result.config['compute_path']} | {result.config['chains_at_once']} | "
                 f"{alone:.0f} |")
    lines += ["", f"Training with the callback took {trained:.0f} s. Memory plan of the last "
              f"estimate: budget {plan['budget'] / 1e9:.1f} GB ({plan['budget_source']}), "
              f"predicted peak {plan['predicted_peak'] / 1e9:.2f} GB, activations "
              f"{plan['activations_per_example'] / 1e6:.1f} MB per sequence per chain; the "
              f"process's peak resident memory was {peak_rss() / 1e9:.2f} GB (model, "
              "trainer and optimizer state included)."]
    write_text_atomic(out / "gpt2.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
