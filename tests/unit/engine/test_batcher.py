"""Properties and examples of the pure batch former ``form_batch``."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyray.engine.batcher import BatchDecision, Candidate, form_batch, padded_cost
from polyray.policies import BatchPolicy, plan_groups

INF = float("inf")


# -- strategies ------------------------------------------------------------------------------


@st.composite
def candidate_lists(draw: st.DrawFn, max_size: int = 60) -> list[Candidate]:
    lengths = draw(st.lists(st.integers(1, 300), max_size=max_size))
    gaps = draw(
        st.lists(
            st.floats(0.0, 0.01, allow_nan=False, allow_infinity=False), min_size=len(lengths), max_size=len(lengths)
        )
    )
    start = draw(st.floats(0.0, 1000.0, allow_nan=False, allow_infinity=False))
    out, t = [], start
    for n, gap in zip(lengths, gaps, strict=True):
        t += gap
        out.append(Candidate(n, t))
    return out


policies = st.builds(
    BatchPolicy,
    budget_tokens=st.integers(1, 4000),
    max_batch_size=st.integers(1, 80),
    window=st.integers(1, 80),
    max_wait_ms=st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False),
    overhead_tokens=st.integers(0, 200),
)


def now_near(cands: list[Candidate]) -> st.SearchStrategy[float]:
    """Clock readings around the oldest entry's arrival, so ready and not ready both occur."""
    base = cands[0].enqueued_s if cands else 0.0
    return st.one_of(
        st.floats(base - 0.02, base + 0.02, allow_nan=False, allow_infinity=False),
        st.just(base),
        st.just(INF),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Candidate], BatchPolicy, float]:
    cands = draw(candidate_lists())
    policy = draw(policies)
    now_s = draw(now_near(cands))
    return cands, policy, now_s


def selected_lengths(cands: list[Candidate], decision: BatchDecision) -> list[int]:
    return [cands[i].num_tokens for i in decision.indices]


# -- properties ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_indices_unique_sorted_in_window(scenario: tuple[list[Candidate], BatchPolicy, float]) -> None:
    cands, policy, now_s = scenario
    decision = form_batch(cands, policy, now_s)
    idx = decision.indices
    assert list(idx) == sorted(set(idx))
    window = min(len(cands), policy.window)
    assert all(0 <= i < window for i in idx)
    if cands:
        assert len(idx) >= 1
    else:
        assert idx == ()


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_oldest_always_selected(scenario: tuple[list[Candidate], BatchPolicy, float]) -> None:
    cands, policy, now_s = scenario
    decision = form_batch(cands, policy, now_s)
    if cands:
        assert decision.indices[0] == 0


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_padded_cost_within_budget_unless_alone(scenario: tuple[list[Candidate], BatchPolicy, float]) -> None:
    cands, policy, now_s = scenario
    decision = form_batch(cands, policy, now_s)
    lengths = selected_lengths(cands, decision)
    assert decision.cost_tokens == padded_cost(lengths)
    if len(lengths) > 1:
        assert padded_cost(lengths) <= policy.budget_tokens


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_count_within_max_batch_size(scenario: tuple[list[Candidate], BatchPolicy, float]) -> None:
    cands, policy, now_s = scenario
    decision = form_batch(cands, policy, now_s)
    assert len(decision.indices) <= policy.max_batch_size


