"""One estimate of a small causal language model in a fresh process; prints its memory plan
and the growth of the process's peak resident memory (for the memory plan's test)."""
import json
import resource
import sys

import torch
from torch import nn

from slt_probe import SGLD, estimate_llc


class CausalLM(nn.Module):
    def __init__(self, vocab=512, width=128, layers=2, length=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(length, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, batch_first=True, dropout=0.0,
                                           norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        hidden = self.embed(tokens) + self.position[:length]
        return self.head(self.body(hidden, mask=mask, is_causal=True))


def main(chains: int, batch_size: int, max_memory: str | None, path: str) -> None:
    torch.manual_seed(0)
    model = CausalLM()
    tokens = torch.randint(0, 512, (256, 65))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = estimate_llc(model, (tokens[:, :-1], tokens[:, 1:]),
                          sampler=SGLD(lr=1e-6, localization=100.0), num_chains=chains,
                          num_draws=3, num_burnin=0, batch_size=batch_size, verbose=False,
                          gradient_correction=False, max_memory=max_memory,
                          compute_path=path)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_growth": after - before, "plan": result.config["memory_plan"],
                      "chains_at_once": result.config["chains_at_once"],
                      "compute_path": result.config["compute_path"]}))


if __name__ == "__main__":
    # the path is named: "auto" would choose by timing, and the paths differ in memory
    main(int(sys.argv[1]), int(sys.argv[2]), (sys.argv[3:4] or [None])[0] or None,
         "vmap, fused attention")
