"""The curvature baseline beside λ̂: what a perfectly quadratic loss would report.

If L_n(w) = L_n(w*) + ½ΔᵀHΔ near w* (Δ = w − w*), the localised tempered posterior
exp(−nβL_n(w) − γ/2‖Δ‖²) is Gaussian with precision nβH + γ, and the estimator's
expectation is exactly

    λ_quad(nβ, γ) = nβ·E[L_n(w) − L_n(w*)] = ½ Σᵢ nβhᵢ / (nβhᵢ + γ)

over H's eigenvalues hᵢ: a direction counts ½ when nβhᵢ ≫ γ and nβhᵢ/(2γ) when it is
flatter than the resolution γ/nβ. This is Maddox, Benton & Wilson's effective
dimensionality Σ h/(h + z) at z = γ/nβ, halved. For a regular model at a minimum it is
E[λ̂] itself, so the difference λ̂ − λ_quad on a network measures what is not quadratic
about its loss: that gap, not λ̂ alone, is what singular learning theory adds.

Hessian, not a Gauss–Newton approximation: the sampler explores the loss itself, whose
second-order expansion at w* has the Hessian, negative directions included. A
Gauss–Newton matrix is positive semi-definite everywhere but differs from the Hessian by
the residual term, which is not small away from a minimum (at initialisation), so a gap
measured against it would mix two things. Where nβh + γ ≤ 0 for some direction the
quadratic's posterior is improper: the baseline says so (``bounded=False``, value NaN)
instead of substituting another matrix.

Two ways to compute the trace of f(H) = nβH(nβH + γ)⁻¹, both from Hessian-matrix products
over all the data (the Hessian of the mean loss L_n; a product costs about two gradient
passes):

- ``"eigendecomposition"``: the Hessian restricted to the sampled coordinates as a dense
  matrix (d products, batched over columns), its eigenvalues by LAPACK. Exact; for
  d ≤ ``MAX_DENSE`` by default. The eigenvalues are kept, so the baseline at any other
  (nβ, γ) costs nothing (``QuadraticLLC.at``).
- ``"hutchinson"``: Hutchinson's estimator tr f(H) ≈ mean of zᵀf(H)z over Rademacher
  probes z, with f(H)z = z − γ(nβH + γ)⁻¹z by SciPy's conjugate gradients. f(H) has
  eigenvalues in [0, 1) and is near 0 along the flat directions that dominate a
  network, so the probes' variance (2‖f(H)‖²_F) scales with the number of stiff
  directions, not with d. The standard error is reported. Whether the quadratic is
  bounded is settled by SciPy's Lanczos (ARPACK): the largest-magnitude eigenvalue
  first (nβ·‖H‖ < γ proves it), the smallest only where that does not.

Not here: the estimate itself (``api``), the gradient's pull at a non-critical w*
(``gradient_evidence``: it adds to the plain estimate's expectation, not to curvature).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, cg, eigsh
from torch import Tensor, nn
from tqdm.auto import tqdm

from .core.batched_model import BatchedModel
from .core.checks import check_positive
from .core.data import as_source
from .core.losses import resolve_loss
from .core.settings import default_nbeta

MAX_DENSE = 3_000  # sampled coordinates up to which "auto" builds the dense Hessian
METHODS = ("auto", "eigendecomposition", "hutchinson")
_COLUMN_BLOCK = 64  # Hessian columns per batched product


@dataclass(frozen=True)
class QuadraticLLC:
    """λ_quad = ½ Σ nβh/(nβh + γ) at w*, and how it was computed."""

    value: float  # NaN where the quadratic is unbounded (nβ·h_min + γ ≤ 0)
    standard_error: float  # 0 for the eigendecomposition
    nbeta: float
    localization: float
    method: str
    num_params: int  # the coordinates the Hessian is taken over
    # None where nβ·‖H‖ < γ proved the quadratic bounded without it (Hutchinson only)
    min_eigenvalue: float | None
    bounded: bool
    num_negative: int | None  # eigenvalues below 0 (eigendecomposition only)
    hessian_products: int
    seconds: float
    num_probes: int | None = None
    eigenvalues: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def effective_params(self) -> float:
        return 2 * self.value

    def at(self, nbeta: float, localization: float) -> float:
        """The baseline at other (nβ, γ) from the kept eigenvalues (eigendecomposition
        only); NaN where that quadratic is unbounded."""
        if self.eigenvalues is None:
            raise ValueError("the baseline at other settings needs the eigenvalues; compute it "
                             "with method='eigendecomposition'")
        return _from_eigenvalues(self.eigenvalues, nbeta, localization)

    def to_dict(self) -> dict:
        return {"quadratic_llc": self.value, "quadratic_llc_sem": self.standard_error,
                "quadratic_nbeta": self.nbeta, "quadratic_localization": self.localization,
                "quadratic_method": self.method, "quadratic_num_params": self.num_params,
                "quadratic_min_eigenvalue": self.min_eigenvalue,
                "quadratic_bounded": self.bounded, "quadratic_num_negative": self.num_negative,
                "quadratic_hessian_products": self.hessian_products,
                "quadratic_num_probes": self.num_probes, "quadratic_seconds": self.seconds}


def _from_eigenvalues(eigenvalues: np.ndarray, nbeta: float, localization: float) -> float:
    precision = nbeta * eigenvalues + localization
    if precision.min() <= 0:
        return math.nan
    return float(0.5 * (nbeta * eigenvalues / precision).sum())


def quadratic_llc(model: nn.Module, data, *, localization: float, nbeta: float | None = None,
                  loss_fn="cross_entropy", output=None, restrict_to=None,
                  method: str = "auto", num_probes: int = 32, tolerance: float = 1e-6,
                  seed: int = 0, verbose: bool = True) -> QuadraticLLC:
    """The λ̂ a perfectly quadratic loss would give at ``model``'s weights w*, at the same
    nβ and γ as an estimate: ½ Σᵢ nβhᵢ/(nβhᵢ + γ) over the eigenvalues of the Hessian of
    L_n at w* (restricted to ``restrict_to``'s coordinates, as in ``estimate_llc``).

    Args:
        model, data, loss_fn, output, restrict_to: as for ``estimate_llc``.
        localization: γ.
        nbeta: nβ (default n/log n, as ``estimate_llc``).
        method: ``"eigendecomposition"`` (exact), ``"hutchinson"`` (stochastic, with
            conjugate-gradient solves) or ``"auto"`` (the first up to ``MAX_DENSE``
            sampled coordinates).
        num_probes: Hutchinson's probe vectors.
        tolerance: relative residual of each conjugate-gradient solve.
        seed: the probes' seed (a private generator; the global RNG is untouched).
        verbose: a progress bar over the Hessian products.

    Returns:
        A ``QuadraticLLC``: the value (NaN where nβ·h_min + γ ≤ 0), its standard error, the
        smallest eigenvalue and how it was computed.

    Examples:
        >>> import torch, slt_probe
        >>> x = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0))
        >>> net = torch.nn.Linear(3, 1, bias=False)
        >>> q = slt_probe.quadratic_llc(net, (x, x.sum(1, keepdim=True)), loss_fn="gaussian_nll",
        ...                             localization=1e-6, verbose=False)
        >>> round(q.value, 3)   # three stiff directions: ½ each
        1.5
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_positive("localization (γ)", localization)
    if nbeta is not None:
        check_positive("nbeta", nbeta)
    if num_probes < 2:
        raise ValueError(f"num_probes must be at least 2, got {num_probes}")
    started = time.perf_counter()
    source = as_source(data)
    batched = BatchedModel(model, resolve_loss(loss_fn), output=output)
    if source.in_memory:
        source = source.to(batched.device)
    w_star = batched.flatten(model)
    mask = batched.layout.mask(restrict_to)
    index = (torch.arange(batched.dim, device=batched.device) if mask is None
             else mask.bool().nonzero().squeeze(1))
    nbeta = float(default_nbeta(source.n) if nbeta is None else nbeta)
    hessian = _RestrictedHessian(batched, w_star, source, index)
    if method == "auto":
        method = "eigendecomposition" if len(index) <= MAX_DENSE else "hutchinson"
    if method == "eigendecomposition":
        eigenvalues = _dense_eigenvalues(hessian, verbose)
        value = _from_eigenvalues(eigenvalues, nbeta, localization)
        return QuadraticLLC(
            value=value, standard_error=0.0, nbeta=nbeta, localization=float(localization),
            method=method, num_params=len(index), min_eigenvalue=float(eigenvalues.min()),
            bounded=math.isfinite(value), num_negative=int((eigenvalues < 0).sum()),
            hessian_products=hessian.products, seconds=time.perf_counter() - started,
            eigenvalues=eigenvalues)
    smallest = _certified_lower_bound(hessian, nbeta, float(localization))
    bounded = smallest is None or nbeta * smallest + localization > 0
    value, sem = math.nan, math.nan
    if bounded:
        value, sem = _hutchinson(hessian, nbeta, float(localization), num_probes, tolerance,
                                 seed, verbose)
    return QuadraticLLC(
        value=value, standard_error=sem, nbeta=nbeta, localization=float(localization),
        method=method, num_params=len(index), min_eigenvalue=smallest, bounded=bounded,
        num_negative=None, hessian_products=hessian.products,
        seconds=time.perf_counter() - started, num_probes=num_probes)