@settings(max_examples=200, deadline=None)
@given(candidate_lists(), policies)
def test_repeated_batches_drain_every_candidate_exactly_once(cands: list[Candidate], policy: BatchPolicy) -> None:
    remaining = list(enumerate(cands))  # (original position, candidate), oldest first
    seen: Counter[int] = Counter()
    steps = 0
    while remaining:
        decision = form_batch([c for _, c in remaining], policy, INF)
        assert decision.ready
        assert decision.indices, "a non-empty queue must always yield a batch"
        # The oldest remaining entry leaves in every batch: no entry waits for ever.
        assert decision.indices[0] == 0
        chosen = set(decision.indices)
        seen.update(pos for k, (pos, _) in enumerate(remaining) if k in chosen)
        remaining = [item for k, item in enumerate(remaining) if k not in chosen]
        steps += 1
        assert steps <= len(cands)
    assert seen == Counter(range(len(cands)))
    assert all(v == 1 for v in seen.values())
    assert form_batch([], policy, INF).indices == ()


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_ready_and_full(scenario: tuple[list[Candidate], BatchPolicy, float]) -> None:
    cands, policy, now_s = scenario
    decision = form_batch(cands, policy, now_s)
    if not cands:
        assert not decision.ready and not decision.full
        assert decision.ready_at_s == INF
        return
    ready_at_s = cands[0].enqueued_s + policy.max_wait_ms / 1000.0
    assert decision.ready_at_s == ready_at_s
    assert decision.ready == (decision.full or now_s >= ready_at_s)

    count = len(decision.indices)
    longest = max(selected_lengths(cands, decision))
    window = min(len(cands), policy.window)
    chosen = set(decision.indices)
    unselected = [cands[i].num_tokens for i in range(window) if i not in chosen]
    size_reached = count >= policy.max_batch_size
    # The cheapest entry of the window to add next, or None when the window is exhausted.
    cheapest = min((max(longest, n) * (count + 1) for n in unselected), default=None)
    overflows = cheapest is not None and cheapest > policy.budget_tokens
    beyond_window = len(cands) > window
    # Full: the size is reached, or the cheapest possible addition overflows the budget, or the
    # window is exhausted while more entries wait beyond it.
    assert decision.full == (size_reached or (overflows if cheapest is not None else beyond_window))
    if not decision.full:
        assert count < policy.max_batch_size


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_selection_is_a_contiguous_run_by_length(scenario: tuple[list[Candidate], BatchPolicy, float]) -> None:
    cands, policy, now_s = scenario
    decision = form_batch(cands, policy, now_s)
    if not cands:
        return
    window = min(len(cands), policy.window)
    chosen = set(decision.indices)
    lengths = selected_lengths(cands, decision)
    lo, hi = min(lengths), max(lengths)
    skipped = [i for i in range(window) if i not in chosen and lo < cands[i].num_tokens < hi]
    assert not skipped, f"batch {lengths} skipped window entries {skipped} whose lengths lie inside it"
    # Stronger: contiguous in (length, arrival) order, so ties go to the older entries.
    order = sorted(range(window), key=lambda i: (cands[i].num_tokens, i))
    positions = sorted(order.index(i) for i in chosen)
    assert positions == list(range(positions[0], positions[0] + len(positions)))


def brute_force_plan_cost(lengths: list[int], policy: BatchPolicy) -> int:
    """Least total cost over every cut of ascending ``lengths`` into allowed contiguous groups."""
    n = len(lengths)
    best = math.inf
    for mask in range(1 << max(0, n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        total = 0
        for a, b in itertools.pairwise(cuts):
            group = lengths[a:b]
            if len(group) > 1 and (len(group) > policy.max_batch_size or padded_cost(group) > policy.budget_tokens):
                break
            total += policy.overhead_tokens + padded_cost(group)
        else:
            best = min(best, total)
    return int(best)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=9), policies)
def test_plan_groups_is_a_valid_least_cost_cut(lengths: list[int], policy: BatchPolicy) -> None:
    lengths = sorted(lengths)
    groups = plan_groups(lengths, policy)
    # The groups cut [0, n) into contiguous, non-empty, allowed pieces.
    assert [a for a, _ in groups] == [0] + [b for _, b in groups[:-1]]
    assert groups[-1][1] == len(lengths)
    total = 0
    for a, b in groups:
        group = lengths[a:b]
        assert group
        if len(group) > 1:
            assert len(group) <= policy.max_batch_size
            assert padded_cost(group) <= policy.budget_tokens
        total += policy.overhead_tokens + padded_cost(group)
    assert total == brute_force_plan_cost(lengths, policy)


