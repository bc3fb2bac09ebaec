"""Exact split of a batch's measured compute over its entries (``tenancy.costs``)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polyray.tenancy.costs import padded_tokens, split_batch_compute, split_exact

TOTALS = st.integers(min_value=0, max_value=10**13)  # up to ~3 hours of compute in ns
WEIGHTS = st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=80)


@given(total=TOTALS, weights=WEIGHTS)
def test_shares_sum_exactly_and_are_non_negative_ints(total: int, weights: list[int]) -> None:
    shares = split_exact(total, weights)
    assert len(shares) == len(weights)
    assert all(isinstance(s, int) and s >= 0 for s in shares)
    assert sum(shares) == total


@given(total=TOTALS, weights=WEIGHTS)
def test_each_share_is_within_one_ns_of_its_exact_proportion(total: int, weights: list[int]) -> None:
    shares = split_exact(total, weights)
    effective = weights if sum(weights) else [1] * len(weights)
    weight_sum = sum(effective)
    for share, weight in zip(shares, effective, strict=True):
        exact = Fraction(total * weight, weight_sum)
        assert abs(share - exact) < 1, (share, exact)
        # Largest remainder rounds each share to the floor or the ceiling of its exact value.
        assert share in (exact.numerator // exact.denominator, -(-exact.numerator // exact.denominator))


@given(total=TOTALS, weights=WEIGHTS)
def test_deterministic(total: int, weights: list[int]) -> None:
    assert split_exact(total, weights) == split_exact(total, list(weights))


@given(total=TOTALS, weights=WEIGHTS)
def test_zero_weight_gets_nothing_unless_all_are_zero(total: int, weights: list[int]) -> None:
    shares = split_exact(total, weights)
    if sum(weights):
        assert all(s == 0 for s, w in zip(shares, weights, strict=True) if w == 0)


@given(total=TOTALS, weights=WEIGHTS)
def test_larger_weight_never_gets_less(total: int, weights: list[int]) -> None:
    shares = split_exact(total, weights)
    for i in range(len(weights)):
        for j in range(len(weights)):
            if weights[i] > weights[j]:
                assert shares[i] >= shares[j]


def test_leftover_goes_to_largest_remainders_then_earlier_entries() -> None:
    assert split_exact(10, [1, 1, 1]) == [4, 3, 3]
    assert split_exact(11, [1, 1, 1]) == [4, 4, 3]
    assert split_exact(7, [1, 2]) == [2, 5]  # 7/3 = 2.33, 14/3 = 4.67: the larger remainder gets the ns
    assert split_exact(1, [5, 5, 5, 5]) == [1, 0, 0, 0]
    assert split_exact(0, [3, 4]) == [0, 0]


def test_all_zero_weights_split_equally() -> None:
    assert split_exact(9, [0, 0, 0]) == [3, 3, 3]
    assert split_exact(10, [0, 0, 0]) == [4, 3, 3]


def test_empty() -> None:
    assert split_exact(0, []) == []
    with pytest.raises(ValueError, match="no entries"):
        split_exact(5, [])


def test_errors() -> None:
    with pytest.raises(ValueError, match="total_ns"):
        split_exact(-1, [1])
    with pytest.raises(ValueError, match="weights"):
        split_exact(10, [1, -1])


def test_huge_totals_stay_exact() -> None:
    total = 2**62 + 12345
    shares = split_exact(total, [3, 7, 11])
    assert sum(shares) == total
    assert shares[0] == total * 3 // 21 or shares[0] == total * 3 // 21 + 1


# -- one batch ---------------------------------------------------------------------------------


def test_padded_backend_charges_every_row_the_longest_length() -> None:
    assert padded_tokens([3, 10, 5], padding_free=False) == [10, 10, 10]
    # Padding is paid by every row alike: equal shares, whatever the own length.
    assert split_batch_compute(3_000_001, [3, 10, 5], padding_free=False) == [1_000_001, 1_000_000, 1_000_000]


def test_packed_backend_charges_own_length() -> None:
    assert padded_tokens([3, 10, 5], padding_free=True) == [3, 10, 5]
    assert split_batch_compute(1800, [3, 10, 5], padding_free=True) == [300, 1000, 500]


def test_empty_batch() -> None:
    assert padded_tokens([], padding_free=False) == []
    assert split_batch_compute(0, [], padding_free=False) == []


@given(
    total=TOTALS,
    lengths=st.lists(st.integers(min_value=1, max_value=512), min_size=1, max_size=64),
    padding_free=st.booleans(),
)
def test_batch_split_sums_to_measured_compute(total: int, lengths: list[int], padding_free: bool) -> None:
    shares = split_batch_compute(total, lengths, padding_free)
    assert sum(shares) == total
    if not padding_free:
        assert max(shares) - min(shares) <= 1
    else:
        longer_first = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        assert [shares[i] for i in longer_first] == sorted(shares, reverse=True)
