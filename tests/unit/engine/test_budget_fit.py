"""The batch-budget decision on synthetic curves: no clock, no threads, no model."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyray.engine.budget_fit import (
    DriftState,
    LinearCost,
    choose_budget,
    fit_cost,
    observe_drift,
    rescale,
    should_wait,
)
from polyray.policies import BatchPolicy, CurvePoint, FitPolicy

BUDGETS = (128, 256, 512, 1024, 2048, 4096, 8192)


def synthetic_curve(
    overhead_s: float,
    s_per_token: float,
    budgets: tuple[int, ...] = BUDGETS,
    fill: float = 0.8,
    saturate_tokens: int | None = None,
    num_batches: int = 10,
    tokens_per_sequence: int = 32,
) -> list[CurvePoint]:
    """Batches that fill ``fill`` of each budget (at most ``saturate_tokens``: a full queue window)."""
    points = []
    for budget in budgets:
        tokens = int(budget * fill)
        if saturate_tokens is not None:
            tokens = min(tokens, saturate_tokens)
        batch_s = overhead_s + s_per_token * tokens
        points.append(
            CurvePoint(
                budget_tokens=budget,
                num_batches=num_batches,
                num_sequences=num_batches * max(1, tokens // tokens_per_sequence),
                num_tokens=num_batches * tokens,
                cost_tokens=num_batches * tokens,
                compute_s=num_batches * batch_s,
                p90_batch_ms=1000 * batch_s,
            )
        )
    return points


def test_fit_recovers_the_line() -> None:
    cost = fit_cost(synthetic_curve(0.002, 50e-6))
    assert cost.overhead_s == pytest.approx(0.002, rel=1e-6)
    assert cost.s_per_token == pytest.approx(50e-6, rel=1e-6)
    assert cost.overhead_tokens == 40
    assert cost.predict_s(1000) == pytest.approx(0.052)


def test_negative_intercept_from_noise_is_clamped_to_a_line_through_zero() -> None:
    points = synthetic_curve(0.0, 50e-6)
    points[0] = CurvePoint(128, 10, 30, 1000, 1000, 0.001, 0.1)  # the small budget measured "too fast"
    cost = fit_cost(points)
    assert cost.overhead_s == 0.0 and cost.s_per_token > 0 and cost.overhead_tokens == 0


def test_large_fixed_cost_chooses_the_largest_budget_that_meets_the_target() -> None:
    # 20 ms per call, 50 µs per token: throughput keeps rising with the budget.
    points = synthetic_curve(0.020, 50e-6)
    decision = choose_budget(points, FitPolicy(latency_target_ms=400))
    assert decision.meets_target
    # worst = 10 (capped wait) + 2 × (20 + 0.05 × 0.8 × budget) ms: 2048 → 213.8, 4096 → 377.7 ms
    assert decision.budget_tokens == 4096
    assert decision.max_wait_ms == 10.0  # the wait is capped below the 20 ms call cost
    assert decision.worst_latency_ms <= 400
    assert decision.overhead_tokens == 400


def test_tighter_target_gives_a_smaller_budget() -> None:
    points = synthetic_curve(0.020, 50e-6)
    loose = choose_budget(points, FitPolicy(latency_target_ms=400))
    tight = choose_budget(points, FitPolicy(latency_target_ms=120))
    assert tight.budget_tokens < loose.budget_tokens
    assert tight.worst_latency_ms <= 120 and tight.meets_target


def test_flat_curve_chooses_the_knee_not_the_largest() -> None:
    # Throughput saturates at 1,024 tokens (a full queue window): bigger budgets add only latency.
    points = synthetic_curve(0.001, 50e-6, saturate_tokens=1024)
    decision = choose_budget(points, FitPolicy(latency_target_ms=10_000, tolerance=0.03))
    best = max(p.tokens_per_s for p in points)
    assert decision.expected_tokens_per_s >= 0.97 * best
    assert decision.budget_tokens <= 2048
    smaller = [p for p in points if p.budget_tokens < decision.budget_tokens]
    assert all(p.tokens_per_s < 0.97 * best for p in smaller)


def test_tolerance_zero_takes_the_best_feasible_throughput() -> None:
    points = synthetic_curve(0.020, 50e-6)
    decision = choose_budget(points, FitPolicy(latency_target_ms=10_000, tolerance=0.0))
    assert decision.budget_tokens == 8192  # throughput still rises with the budget on this curve


def test_measured_fixed_cost_replaces_the_intercept() -> None:
    # Small batches run less efficiently: a concave curve whose least-squares intercept overstates
    # the cost of a call. The measured minimal call sets max_wait and overhead_tokens instead.
    points = [
        CurvePoint(b, 10, 10 * n, 10 * n * 30, 10 * n * 30, 10 * (0.0005 + n * 30 * 60e-6 * (1 + 2 / n)), 1)
        for b, n in ((128, 4), (512, 16), (2048, 64))
    ]
    fitted = choose_budget(points, FitPolicy())
    measured = choose_budget(points, FitPolicy(), fixed_cost_s=0.0005)
    assert fitted.cost.overhead_s > 0.003  # the concavity, read as a fixed cost
    assert measured.cost.overhead_s == 0.0005 and measured.max_wait_ms == 0.5
    assert measured.cost.s_per_token == pytest.approx(fit_cost(points, 0.0005).s_per_token)
    assert measured.overhead_tokens < fitted.overhead_tokens


def test_no_feasible_budget_takes_the_least_latency_and_says_so() -> None:
    points = synthetic_curve(0.050, 200e-6)
    decision = choose_budget(points, FitPolicy(latency_target_ms=50))
    assert not decision.meets_target
    assert decision.budget_tokens == 128
    assert "no budget meets" in decision.reason


def test_decision_applies_to_the_batch_policy_and_serializes() -> None:
    decision = choose_budget(synthetic_curve(0.002, 50e-6), FitPolicy(latency_target_ms=100))
    policy = decision.apply(BatchPolicy(max_batch_size=32, window=48))
    assert (policy.budget_tokens, policy.max_wait_ms, policy.overhead_tokens) == (
        decision.budget_tokens,
        decision.max_wait_ms,
        decision.overhead_tokens,
    )
    assert (policy.max_batch_size, policy.window) == (32, 48)
    data = decision.as_dict()
    assert data["budget_tokens"] == decision.budget_tokens
    assert len(data["points"]) == len(BUDGETS) and "tokens_per_s" in data["points"][0]
    assert f"chosen: budget {decision.budget_tokens} tokens" in decision.table()


@settings(max_examples=200, deadline=None)
@given(
    overhead_ms=st.floats(0.0, 30.0),
    us_per_token=st.floats(5.0, 500.0),
    target_ms=st.floats(5.0, 2000.0),
    saturate=st.one_of(st.none(), st.integers(64, 8192)),
    tolerance=st.floats(0.0, 0.2),
)
def test_decision_properties(
    overhead_ms: float, us_per_token: float, target_ms: float, saturate: int | None, tolerance: float
) -> None:
    points = synthetic_curve(overhead_ms / 1000, us_per_token * 1e-6, saturate_tokens=saturate)
    policy = FitPolicy(latency_target_ms=target_ms, tolerance=tolerance)
    decision = choose_budget(points, policy)
    assert decision.budget_tokens in BUDGETS
    assert 0.0 <= decision.max_wait_ms <= policy.max_wait_cap_ms
    feasible = [p for p in points if decision.max_wait_ms + 2 * p.p90_batch_ms <= target_ms]
    assert decision.meets_target == bool(feasible)
    if feasible:
        # Within the target, and within tolerance of the best throughput the target allows.
        assert decision.worst_latency_ms <= target_ms
        assert decision.expected_tokens_per_s >= (1 - tolerance) * max(p.tokens_per_s for p in feasible) - 1e-9
    # A looser target never lowers the throughput chosen (more budgets become feasible).
    looser = choose_budget(points, FitPolicy(latency_target_ms=target_ms * 2, tolerance=tolerance))
    if decision.meets_target:
        assert looser.expected_tokens_per_s >= (1 - tolerance) * decision.expected_tokens_per_s - 1e-9


@given(factor=st.floats(0.2, 5.0))
def test_rescaled_curve_scales_latency_and_the_fitted_line(factor: float) -> None:
    points = synthetic_curve(0.004, 80e-6)
    scaled = rescale(points, factor)
    assert [p.p90_batch_ms for p in scaled] == pytest.approx([p.p90_batch_ms * factor for p in points])
    cost, scaled_cost = fit_cost(points), fit_cost(scaled)
    assert scaled_cost.overhead_s == pytest.approx(cost.overhead_s * factor, rel=1e-6)
    assert scaled_cost.s_per_token == pytest.approx(cost.s_per_token * factor, rel=1e-6)


def test_drift_fires_once_batches_run_persistently_slower_and_not_on_noise() -> None:
    cost = LinearCost(overhead_s=0.001, s_per_token=50e-6)
    policy = FitPolicy(drift_ratio=1.25, drift_min_batches=32, drift_halflife_batches=16, min_refit_interval_s=60)
    state = DriftState(decided_s=0.0)
    # Noise of ±20 % around the prediction for 500 batches: never a drift.
    for i in range(500):
        jitter = 1.2 if i % 2 else 1 / 1.2
        state, factor = observe_drift(state, cost, 1000, cost.predict_s(1000) * jitter, now_s=1000.0 + i, policy=policy)
        assert factor is None
    # The host gets 1.6x slower: detected, and the factor is about 1.6.
    state = DriftState(decided_s=1000.0)
    fired = None
    for i in range(200):
        state, factor = observe_drift(state, cost, 800, cost.predict_s(800) * 1.6, now_s=1100.0 + i, policy=policy)
        if factor is not None:
            fired = (i, factor)
            break
    assert fired is not None
    assert fired[0] + 1 == policy.drift_min_batches  # as soon as enough batches were seen
    assert fired[1] == pytest.approx(1.6, rel=0.01)


def test_drift_waits_for_the_refit_interval() -> None:
    cost = LinearCost(overhead_s=0.0, s_per_token=50e-6)
    policy = FitPolicy(drift_min_batches=4, min_refit_interval_s=60)
    state = DriftState(decided_s=100.0)
    for i in range(50):
        state, factor = observe_drift(state, cost, 100, 0.5 * cost.predict_s(100), now_s=100.0 + i, policy=policy)
        assert factor is None  # faster by 2x, but within a minute of the last decision
    state, factor = observe_drift(state, cost, 100, 0.5 * cost.predict_s(100), now_s=161.0, policy=policy)
    assert factor == pytest.approx(0.5) and math.log(factor) < 0


def test_wait_only_when_enough_arrivals_are_expected_to_share_the_call() -> None:
    cost = LinearCost(overhead_s=0.002, s_per_token=50e-6)
    assert not should_wait(1, arrivals_per_s=150.0, cost=cost)  # one sequential client: 0.3 expected
    assert should_wait(1, arrivals_per_s=600.0, cost=cost)  # 1.2 expected per call cost: worth it
    assert not should_wait(4, arrivals_per_s=1000.0, cost=cost)  # 4 already waiting pay more than 2 save
    assert not should_wait(1, arrivals_per_s=1e6, cost=LinearCost(0.0, 50e-6))  # no fixed cost, no reason


@given(n=st.integers(1, 64), rate=st.floats(0, 1e5), overhead_s=st.floats(0, 0.05))
def test_wait_decision_is_monotone(n: int, rate: float, overhead_s: float) -> None:
    cost = LinearCost(overhead_s, 50e-6)
    if should_wait(n, rate, cost):
        assert should_wait(n, rate * 2, cost)  # more arrivals: still worth it
        assert n == 1 or should_wait(n - 1, rate, cost)  # fewer waiting: still worth it