# -- examples --------------------------------------------------------------------------------


def test_empty_candidates_not_ready() -> None:
    decision = form_batch([], BatchPolicy(), now_s=123.0)
    assert decision == BatchDecision((), ready=False, full=False, ready_at_s=INF, cost_tokens=0)


def test_single_over_budget_entry_runs_alone() -> None:
    policy = BatchPolicy(budget_tokens=100, max_batch_size=8, max_wait_ms=5.0)
    cands = [Candidate(500, 0.0), Candidate(10, 0.0), Candidate(10, 0.0)]
    decision = form_batch(cands, policy, now_s=0.0)
    assert decision.indices == (0,)
    assert decision.cost_tokens == 500
    assert decision.full and decision.ready
    # The rest then forms its own batch.
    rest = form_batch(cands[1:], policy, now_s=0.0)
    assert rest.indices == (0, 1)
    assert rest.cost_tokens == 20


def test_lone_over_budget_entry_waits_for_max_wait() -> None:
    policy = BatchPolicy(budget_tokens=100, max_wait_ms=5.0)
    only = [Candidate(500, 10.0)]
    decision = form_batch(only, policy, now_s=10.0)
    assert decision.indices == (0,)
    assert decision.cost_tokens == 500
    assert not decision.ready and not decision.full
    assert math.isclose(decision.ready_at_s, 10.005)
    assert form_batch(only, policy, now_s=decision.ready_at_s).ready


def test_overflowing_entry_waits_for_next_batch() -> None:
    policy = BatchPolicy(budget_tokens=25, max_batch_size=8)
    cands = [Candidate(10, 0.0), Candidate(10, 0.1), Candidate(10, 0.2)]
    first = form_batch(cands, policy, now_s=0.0)
    assert first.indices == (0, 1)
    assert first.full and first.ready
    assert first.cost_tokens == 20
    second = form_batch([cands[2]], policy, now_s=0.0)
    assert second.indices == (0,)
    assert not second.full


def test_groups_by_length_around_the_oldest() -> None:
    policy = BatchPolicy(budget_tokens=10_000, max_batch_size=3)
    cands = [Candidate(n, 0.0) for n in (10, 100, 12, 95, 11)]
    decision = form_batch(cands, policy, now_s=0.0)
    assert decision.indices == (0, 2, 4)  # lengths 10, 12, 11
    assert decision.cost_tokens == 36
    assert decision.full


def test_plan_pairs_similar_lengths_rather_than_filling_greedily() -> None:
    # Sorted: 10, 50, 100, 101. Filling the oldest's batch greedily would give {10, 50, 100} + {101}
    # (364 + 165 = 529 with overhead); pairing by length gives {10, 50} + {100, 101} (164 + 266 = 430).
    policy = BatchPolicy(budget_tokens=300, max_batch_size=64, overhead_tokens=64)
    cands = [Candidate(100, 0.0), Candidate(10, 0.0), Candidate(101, 0.0), Candidate(50, 0.0)]
    decision = form_batch(cands, policy, now_s=0.0)
    assert decision.indices == (0, 2)
    assert decision.cost_tokens == 202
    assert decision.full  # adding 50 would cost 101 × 3 = 303 > 300
    assert plan_groups([10, 50, 100, 101], policy) == [(0, 2), (2, 4)]


def test_overhead_makes_one_batch_better_than_two() -> None:
    lengths = [10, 40]
    assert plan_groups(lengths, BatchPolicy(budget_tokens=1000, overhead_tokens=64)) == [(0, 2)]
    assert plan_groups(lengths, BatchPolicy(budget_tokens=1000, overhead_tokens=0)) == [(0, 1), (1, 2)]


