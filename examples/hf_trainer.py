"""λ̂ while the Hugging Face Trainer trains a tiny BERT classifier (built from a config: no
downloads), with gradient accumulation: the estimates land at optimizer steps.

    python examples/hf_trainer.py [--quick] [--out runs/examples/hf]

The callback reads the dataset of dicts the Trainer trains on (``input_ids``,
``attention_mask``, ``labels``) and samples the cross-entropy of the model's ``logits``.
Needs ``pip install "slt-probe[hf]"``.
"""
from __future__ import annotations

import argparse
import time

import torch
import transformers

import slt_probe
from slt_probe.integrations.hf import LLCCallback


class Parity(torch.utils.data.Dataset):
    """Token sequences labelled by whether their first token is in the upper half."""

    def __init__(self, n: int, length: int = 8, vocab: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.labels = (self.ids[:, 0] >= vocab // 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="runs/examples/hf")
    args = parser.parse_args(argv)
    steps = 20 if args.quick else 300
    transformers.set_seed(0)
    config = transformers.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    train = Parity(512)
    callback = LLCCallback(                                                   # <- added
        train, every=steps // 4, sampler=slt_probe.SGLD(lr=1e-5, localization=100.0),
        num_chains=4, num_draws=30 if args.quick else 150, log_dir=f"{args.out}/llc",
        verbose=False)                                                        # <- added
    trainer = transformers.Trainer(
        model=model, train_dataset=train, callbacks=[callback],             # <- added
        args=transformers.TrainingArguments(
            output_dir=args.out, max_steps=steps, per_device_train_batch_size=16,
            gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True,
            save_strategy="no", logging_strategy="no", disable_tqdm=args.quick, seed=0))
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    rows = callback.probe.llc_rows()
    print(f"{len(rows)} estimates at optimizer steps {[r['step'] for r in rows]}; final "
          f"λ̂ = {rows[-1]['llc_mean']:.2f}; the callback took "
          f"{callback.probe.probe_seconds / wall:.0%} of {wall:.1f} s")
    return callback


if __name__ == "__main__":
    main()
