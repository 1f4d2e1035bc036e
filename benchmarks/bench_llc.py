"""Time slt_probe against devinterp at identical settings, each measurement in its own process.

    python benchmarks/bench_llc.py [--mnist-dir DIR] [--checkpoints results/grokking]
        [--models modadd-mlp,mnist-mlp,modadd-transformer,encoder-layer,gru]
        [--chains 8,32] [--threads 1] [--device cpu] [--out results/benchmarks]
        [--time-limit SECONDS]

Models: the p = 53 modular-addition MLP (d = 4,428), a 784-256-256-10 ReLU MLP on 8,000
real MNIST images (d = 269,322), the 1-layer modular-addition transformer (d = 226,688;
the trained grokking checkpoint when ``--checkpoints`` holds one, else its
initialisation), and two models built from torch's own layers: a classifier on
``nn.TransformerEncoderLayer`` (computed with torch's math attention) and one on ``nn.GRU``
(computed as a loop over chains). Language models (``--models lm-4m,lm-21m,lm-105m,
gpt2-124m``): pre-norm causal ``nn.TransformerEncoder`` LMs (vocabulary 2,048, sequence 64;
4 layers d 256, 6 layers d 512, 8 layers d 1024) and a GPT-2 built from ``transformers``'
own config (12 layers, d 768, vocabulary 50,257, sequence 64), at their random
initialisation on random tokens (the time of a chain·draw does not depend on the weights),
batch 64. Every estimate uses SGLD at one ε, γ = 100, nβ = n/log n, batch 128 (64 for the
language models).

Each measurement runs in a fresh process (so its peak memory is its own) and reports ms per
chain·draw (the fastest of two runs after a warm-up), the peak resident memory above the
model and data, and λ̂. Rows: devinterp 1.3 through its public API as a user calls it;
slt_probe eager (float32, bf16 autocast, and TF32 matrix products on a GPU), and compiled
(steady state, the one-off compile time beside it); and the eager floor, one forward +
backward of the plain model at the batch size plus drawing d Gaussians, per chain. On a GPU
the peak memory is ``torch.cuda.max_memory_allocated``. ``--time-limit`` stops starting
measurements (and stops one that runs past it) when the time is spent; the tables are
rewritten after every measurement, so a stopped run keeps what it measured. Writes
``OUT/benchmark.json`` and ``OUT/benchmark.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from devinterp.optim import SGLD as DevinterpSGLD
from devinterp.slt.sampler import estimate_learning_coeff_with_summary
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slt_probe
from slt_probe.core.batched_model import BatchedModel
from slt_probe.core.data import as_source
from slt_probe.core.engine import run_estimate
from slt_probe.core.losses import resolve_loss
from slt_probe.core.target import Target
from slt_probe.experiments.grokking import default_activation
from slt_probe.experiments.mnist import load_mnist
from slt_probe.experiments.models import mlp
from slt_probe.experiments.presets import build_model, build_task, preset
from slt_probe.run_log import write_json_atomic, write_text_atomic

BATCH = 128
LM_BATCH = 64
MODELS = ("modadd-mlp", "mnist-mlp", "modadd-transformer", "encoder-layer", "gru")
# (layers, width) of the causal encoder language models; gpt2-124m is GPT-2's own shape
LANGUAGE_MODELS = {"lm-4m": (4, 256), "lm-21m": (6, 512), "lm-105m": (8, 1024)}
LM_VOCAB, LM_LENGTH, LM_SEQUENCES = 2048, 64, 2048
VARIANTS = ("devinterp", "slt_probe", "slt_probe bf16", "slt_probe tf32",
            "slt_probe compiled", "eager floor")
# draws per measurement: enough for a stable time per chain·draw on each model
DRAWS = {"modadd-mlp": 200, "mnist-mlp": 100, "modadd-transformer": 30,
         "encoder-layer": 60, "gru": 60, "lm-4m": 20, "lm-21m": 10, "lm-105m": 6,
         "gpt2-124m": 6}
LR = {"modadd-mlp": 1e-4, "mnist-mlp": 1e-5, "modadd-transformer": 1e-5,
      "encoder-layer": 1e-5, "gru": 1e-5, "lm-4m": 1e-6, "lm-21m": 1e-6, "lm-105m": 1e-6,
      "gpt2-124m": 1e-6}


class EncoderClassifier(nn.Module):
    """Tokens → embedding → one ``nn.TransformerEncoderLayer`` → mean → classes."""

    def __init__(self, vocab=64, d_model=128, heads=4, classes=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens):
        return self.head(self.layer(self.embed(tokens)).mean(dim=1))


class CausalLM(nn.Module):
    """Tokens → embedding + positions → pre-norm causal ``nn.TransformerEncoder`` → logits."""

    def __init__(self, layers: int, width: int, vocab: int = LM_VOCAB, length: int = LM_LENGTH):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(length, width))
        layer = nn.TransformerEncoderLayer(width, max(4, width // 64), 4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, tokens):
        length = tokens.shape[1]
        hidden = self.embed(tokens) + self.position[:length]
        return self.head(self.body(hidden, mask=self.mask[:length, :length], is_causal=True))


def _gpt2():
    config = transformers.GPT2Config(n_positions=LM_LENGTH, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(config)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _cross_entropy(out, y):
    out = _logits(out)
    return F.cross_entropy(out.transpose(1, 2) if out.dim() == 3 else out, y)


class GRUClassifier(nn.Module):
    def __init__(self, features=32, hidden=64, classes=8):
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


def _fit(model, x, y, steps, lr=1e-3):
    """A few hundred Adam steps, so the weights sit near a minimum (λ̂ > 0)."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(len(x), (BATCH,), generator=generator)
        optimizer.zero_grad()
        _cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    return model