def test_ties_resolve_towards_older_entries() -> None:
    policy = BatchPolicy(budget_tokens=10_000, max_batch_size=2)
    cands = [Candidate(5, float(i)) for i in range(4)]
    assert form_batch(cands, policy, now_s=0.0).indices == (0, 1)


def test_window_limits_what_is_considered() -> None:
    policy = BatchPolicy(budget_tokens=10_000, max_batch_size=64, window=2)
    cands = [Candidate(5, 0.0), Candidate(50, 0.0), Candidate(5, 0.0)]
    decision = form_batch(cands, policy, now_s=0.0)
    assert decision.indices == (0, 1)  # the short third entry lies outside the window
    assert decision.full  # more waits beyond the window, so there is no point waiting


def test_not_ready_before_max_wait_then_ready() -> None:
    policy = BatchPolicy(budget_tokens=1000, max_wait_ms=2.0)
    cands = [Candidate(10, 1.0), Candidate(12, 1.0005)]
    early = form_batch(cands, policy, now_s=1.001)
    assert not early.ready and not early.full
    assert early.indices == (0, 1)
    assert math.isclose(early.ready_at_s, 1.002)
    assert form_batch(cands, policy, now_s=early.ready_at_s).ready


def test_size_limit_makes_batch_full() -> None:
    policy = BatchPolicy(budget_tokens=10_000, max_batch_size=2, max_wait_ms=1000.0)
    decision = form_batch([Candidate(3, 0.0)] * 2, policy, now_s=0.0)
    assert decision.indices == (0, 1)
    assert decision.full and decision.ready


@pytest.mark.parametrize(
    "kwargs",
    [{"budget_tokens": 0}, {"max_batch_size": 0}, {"window": 0}, {"max_wait_ms": -1.0}, {"overhead_tokens": -1}],
)
def test_invalid_policy_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(**kwargs)  # type: ignore[arg-type]


def test_plan_groups_of_nothing() -> None:
    assert plan_groups([], BatchPolicy()) == []


def test_padded_cost() -> None:
    assert padded_cost([]) == 0
    assert padded_cost([3, 7, 5]) == 21


def test_partial_batch_is_held_for_expected_arrivals_within_a_bound() -> None:
    policy = BatchPolicy(max_wait_ms=2.0)
    waiting = [Candidate(10, enqueued_s=0.0), Candidate(12, enqueued_s=0.0)]
    # Long past max_wait, but the caller expects 4 entries until t=1.010: hold.
    held = form_batch(waiting, policy, now_s=1.001, hold_until_s=1.010, min_fill=4)
    assert not held.ready and held.ready_at_s == pytest.approx(1.010)
    # The bound passes: go with what is there.
    assert form_batch(waiting, policy, now_s=1.010, hold_until_s=1.010, min_fill=4).ready
    # Enough entries are waiting: no hold.
    assert form_batch(waiting, policy, now_s=1.001, hold_until_s=1.010, min_fill=2).ready
    # A full batch never waits.
    tight = BatchPolicy(max_wait_ms=2.0, budget_tokens=20)
    assert form_batch(waiting, tight, now_s=1.001, hold_until_s=1.010, min_fill=4).ready


@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=40),
    now_s=st.floats(0, 10),
    hold_until_s=st.floats(0, 10),
    min_fill=st.integers(0, 50),
)
def test_hold_never_delays_beyond_its_bound(
    lengths: list[int], now_s: float, hold_until_s: float, min_fill: int
) -> None:
    policy = BatchPolicy(max_wait_ms=2.0)
    candidates = [Candidate(n, enqueued_s=0.0) for n in lengths]
    decision = form_batch(candidates, policy, now_s, hold_until_s, min_fill)
    assert decision.ready_at_s <= max(0.002, hold_until_s)
    if now_s >= max(0.002, hold_until_s):
        assert decision.ready
    assert decision.indices == form_batch(candidates, policy, now_s).indices  # holding never changes the choice
