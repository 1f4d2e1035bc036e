"""Exact learning coefficients of solvable models, in ``fractions.Fraction`` arithmetic.

Reduced-rank regression: Aoyagi & Watanabe (2005). Deep linear networks: Aoyagi (2024).
Polynomial potentials: normal-crossing monomials.
"""
from __future__ import annotations

from fractions import Fraction
from math import ceil


def rrr_lambda(M: int, H: int, N: int, r: int) -> Fraction:
    """λ of y = B·A·x with A: H×M, B: N×H at a true product of rank r."""
    _check_dims([M, H, N], r)
    if N + r <= M + H and M + r <= N + H and H + r <= M + N:
        value = Fraction(2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2, 8)
        if (M + H + N + r) % 2 == 1:
            value += Fraction(1, 8)
        return value
    if M + H < N + r:
        return Fraction(H * M - H * r + N * r, 2)
    if N + H < M + r:
        return Fraction(H * N - H * r + M * r, 2)
    return Fraction(M * N, 2)


def deep_linear_lambda(widths: list[int], r: int) -> tuple[Fraction, int]:
    """(λ, multiplicity) of a linear network with widths H_0 (input) … H_L (output), L ≥ 2."""
    if len(widths) < 3:
        raise ValueError("a deep linear network needs at least two weight matrices (3 widths)")
    _check_dims(widths, r)
    L = len(widths) - 1
    reduced = sorted(h - r for h in widths)
    for k in range(2, L + 2):
        chosen, rest = reduced[:k], reduced[k:]
        ell = k - 1
        total = sum(chosen)
        if rest and not max(chosen) < min(rest):
            continue
        if total < ell * max(chosen):
            continue
        if rest and not total < ell * min(rest):
            continue
        break
    else:  # the k = L+1 case always qualifies, so this is unreachable for valid input
        raise AssertionError("no admissible subset found")
    c = ceil(Fraction(total, ell))
    a = total - (c - 1) * ell
    pair_sum = sum(chosen[i] * chosen[j] for i in range(len(chosen))
                   for j in range(i + 1, len(chosen)))
    value = (Fraction(r * (widths[0] + widths[-1]) - r * r, 2)
             + Fraction(a * (ell - a), 4 * ell)
             - Fraction(ell * (ell - 1), 4) * Fraction(total, ell) ** 2
             + Fraction(pair_sum, 2))
    return value, a * (ell - a) + 1


def monomial_lambda(a: int, b: int) -> Fraction:
    """λ of f(x) = x·w1^a·w2^b fitted to pure noise (true function 0)."""
    if a < 1 or b < 1:
        raise ValueError(f"exponents must be >= 1, got a={a}, b={b}")
    return Fraction(1, 2 * max(a, b))


def regular_lambda(num_params: int) -> Fraction:
    return Fraction(num_params, 2)


def _check_dims(widths, r) -> None:
    if any(h < 1 for h in widths):
        raise ValueError(f"all widths must be >= 1, got {widths}")
    if not 0 <= r <= min(widths):
        raise ValueError(f"rank r must be between 0 and min(widths)={min(widths)}, got {r}")
