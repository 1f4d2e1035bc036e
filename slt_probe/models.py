"""Bundled networks: the modular-addition embedding MLP and the MNIST MLP.

Shapes follow the published setups (see ../shared/SCIENCE.md); the activation is a
parameter so experiments can compare them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

ACTIVATIONS = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
}


class Sine(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x)


def activation(name: str) -> nn.Module:
    if name == "sin":
        return Sine()
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted([*ACTIVATIONS, 'sin'])}, got {name!r}")
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
        return self.unembed(self.act(self.linear_a(e[:, 0]) + self.linear_b(e[:, 1])))


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