class _RestrictedHessian:
    """Products with the Hessian of L_n at w*, restricted to coordinates ``index``."""

    def __init__(self, model: BatchedModel, w_star: Tensor, source, index: Tensor):
        self.model, self.w_star, self.source, self.index = model, w_star, source, index
        self.dim = len(index)
        self.products = 0

    def __call__(self, block: Tensor) -> Tensor:
        """H·V for V (dim, k), float64."""
        full = torch.zeros(self.model.dim, block.shape[1], dtype=torch.float64,
                           device=self.model.device)
        full[self.index] = block.to(full)
        self.products += block.shape[1]
        return self.model.mean_hessian_product(self.w_star, full, self.source)[self.index]

    def scipy_operator(self, scale: float = 1.0, shift: float = 0.0) -> LinearOperator:
        """scale·H + shift as a SciPy operator on float64 vectors."""
        def matvec(v: np.ndarray) -> np.ndarray:
            column = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(-1, 1))
            product = self(column).cpu().numpy().ravel()
            return scale * product + shift * np.asarray(v).ravel()

        return LinearOperator((self.dim, self.dim), matvec=matvec, dtype=np.float64)


def _dense_eigenvalues(hessian: _RestrictedHessian, verbose: bool) -> np.ndarray:
    identity = torch.eye(hessian.dim, dtype=torch.float64)
    columns = []
    for start in tqdm(range(0, hessian.dim, _COLUMN_BLOCK), desc="Hessian", disable=not verbose,
                      leave=False):
        columns.append(hessian(identity[:, start:start + _COLUMN_BLOCK]).cpu())
    matrix = torch.cat(columns, dim=1)
    return torch.linalg.eigvalsh(0.5 * (matrix + matrix.T)).numpy()


