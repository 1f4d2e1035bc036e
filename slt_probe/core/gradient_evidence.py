"""Is ∇L_n(w*) a real gradient or sampling noise, and how far would it pull the plain
estimate? The evidence behind ``gradient_correction="auto"``, measured once per point.

Significance. g = ∇L_n(w*) is the mean of n per-example gradients. Where w* is a true
parameter of the data (or any point whose expected gradient vanishes), they have mean 0
and covariance Σ, so E[n‖g‖²] = tr Σ: the gradient is as large as its own noise. The data
are split at random into K groups; the spread of the group gradients estimates tr Σ
whether or not g has a mean, and the statistic T = n‖g‖² / tr Σ̂ is about 1 for noise and
grows like n for a real gradient. Under the null, n‖g‖² is a weighted sum of χ²₁ whose
heaviest tail (all of Σ in one direction) is that of tr Σ·χ²₁, and tr Σ̂ is tr Σ·χ²_{K−1}
/(K−1) in that case, so T ≤ F(1, K−1) in the tail: the gradient counts as real when T
exceeds F(1, K−1)'s 1 − ``SIGNIFICANCE`` quantile (13.2 at K = 32). The bound holds for
any Σ, n and model, so the test stays off at true parameters with probability ≥ 0.999,
and at settled minima (g ≈ 0) always.

Size. A real gradient matters only if it moves the plain estimate. On a quadratic
L = L* + g·Δ + ½ΔᵀHΔ the localised posterior exp(−nβL − γ/2‖Δ‖²) is Gaussian, and the
linear term lowers nβ·E[L − L*] by

    pull(nβ, γ) = nβ²·gᵀ (nβH + γ)⁻² (½nβH + γ) g,

which is nβ²‖g‖²/γ along flat directions and nβ‖g‖²/(2h) along a stiff one of curvature
h. It is computed by Lanczos quadrature started at g (a few Hessian-vector products on
all data): the Ritz values θⱼ of the Krylov space of g and their weights τⱼ² give
gᵀf(H)g ≈ ‖g‖² Σⱼ τⱼ² f(θⱼ) exactly for polynomials of degree < 2k. A direction of
negative curvature stronger than γ/nβ along g (nβθ + γ ≤ 0) makes the pull unbounded.

The correction subtracts g·(w − w*) from what is sampled. It is exact on a quadratic, but
along the valleys of a singular model, and across the kinks of ReLU and max-pooling, it
tilts directions that are flat into slopes that only γ restrains. So ``"auto"`` applies it
only where the plain estimate would be wrong: g significant **and** its pull above
``PULL_THRESHOLD`` nats. Not here: sampling with the correction (``driver``), the estimate
(``engine``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from .data import take

NOISE_GROUPS = 32
SIGNIFICANCE = 1e-3
LANCZOS_STEPS = 12
# nats: the plain estimator's predicted shift from the linear term above which the
# correction is applied (see the module docstring; measured in docs/estimating.md)
PULL_THRESHOLD = 1.0
# a Ritz value carrying less than this share of ‖g‖² is too poorly resolved by a few
# Lanczos steps to declare the pull unbounded
NEGLIGIBLE_WEIGHT = 1e-3
GRADIENT_SUMMARY_KEYS = ("gradient_norm", "gradient_noise_ratio", "gradient_noise_threshold",
                         "gradient_significant", "gradient_pull", "gradient_pull_threshold")


def noise_threshold(groups: int, significance: float = SIGNIFICANCE) -> float:
    """The 1 − ``significance`` quantile of F(1, groups − 1), T's heaviest-tailed null.

    Examples:
        >>> round(noise_threshold(32), 1)
        13.2
    """
    return float(stats.f.ppf(1.0 - significance, 1, groups - 1))


@dataclass(frozen=True)
class GradientEvidence:
    """g = ∇L_n(w*), how it compares with its own noise, and its curvature (Ritz values
    and weights of the Krylov space of g; empty when g is not significant)."""

    gradient: Tensor
    norm_sq: float
    noise_norm_sq: float  # tr Σ̂ / n: E‖g‖² if g were noise
    groups: int
    ritz_values: tuple[float, ...] = ()
    ritz_weights: tuple[float, ...] = ()

    @property
    def ratio(self) -> float:
        """T = n‖g‖² / tr Σ̂ (about 1 for noise)."""
        if self.noise_norm_sq <= 0:
            return math.inf if self.norm_sq > 0 else 0.0
        return self.norm_sq / self.noise_norm_sq

    @property
    def threshold(self) -> float:
        return noise_threshold(self.groups)

    @property
    def significant(self) -> bool:
        return self.groups >= 2 and self.ratio > self.threshold

    def pull(self, nbeta: float, localization: float) -> float:
        """nats by which the linear term lowers the plain estimate (quadratic model)."""
        if self.norm_sq == 0:
            return 0.0
        if not self.ritz_values:  # no curvature measured: the flat-direction bound
            return nbeta ** 2 * self.norm_sq / localization if localization > 0 else math.inf
        total = 0.0
        for theta, weight in zip(self.ritz_values, self.ritz_weights):
            precision = nbeta * theta + localization
            if precision > 0:
                total += weight * nbeta ** 2 * (0.5 * nbeta * theta + localization) / precision ** 2
            elif weight > NEGLIGIBLE_WEIGHT:
                return math.inf  # g leans on a direction the localisation does not hold
            else:  # a Ritz value g barely touches: at most the flat-direction pull
                total += weight * nbeta ** 2 / localization
        return total * self.norm_sq

    def applies(self, setting, nbeta: float, localization: float) -> bool:
        """Whether ``gradient_correction=setting`` corrects at this nβ and γ."""
        if setting == "auto":
            return self.significant and self.pull(nbeta, localization) > PULL_THRESHOLD
        return bool(setting)

    def summary(self, nbeta: float, localization: float) -> dict:
        """What the decision rests on, for ``config``."""
        return {"gradient_norm": self.norm_sq ** 0.5,
                "gradient_noise_ratio": self.ratio,
                "gradient_noise_threshold": self.threshold,
                "gradient_significant": self.significant,
                "gradient_pull": (self.pull(nbeta, localization)
                                  if self.significant and self.ritz_values else None),
                "gradient_pull_threshold": PULL_THRESHOLD}


def measure_gradient(model, w_star: Tensor, source, mask: Tensor | None, *, seed: int = 0,
                     groups: int = NOISE_GROUPS, curvature: bool = True) -> GradientEvidence:
    """g = ∇L_n(w*) and its noise from ``groups`` random groups of examples, in one pass
    (each chunk of the data is shuffled with a private generator and cut into groups of
    about n/groups examples); then, if g is significant and ``curvature`` is asked for
    (a decision is still to be taken), its curvature by Lanczos."""
    generator = torch.Generator().manual_seed(seed)
    group_size = max(1, math.ceil(source.n / groups))
    total = torch.zeros(model.dim, dtype=torch.float64, device=model.device)
    sum_sq_over_count = 0.0  # Σ_k ‖s_k‖²/c_k over groups k (s_k: the group's gradient sum)
    num_groups = 0
    for xb, yb in source.chunks():
        order = torch.randperm(len(yb), generator=generator)
        for start in range(0, len(yb), group_size):
            index = order[start:start + group_size]
            xg, yg = model.inputs(take(xb, index)), yb[index].to(model.device)
            group_sum = model.full_gradient(w_star, xg, yg) * len(index)
            if mask is not None:
                group_sum = group_sum * mask.double()
            total += group_sum
            sum_sq_over_count += float(group_sum @ group_sum) / len(index)
            num_groups += 1
    n = source.n
    gradient = total / n
    norm_sq = float(gradient @ gradient)
    between = max(sum_sq_over_count - n * norm_sq, 0.0)  # Σ_k c_k ‖g_k − g‖²
    noise = between / (num_groups - 1) / n if num_groups >= 2 else 0.0
    evidence = GradientEvidence(gradient=gradient, norm_sq=norm_sq, noise_norm_sq=noise,
                                groups=num_groups)
    if not (curvature and evidence.significant):
        return evidence
    values, weights = _lanczos_along(model, w_star, source, gradient, mask)
    return replace(evidence, ritz_values=values, ritz_weights=weights)


def _hvp(model, w_star: Tensor, source, vector: Tensor, mask: Tensor | None) -> Tensor:
    out = model.mean_hessian_product(w_star, vector.unsqueeze(1), source).squeeze(1)
    return out if mask is None else out * mask.double()


def _lanczos_along(model, w_star: Tensor, source, start: Tensor, mask: Tensor | None,
                   steps: int = LANCZOS_STEPS) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Ritz values and their weights (squared first components) of k Lanczos steps on the
    Hessian of L_n at w*, started at ``start``, with full reorthogonalisation."""
    basis = [start / start.norm()]
    alphas, betas = [], []
    for _ in range(min(steps, model.dim)):
        z = _hvp(model, w_star, source, basis[-1], mask)
        alpha = float(basis[-1] @ z)
        alphas.append(alpha)
        for q in basis:  # full reorthogonalisation (twice is enough)
            z -= (q @ z) * q
        for q in basis:
            z -= (q @ z) * q
        beta = float(z.norm())
        if beta <= 1e-10 * max(abs(alpha), 1e-30):
            break
        betas.append(beta)
        basis.append(z / beta)
    k = len(alphas)
    tridiagonal = np.diag(alphas) + np.diag(betas[:k - 1], 1) + np.diag(betas[:k - 1], -1)
    values, vectors = np.linalg.eigh(tridiagonal)
    return tuple(float(v) for v in values), tuple(float(v) for v in vectors[0] ** 2)
