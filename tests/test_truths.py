from fractions import Fraction

import pytest

from slt_probe.ground_truth.formulas import (
    deep_linear_lambda,
    monomial_lambda,
    rrr_lambda,
)


def test_documented_examples():
    assert rrr_lambda(5, 4, 5, 0) == 8
    assert deep_linear_lambda([2, 2, 2, 2], 0)[0] == Fraction(3, 2)
    assert monomial_lambda(1, 3) == Fraction(1, 6)


def test_deep_linear_with_two_matrices_equals_rrr_for_all_small_dims():
    for M in range(1, 7):
        for H in range(1, 7):
            for N in range(1, 7):
                for r in range(min(M, H, N) + 1):
                    assert deep_linear_lambda([M, H, N], r)[0] == rrr_lambda(M, H, N, r), (M, H, N, r)


def test_lambda_never_exceeds_half_the_parameter_count():
    for widths in ([3, 4, 2, 5], [2, 2, 2, 2, 2], [6, 1, 6]):
        d = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        assert deep_linear_lambda(widths, 0)[0] <= Fraction(d, 2)


def test_bad_rank_is_named():
    with pytest.raises(ValueError, match="rank"):
        rrr_lambda(2, 2, 2, 3)