def _certified_lower_bound(hessian: _RestrictedHessian, nbeta: float,
                           localization: float) -> float | None:
    """The smallest eigenvalue where it matters, None where nβ·‖H‖ < γ already proves
    nβH + γ positive definite (the largest-magnitude eigenvalue converges in a few dozen
    products; the smallest one, inside a dense bulk near 0, takes hundreds)."""
    try:
        (largest,) = eigsh(hessian.scipy_operator(), k=1, which="LM", tol=1e-2, maxiter=300,
                           return_eigenvectors=False)
        if nbeta * 1.05 * abs(float(largest)) < localization:
            return None
    except ArpackNoConvergence:
        pass
    return _smallest_eigenvalue(hessian)


def _smallest_eigenvalue(hessian: _RestrictedHessian) -> float:
    operator = hessian.scipy_operator()
    try:
        values = eigsh(operator, k=1, which="SA", tol=1e-2, maxiter=300,
                       return_eigenvectors=False)
    except ArpackNoConvergence as error:
        values = error.eigenvalues
        if len(values) == 0:
            raise RuntimeError("could not find the Hessian's smallest eigenvalue (ARPACK did "
                               "not converge in 300 iterations); use "
                               "method='eigendecomposition' if the model is small") from error
    return float(np.min(values))


def _hutchinson(hessian: _RestrictedHessian, nbeta: float, localization: float,
                num_probes: int, tolerance: float, seed: int, verbose: bool) -> tuple[float, float]:
    precision = hessian.scipy_operator(scale=nbeta, shift=localization)
    generator = np.random.default_rng(seed)
    quadratic_forms = []
    for _ in tqdm(range(num_probes), desc="Hutchinson", disable=not verbose, leave=False):
        probe = generator.choice([-1.0, 1.0], size=hessian.dim)
        solution, info = cg(precision, probe, rtol=tolerance, maxiter=10 * hessian.dim)
        if info != 0:
            raise RuntimeError(f"conjugate gradients did not converge ({info} iterations) "
                               f"solving (nβH + γ)u = z at nβ = {nbeta:.4g}, γ = "
                               f"{localization:.4g}; raise γ or use "
                               "method='eigendecomposition'")
        quadratic_forms.append(float(probe @ (probe - localization * solution)))
    forms = np.asarray(quadratic_forms)
    return 0.5 * float(forms.mean()), 0.5 * float(forms.std(ddof=1) / math.sqrt(len(forms)))
