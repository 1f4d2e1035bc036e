"""Solvable problems with a known true λ: a model at its true parameter, data, and λ.

Used by the accuracy tests, the benchmarks, ``slt-probe estimate`` and ``slt-probe
validate``. Each problem uses the Gaussian negative log-likelihood (``"gaussian_nll"``),
under which λ is stated.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor, nn

from ..core.losses import resolve_loss
from .formulas import deep_linear_lambda, monomial_lambda, regular_lambda


@dataclass
class KnownProblem:
    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    true_lambda: Fraction
    loss_fn: str = "gaussian_nll"
    # λ = d/2 with a non-degenerate Hessian at w*: the Laplace (Gaussian) posterior gives
    # E[λ̂] from the Hessian's eigenvalues
    regular: bool = False

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def settle(self, max_iter: int = 500) -> "KnownProblem":
        """Move the model from the true parameter to the nearby minimum of L_n (in place).

        λ̂ is defined at a local minimum w* of the empirical loss; at the true parameter,
        L_n(w0) − L_n(ŵ) ≈ χ²_d/2n would bias λ̂ down by about d/(2 log n).
        """
        loss = resolve_loss(self.loss_fn).batch
        optimizer = torch.optim.LBFGS(self.model.parameters(), lr=1.0, max_iter=max_iter,
                                      tolerance_grad=1e-10, tolerance_change=1e-14,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            value = loss(self.model(self.x), self.y)
            value.backward()
            return value

        optimizer.step(closure)
        optimizer.zero_grad(set_to_none=True)
        return self

    def loss(self) -> float:
        """L_n at the current weights."""
        with torch.no_grad():
            return float(resolve_loss(self.loss_fn).batch(self.model(self.x), self.y))

    def teacher_pull(self, nbeta: float, settled: "KnownProblem | None" = None) -> float:
        """nβ·(L_n(w*) − L_n(w_s)), w_s the nearby settled minimum (``settled``, or a copy
        of this problem settled here).

        λ̂ subtracts L_n at its own point, while the localised posterior around the teacher
        and around w_s is the same distribution (the two points are O(n^-1/2) apart, the
        posterior O((nβ)^-1/2) wide). So λ̂ at the teacher reads this much below λ̂ at
        w_s, for any sampler: the part of the miss at a teacher that the data, not the
        sampler, decide. For the linear model it is the pull term of ``expected_llc``
        as γ → 0.
        """
        settled = settled or copy.deepcopy(self).settle()
        return nbeta * (self.loss() - settled.loss())

    def expected_llc(self, *, nbeta: float, localization: float,
                     corrected: bool = False) -> float | None:
        """E[λ̂] under the exact localised tempered posterior at the current w* (a minimum
        or not, for the linear model), or None.

        This is what a perfect sampler would report at this n, nβ and γ; the asymptotic
        λ is only its large-n limit. ``corrected``: what the gradient-corrected estimator
        would report (the linear model only; on a quadratic the linear term's pull is
        removed exactly). It is computable for the regular model (Gaussian
        posterior) and the two-parameter monomials (quadrature), not for the others.
        """
        if nbeta <= 0 or localization < 0:
            raise ValueError(f"expected_llc needs nbeta > 0 and localization >= 0, got "
                             f"{nbeta}, {localization}")
        if isinstance(self.model, Monomial):
            if localization == 0:
                raise ValueError("expected_llc of a monomial needs localization > 0: without "
                                 "it the posterior along the flat axes is improper")
            x, y = self.x.double(), self.y.double()
            w_star = self.model.w.detach().double().tolist()
            return _monomial_expected_llc(self.model.a, self.model.b, w_star,
                                          sxx=float((x * x).mean()), sxy=float((x * y).mean()),
                                          nbeta=nbeta, localization=localization)
        if isinstance(self.model, nn.Linear) and self.model.bias is None:
            # L_n(w) − L_n(w*) = g·Δ + ½ ΔᵀHΔ per output, H = xᵀx / n, g = ∇L_n(w*): a
            # Gaussian posterior, E[nβ ΔL] = Σ over H's eigenvalues h of
            # ½ nβh/(nβh + γ) − nβ² g̃²(½nβh + γ)/(nβh + γ)² (g̃: g in H's eigenbasis; the
            # second term vanishes at the minimum and is the pull of g elsewhere, e.g. at
            # the teacher)
            x, y = self.x.double(), self.y.double()
            h, basis = torch.linalg.eigh(x.T @ x / len(x))
            w = self.model.weight.detach().double()
            total = 0.0
            for out in range(self.model.out_features):
                g = basis.T @ (x.T @ (x @ w[out] - y[:, out]) / len(x))
                precision = nbeta * h + localization
                pull = (nbeta ** 2 * g ** 2 * (0.5 * nbeta * h + localization)
                        / precision ** 2).sum()
                total += float((0.5 * nbeta * h / precision).sum() - (0 if corrected else pull))
            return total
        if self.regular:
            # to second order the same Gaussian, with the Hessian of L_n at w*
            h = torch.linalg.eigvalsh(self.hessian())
            return float((0.5 * nbeta * h / (nbeta * h + localization)).sum())
        return None

    def hessian(self) -> Tensor:
        """The Hessian of L_n at the current weights (float64, d × d)."""
        loss = resolve_loss(self.loss_fn).batch
        model = copy.deepcopy(self.model).double()
        names = [n for n, _ in model.named_parameters()]
        shapes = [p.shape for _, p in model.named_parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        x, y = self.x.double(), self.y.double()

        def objective(w):
            params, offset = {}, 0
            for name, shape in zip(names, shapes):
                size = math.prod(shape)
                params[name] = w[offset:offset + size].view(shape)
                offset += size
            return loss(torch.func.functional_call(model, params, (x,)), y)

        return torch.autograd.functional.hessian(objective, flat)


class Monomial(nn.Module):
    """f(x) = x · w1^a · w2^b."""

    def __init__(self, a: int, b: int):
        super().__init__()
        self.a, self.b = a, b
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w[0] ** self.a * self.w[1] ** self.b


def _monomial_expected_llc(a: int, b: int, w_star: list[float], *, sxx: float, sxy: float,
                           nbeta: float, localization: float, grid_points: int = 1001) -> float:
    """nβ E[L_n(w) − L_n(w*)] for f = x·w1^a·w2^b under exp(−nβ L_n − γ/2 |w − w*|²).

    With θ = w1^a w2^b, L_n(w) = ½ sxx θ² − sxy θ + const. The grid is sinh-spaced
    around the axes, where the posterior is sharpest; the sum converges geometrically
    (501 and 4001 points agree to 1e-15, and match tests' independent 1-D integral).
    """
    reach = max(abs(w_star[0]), abs(w_star[1])) + 10.0 / math.sqrt(localization)
    finest = 1e-6
    u = np.linspace(-1.0, 1.0, grid_points)
    axis = np.sinh(u * np.arcsinh(reach / finest)) * finest
    weights = np.gradient(axis)
    w1, w2 = np.meshgrid(axis, axis, indexing="ij")
    theta = w1 ** a * w2 ** b
    theta_star = w_star[0] ** a * w_star[1] ** b
    excess = 0.5 * sxx * (theta ** 2 - theta_star ** 2) - sxy * (theta - theta_star)
    log_density = -nbeta * excess - 0.5 * localization * ((w1 - w_star[0]) ** 2
                                                          + (w2 - w_star[1]) ** 2)
    density = np.exp(log_density - log_density.max()) * np.outer(weights, weights)
    return float(nbeta * (density * excess).sum() / density.sum())


def _noise_data(n: int, d_in: int, generator: torch.Generator) -> Tensor:
    return torch.randn(n, d_in, generator=generator)


def monomial(a: int, b: int, n: int = 10_000, seed: int = 0) -> KnownProblem:
    g = torch.Generator().manual_seed(seed)
    x = _noise_data(n, 1, g)
    y = torch.randn(n, 1, generator=g)
    return KnownProblem(f"monomial w1^{a} w2^{b}", Monomial(a, b), x, y, monomial_lambda(a, b))


def deep_linear(widths: list[int], rank: int, n: int = 10_000, seed: int = 0) -> KnownProblem:
    """Bias-free linear network at a true end-to-end map of rank ``rank``.

    With two matrices this is reduced-rank regression (Aoyagi–Watanabe).
    """
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:])]
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            rows, cols = layer.weight.shape
            k = min(rank, rows, cols)
            layer.weight[:k, :k] = torch.eye(k) + 0.5 * torch.randn(k, k, generator=g) / max(k, 1)
    model = nn.Sequential(*layers)
    x = _noise_data(n, widths[0], g)
    with torch.no_grad():
        y = model(x) + torch.randn(n, widths[-1], generator=g)
    value, _ = deep_linear_lambda(widths, rank)
    kind = "rrr" if len(widths) == 3 else "deep linear"
    return KnownProblem(f"{kind} {'-'.join(map(str, widths))} r={rank}", model, x, y, value)


def regular(d_in: int = 20, d_out: int = 1, n: int = 20_000, seed: int = 0) -> KnownProblem:
    """Linear regression without bias: a regular model, λ = d/2."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(d_out, d_in, generator=g))
    x = _noise_data(n, d_in, g)
    with torch.no_grad():
        y = model(x) + torch.randn(n, d_out, generator=g)
    return KnownProblem(f"regular d={d_in * d_out}", model, x, y,
                        regular_lambda(d_in * d_out))


class TanhNetwork(nn.Module):
    """x → W2 · tanh(W1 x + b1) + b2: a one-hidden-layer tanh network."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.hidden = nn.Linear(d_in, hidden)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def tanh_teacher_student(n: int = 50_000, seed: int = 0) -> KnownProblem:
    """A student of the teacher's size at an identifiable tanh teacher (three hidden units
    with distinct, non-zero incoming weights, biases and outgoing weights; inputs from
    N(0, 1.5²), so the units work in their nonlinear range): a regular point, λ = d/2
    (d = 13), with unit Gaussian noise on the teacher's output. Its Hessian's smallest
    eigenvalue is about 0.005, so nβh ≫ γ for γ ≤ 10 at this n."""
    g = torch.Generator().manual_seed(seed)
    model = TanhNetwork(2, 3, 1)
    with torch.no_grad():
        model.hidden.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.7, 0.7]]))
        model.hidden.bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
        model.out.weight.copy_(torch.tensor([[2.0, -2.0, 2.0]]))
        model.out.bias.copy_(torch.tensor([0.0]))
    x = 1.5 * _noise_data(n, 2, g)
    with torch.no_grad():
        y = model(x) + torch.randn(n, 1, generator=g)
    d = sum(p.numel() for p in model.parameters())
    return KnownProblem("tanh teacher-student 2-3-1", model, x, y, regular_lambda(d),
                        regular=True)


@dataclass(frozen=True)
class KnownCase:
    """A named solvable problem with sampler settings that were checked to land within 10 %."""

    key: str
    make: object  # () -> KnownProblem
    lr: float
    num_chains: int
    num_draws: int
    num_burnin: int
    localization: float = 1.0
    batch_size: int = 500


CASES = {case.key: case for case in [
    KnownCase("regular-20", lambda: regular(20, 1, 20_000), 1e-5, 8, 4000, 1000),
    KnownCase("rrr-5-4-5-r0", lambda: deep_linear([5, 4, 5], 0, 50_000), 2e-5, 8, 6000, 2000),
    KnownCase("rrr-3-2-3-r1", lambda: deep_linear([3, 2, 3], 1, 50_000), 5e-6, 32, 4000, 4000),
    KnownCase("rrr-4-3-2-r1", lambda: deep_linear([4, 3, 2], 1, 50_000), 3e-6, 32, 4000, 4000),
    KnownCase("rrr-3-6-3-r1", lambda: deep_linear([3, 6, 3], 1, 50_000), 7e-6, 8, 4000, 2000),
    KnownCase("monomial-1-2", lambda: monomial(1, 2, 20_000), 5e-4, 32, 4000, 4000),
    KnownCase("monomial-1-3", lambda: monomial(1, 3, 20_000), 1e-3, 32, 4000, 4000),
]}
