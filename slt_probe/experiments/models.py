"""Bundled networks: the modular-addition embedding MLP and the MNIST MLP.

Shapes follow the published setups (docs/experiments.md); the activation is a
parameter so experiments can compare them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

ACTIVATIONS = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
}


ACTIVATION_NAMES = (*ACTIVATIONS, "sin")


class Sine(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x)


def activation(name: str) -> nn.Module:
    if name == "sin":
        return Sine()
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATION_NAMES)}, got {name!r}")
    return ACTIVATIONS[name]()


class ModAddMLP(nn.Module):
    """Panickssery & Vaintrob / devinterp grokking MLP: shared embedding, two input maps summed."""

    def __init__(self, p: int = 53, embed_dim: int = 12, hidden: int = 48,
                 act: str = "gelu"):
        super().__init__()
        self.embedding = nn.Embedding(p, embed_dim)
        self.linear_a = nn.Linear(embed_dim, hidden)
        self.linear_b = nn.Linear(embed_dim, hidden)
        self.act = activation(act)
        self.unembed = nn.Linear(hidden, p, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        e = self.embedding(x)
        return self.forward_embedded(e[:, 0], e[:, 1])

    def forward_embedded(self, e_a: Tensor, e_b: Tensor) -> Tensor:
        """The network after its lookup table, on any (continuous) pair of embeddings."""
        return self.unembed(self.act(self.linear_a(e_a) + self.linear_b(e_b)))


def mlp(widths: list[int], act: str = "relu") -> nn.Sequential:
    """Fully connected network ``widths[0] → … → widths[-1]`` (input flattened)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(activation(act))
    return nn.Sequential(*layers)


def modadd_data(p: int = 53) -> tuple[Tensor, Tensor]:
    """All p² pairs (a, b) with label (a + b) mod p."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
    return x, (x[:, 0] + x[:, 1]) % p


class ModAddTransformer(nn.Module):
    """Nanda et al. (2023) one-layer transformer for (a + b) mod p.

    Tokens ``[a, b, =]`` (``=`` is token p), learned positional embeddings, one attention
    block (``num_heads`` heads, no LayerNorm) and one MLP block with residual connections,
    read out at the ``=`` position. Inputs are ``(batch, 2)`` pairs, like ``ModAddMLP``;
    the ``=`` token is appended here.
    """

    def __init__(self, p: int = 113, d_model: int = 128, num_heads: int = 4,
                 d_mlp: int = 512, act: str = "relu"):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.p = p
        self.num_heads = num_heads
        self.embed = nn.Embedding(p + 1, d_model)
        self.pos_embed = nn.Parameter(torch.randn(3, d_model) / d_model ** 0.5)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.attn_out = nn.Linear(d_model, d_model, bias=False)
        self.mlp_in = nn.Linear(d_model, d_mlp)
        self.act = activation(act)
        self.mlp_out = nn.Linear(d_mlp, d_model)
        self.unembed = nn.Linear(d_model, p, bias=False)
        self._nanda_init(d_model, vocab=p + 1)

    @torch.no_grad()
    def _nanda_init(self, d_model: int, vocab: int) -> None:
        # Nanda et al.'s initialisation: N(0, 1/d_model) everywhere, N(0, 1/vocab) for the
        # unembedding, zero biases. torch's N(0, 1) embedding default is 11x larger; with it
        # (and a float32 loss) full-batch training cycled between train loss ~5e-7 and ~5e-3
        # and test accuracy was still 0.2-0.3 after 12k steps; with both changed, 3/3 seeds grok.
        for weight in (self.embed.weight, self.qkv.weight, self.attn_out.weight,
                       self.mlp_in.weight, self.mlp_out.weight):
            weight.normal_(0.0, d_model ** -0.5)
        self.unembed.weight.normal_(0.0, vocab ** -0.5)
        self.mlp_in.bias.zero_()
        self.mlp_out.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        e = self.embed(x)
        return self.forward_embedded(e[:, 0], e[:, 1])

    def forward_embedded(self, e_a: Tensor, e_b: Tensor) -> Tensor:
        """The network after its token lookup, on any (continuous) pair of embeddings."""
        equals = self.embed.weight[self.p].expand_as(e_a)
        h = torch.stack([e_a, e_b, equals], dim=1) + self.pos_embed
        batch, seq, d_model = h.shape
        q, k, v = self.qkv(h).view(batch, seq, 3, self.num_heads, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        # Written out rather than scaled_dot_product_attention, which has no vmap rule and
        # falls back to a slow per-chain loop under the sampler's vmap.
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        causal = torch.ones(seq, seq, dtype=torch.bool, device=h.device).tril()
        attended = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        h = h + self.attn_out(attended.transpose(1, 2).reshape(batch, seq, d_model))
        last = h[:, -1]
        last = last + self.mlp_out(self.act(self.mlp_in(last)))
        return self.unembed(last)