def build(name: str, mnist_dir=None, checkpoints=None):
    """(model, x, y) for a benchmark model, built the same way in every process."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if name in ("modadd-mlp", "modadd-transformer"):
        config = preset(name)
        task = build_task(config, 0)
        model = build_model(config, default_activation(config), 0)
        path = Path(checkpoints or "") / name / "seed0" / "model.pt"
        if checkpoints and path.exists():
            model.load_state_dict(torch.load(path))
        elif name == "modadd-mlp":
            _fit(model, task.x_train, task.y_train, 1500, lr=5e-3)
        return model, task.x_train, task.y_train
    if name == "mnist-mlp":
        x, y = load_mnist("test", mnist_dir)
        x, y = x[:8000], y[:8000]
        return _fit(mlp([784, 256, 256, 10]), x, y, 600), x, y
    if name == "encoder-layer":
        x = torch.randint(0, 64, (2048, 16), generator=generator)
        y = x[:, :4].sum(dim=1) % 8
        return _fit(EncoderClassifier(), x, y, 300), x, y
    if name in LANGUAGE_MODELS or name == "gpt2-124m":
        model = _gpt2() if name == "gpt2-124m" else CausalLM(*LANGUAGE_MODELS[name])
        vocab = model.config.vocab_size if name == "gpt2-124m" else LM_VOCAB
        tokens = torch.randint(0, vocab, (LM_SEQUENCES, LM_LENGTH + 1), generator=generator)
        return model, tokens[:, :-1], tokens[:, 1:]
    if name == "gru":
        x = torch.randn(2048, 16, 32, generator=generator)
        y = (x[:, :, 0].cumsum(dim=1)[:, -1] > 0).long() + 2 * (x[:, -1, 1] > 0).long()
        return _fit(GRUClassifier(), x, y, 300), x, y
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def _batch_size(name: str) -> int:
    return LM_BATCH if name in LANGUAGE_MODELS or name == "gpt2-124m" else BATCH


def _devinterp(model, x, y, sampler, chains, draws, batch_size):
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = estimate_learning_coeff_with_summary(
            model, loader, evaluate=lambda m, b: _cross_entropy(m(b[0]), b[1]),
            sampling_method=DevinterpSGLD,
            optimizer_kwargs=dict(lr=sampler.lr, localization=sampler.localization,
                                  nbeta=sampler.nbeta),
            num_chains=chains, num_draws=draws, num_burnin_steps=0, seed=0, verbose=False,
            device=str(next(model.parameters()).device))
    return float(out["llc/mean"])


def _floor(model, x, y, chains, draws, batch_size):
    d = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    noise = torch.Generator(device=x.device).manual_seed(0)
    for _ in range(chains * draws):
        index = torch.randint(len(x), (batch_size,), generator=generator).to(x.device)
        model.zero_grad(set_to_none=True)
        _cross_entropy(model(x[index]), y[index]).backward()
        torch.randn(d, generator=noise, device=x.device)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return None


def measure(name: str, variant: str, chains: int, *, mnist_dir=None, checkpoints=None,
            threads: int = 1, device: str = "cpu") -> dict:
    """One measurement (run in its own process by ``main``)."""
    torch.set_num_threads(threads)
    model, x, y = build(name, mnist_dir, checkpoints)
    model, x, y = model.to(device), x.to(device), y.to(device)
    d = sum(p.numel() for p in model.parameters())
    draws = DRAWS[name]
    batch_size = _batch_size(name)
    sampler = slt_probe.SGLD(lr=LR[name], localization=100.0, nbeta=len(x) / math.log(len(x)))
    settings = slt_probe.EstimateSettings(
        sampler=sampler, num_chains=chains, num_draws=draws, num_burnin=0,
        batch_size=batch_size, precision={"slt_probe bf16": "bfloat16",
                                          "slt_probe tf32": "tf32"}.get(variant, "float32"),
        compile=variant == "slt_probe compiled", gradient_correction=False)
    batched = source = None
    if variant.startswith("slt_probe"):
        batched = BatchedModel.for_settings(model, resolve_loss("cross_entropy"), settings)
        source = as_source((x, y))

    def run():
        if variant == "devinterp":
            return _devinterp(model, x, y, sampler, chains, draws, batch_size)
        if variant == "eager floor":
            return _floor(model, x, y, chains, draws, batch_size)
        # the point at w* is measured in every run, as devinterp's timing includes its own
        target = Target.prepare(batched, source, settings, model.state_dict())
        return run_estimate(target, settings, verbose=False).llc_mean

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    llc = run()  # warm-up (and the compile)
    first = time.perf_counter() - started
    times = []
    for _ in range(2):
        started = time.perf_counter()
        llc = run()
        times.append(time.perf_counter() - started)
    best = min(times)
    row = {"model": name, "variant": variant, "chains": chains, "draws": draws, "params": d,
           "n": len(x), "threads": threads, "device": device, "lr": sampler.lr,
           "ms_per_chain_draw": best / (chains * draws) * 1e3, "llc": llc,
           "compile_seconds": max(first - best, 0.0) if variant == "slt_probe compiled" else None,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_above_model_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                  - baseline) / 1024}
    if batched is not None:
        row["compute_path"] = batched.path
        row["compiled"] = batched.compiled
        row["path_ms_per_step"] = {p: t * 1e3 for p, t in batched.path_timings.items()}
        row["chains_at_once"] = batched.group(chains)
    if device.startswith("cuda"):
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return row


def _in_subprocess(args, name, variant, chains, timeout=None) -> dict:
    command = [sys.executable, __file__, "--measure", json.dumps(
        {"name": name, "variant": variant, "chains": chains, "mnist_dir": args.mnist_dir,
         "checkpoints": args.checkpoints, "threads": args.threads, "device": args.device})]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           # a fresh inductor cache per process, so the compile time is a cold compile
           "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="slt_probe_bench_")}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "variant": variant, "chains": chains,
                "error": f"stopped at the time limit ({timeout:.0f} s left for it)"}
    if done.returncode != 0:
        return {"model": name, "variant": variant, "chains": chains,
                "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(rows, meta) -> str:
    def cell(model, variant, chains, key, fmt):
        for r in rows:
            if (r["model"], r["variant"], r["chains"]) == (model, variant, chains):
                if "error" in r:
                    return "failed"
                value = r.get(key)
                return "—" if value is None else format(value, fmt)
        return "—"

    models = list(dict.fromkeys(r["model"] for r in rows))
    chains = sorted({r["chains"] for r in rows})
    gpu = any("peak_cuda_mb" in r for r in rows)
    memory = "peak_cuda_mb" if gpu else "peak_rss_mb"
    lines = [f"Measured with `{meta['command']}` ({meta['device']}, torch {meta['torch']}, "
             f"{meta['threads']} thread(s), {meta['cpu']}). ms per chain·draw, the fastest "
             "of two runs after a warm-up; each measurement in its own process.", ""]
    header = ["model", "d", "path", "chains", *VARIANTS, "speed-up vs devinterp",
              "× floor", "compile s",
              f"peak {'GPU' if gpu else 'resident'} MB (slt_probe / devinterp)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        params = next((f"{r['params']:,}" for r in rows
                       if r["model"] == model and "params" in r), "—")
        path = next((r["compute_path"] for r in rows
                     if r["model"] == model and r.get("compute_path")), "—")
        for c in chains:
            times = {v: next((r.get("ms_per_chain_draw") for r in rows if (r["model"],
                     r["variant"], r["chains"]) == (model, v, c)), None) for v in VARIANTS}
            ours, theirs, floor = times["slt_probe"], times["devinterp"], times["eager floor"]
            lines.append("| " + " | ".join([
                model, params, path, str(c),
                *[cell(model, v, c, "ms_per_chain_draw", ".3g") for v in VARIANTS],
                f"{theirs / ours:.2f}×" if ours and theirs else "—",
                f"{ours / floor:.2f}" if ours and floor else "—",
                cell(model, "slt_probe compiled", c, "compile_seconds", ".0f"),
                f"{cell(model, 'slt_probe', c, memory, '.0f')} / "
                f"{cell(model, 'devinterp', c, memory, '.0f')}"]) + " |")
    lines += ["", "λ̂ of each measurement (one short run; the libraries' estimators differ "
              "in how they read L_n(w*), so only their agreement in size is expected):", ""]
    estimating = VARIANTS[:5]
    lines += ["| model | chains | " + " | ".join(estimating) + " |",
              "|---|---|" + "---|" * len(estimating)]
    for model in models:
        for c in chains:
            lines.append(f"| {model} | {c} | " + " | ".join(
                cell(model, v, c, "llc", ".3g") for v in estimating) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=None,
                        help="default: all (TF32 only on a GPU)")
    parser.add_argument("--chains", default="8,32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mnist-dir", default=None)
    parser.add_argument("--checkpoints", default="results/grokking")
    parser.add_argument("--out", default="results/benchmarks")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for the whole table")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:
        spec = json.loads(args.measure)
        print(json.dumps(measure(spec.pop("name"), spec.pop("variant"), spec.pop("chains"),
                                 **spec)))
        return
    variants = args.variants or ",".join(
        v for v in VARIANTS if v != "slt_probe tf32" or args.device.startswith("cuda"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    meta = {"command": "python benchmarks/bench_llc.py " + " ".join(argv or sys.argv[1:]),
            "torch": torch.__version__, "devinterp": version("devinterp"),
            "slt_probe": slt_probe.__version__, "threads": args.threads,
            "device": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                       else "CPU"), "cpu": cpu, "python": platform.python_version()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, rows = time.monotonic(), []
    for name in args.models.split(","):
        for chains in [int(c) for c in args.chains.split(",")]:
            for variant in variants.split(","):
                left = None if args.time_limit is None else (
                    args.time_limit - (time.monotonic() - started))
                if left is not None and left < 10:
                    print(f"time limit reached; {name} {variant} {chains} not measured")
                    continue
                rows.append(_in_subprocess(args, name, variant, chains, timeout=left))
                print(json.dumps(rows[-1]), flush=True)
                write_json_atomic(out / "benchmark.json", {"meta": meta, "rows": rows})
                write_text_atomic(out / "benchmark.md", markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
