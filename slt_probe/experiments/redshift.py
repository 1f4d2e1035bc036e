"""Simplicity bias at initialisation ("neural redshift", Teney et al. 2024).

The complexity of an untrained network's function, read on a 2-D slice of its input:
the mean frequency of the 2-D Fourier spectrum and the Lempel–Ziv (zlib/DEFLATE)
compressibility of the quantised outputs. Slices: for the modular-addition models the
two token embeddings are replaced by ``s·u`` and ``t·v`` (u, v random unit directions in
embedding space, scaled to the embedding's typical norm); for the MNIST MLP the slice is
``s·u + t·v`` through input space with u, v two (centred) training images. The scalar
read is output unit 0. Not here: anything about training.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from scipy.fft import dctn
from torch import Tensor, nn

GRID = 64
WEIGHT_SCALES = (0.5, 1.0, 2.0, 4.0, 8.0)


def grid_points(size: int = GRID) -> tuple[Tensor, Tensor]:
    axis = torch.linspace(-1.0, 1.0, size)
    s, t = torch.meshgrid(axis, axis, indexing="ij")
    return s.reshape(-1), t.reshape(-1)


def mean_frequency(values: np.ndarray) -> float:
    """Magnitude-weighted mean radial frequency (cycles per grid side) of a 2-D function
    sampled on a square grid. A cosine transform (the spectrum of the mirrored, hence
    periodic, function) so a plain ramp does not read as a sawtooth's high frequencies."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"values must be a square 2-D grid, got shape {values.shape}")
    spectrum = np.abs(dctn(values, norm="ortho"))
    spectrum[0, 0] = 0.0  # the mean
    k = np.arange(values.shape[0]) / 2.0
    radius = np.hypot(*np.meshgrid(k, k, indexing="ij"))
    total = spectrum.sum()
    return float((radius * spectrum).sum() / total) if total > 0 else 0.0


def lz_complexity(values: np.ndarray, levels: int = 16) -> float:
    """Compressed size / raw size of the outputs quantised to ``levels`` bins over their
    range (row-major). Near 0: simple (constant, smooth); near 1: incompressible."""
    values = np.asarray(values, dtype=float).reshape(-1)
    low, high = values.min(), values.max()
    if high - low < 1e-12:
        codes = np.zeros(len(values), dtype=np.uint8)
    else:
        codes = np.minimum(((values - low) / (high - low) * levels).astype(int), levels - 1)
    raw = codes.astype(np.uint8).tobytes()
    return len(zlib.compress(raw, 9)) / len(raw)


def slice_function(model: nn.Module, directions: tuple[Tensor, Tensor], size: int = GRID):
    """Output unit 0 of ``model`` on the slice spanned by ``directions`` over [−1, 1]²."""
    s, t = grid_points(size)
    u, v = directions
    with torch.no_grad():
        if hasattr(model, "forward_embedded"):
            out = model.forward_embedded(s[:, None] * u, t[:, None] * v)
        else:
            out = model(s[:, None] * u + t[:, None] * v)
    return out[:, 0].reshape(size, size).numpy()


def slice_directions(model: nn.Module, reference: Tensor | None, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if hasattr(model, "forward_embedded"):
        table = next(p for n, p in model.named_parameters() if "embed" in n)
        scale = table.detach().norm(dim=1).mean()
        u, v = torch.randn(2, table.shape[1], generator=generator)
        return u / u.norm() * scale, v / v.norm() * scale
    if reference is None or len(reference) < 2:
        raise ValueError("an input-space slice needs at least two reference inputs")
    pick = torch.randperm(len(reference), generator=generator)[:2]
    centred = reference - reference.mean(0)
    return centred[pick[0]], centred[pick[1]]


def complexity_at_init(build, reference: Tensor | None = None, *,
                       scales=WEIGHT_SCALES, seeds=(0, 1, 2), size: int = GRID) -> list[dict]:
    """Rows (scale, seed, mean_frequency, lz) for ``build(seed)`` → an untrained model whose
    parameters are multiplied by each scale."""
    rows = []
    for seed in seeds:
        base = build(seed)
        directions = slice_directions(base, reference, seed)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for scale in scales:
            with torch.no_grad():
                for name, p in base.named_parameters():
                    p.copy_(state[name] * scale)
            values = slice_function(base, directions, size)
            rows.append({"scale": scale, "seed": seed, "mean_frequency": mean_frequency(values),
                         "lz": lz_complexity(values)})
    return rows
