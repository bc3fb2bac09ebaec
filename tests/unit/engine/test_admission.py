"""The pure admission decision, the measured cost line and the fair-order work estimate."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from polyray.engine.admission import (
    MIN_RETRY_AFTER_S,
    RefusedDemand,
    ServiceCost,
    WaitCalibration,
    Waiting,
    admit,
)
from polyray.engine.scheduler import FairQueue
from polyray.policies import AdmissionPolicy

BUDGET = 512
seconds = st.floats(0.0, 5.0, allow_nan=False)
tokens = st.floats(0.0, 50_000.0, allow_nan=False)
lines = st.tuples(st.floats(0.0, 0.05), st.floats(1e-6, 1e-3))  # (overhead_s, s_per_token)
policies = st.builds(
    AdmissionPolicy,
    interactive_max_queue_ms=st.floats(0.0, 2000.0),
    batch_max_queue_ms=st.floats(0.0, 2000.0),
    max_client_queue_fraction=st.floats(0.01, 1.0),
    own_work_allowance=st.floats(0.0, 4.0),
)


@st.composite
def waitings(draw: st.DrawFn) -> Waiting:
    backlog = draw(tokens)
    return Waiting(
        work_ahead_tokens=backlog + draw(tokens),  # the client's own backlog is part of the work ahead
        client_backlog_tokens=backlog,
        request_tokens=draw(st.floats(1.0, 5000.0)),
        running_left_s=draw(st.floats(0.0, 0.5)),
        deadline_left_s=draw(st.floats(-1.0, 120.0)),
        interactive=draw(st.booleans()),
    )


def frozen(overhead_s: float, s_per_token: float) -> ServiceCost:
    return ServiceCost.seeded(overhead_s, s_per_token, BUDGET)


@given(waiting=waitings(), line=lines, policy=policies)
def test_the_verdict_follows_from_the_estimate(
    waiting: Waiting, line: tuple[float, float], policy: AdmissionPolicy
) -> None:
    cost = frozen(*line)
    verdict = admit(waiting, cost, BUDGET, policy)
    request_s = cost.drain_s(waiting.request_tokens, BUDGET)
    bound_s = policy.bound_s(waiting.interactive) + policy.own_work_allowance * request_s
    allowed_s = max(0.0, min(waiting.deadline_left_s, bound_s))
    own_s = cost.drain_s(waiting.client_backlog_tokens + waiting.request_tokens, BUDGET)
    others_queued = waiting.work_ahead_tokens > waiting.client_backlog_tokens
    over_share = (
        waiting.client_backlog_tokens > 0 and others_queued and own_s > policy.max_client_queue_fraction * bound_s
    )
    expected_s = waiting.running_left_s + cost.drain_s(waiting.work_ahead_tokens, BUDGET)  # factor 1
    if over_share:
        assert (verdict.admit, verdict.kind, verdict.code) == (False, "rate_limited", "fair_share_queue")
        assert verdict.retry_after_s == pytest.approx(
            max(MIN_RETRY_AFTER_S, own_s - policy.max_client_queue_fraction * bound_s)
        )
    elif expected_s <= allowed_s:
        assert verdict.admit
        assert verdict.expected_wait_s == pytest.approx(expected_s)
    else:
        assert not verdict.admit and verdict.kind == "overloaded"
        assert verdict.code == ("deadline_unmeetable" if waiting.deadline_left_s < bound_s else "queue_full")
        # Retry-After: when the work ahead will have drained to what the request accepts.
        assert verdict.retry_after_s == pytest.approx(max(MIN_RETRY_AFTER_S, expected_s - allowed_s))
        assert str(round(1000 * verdict.retry_after_s)) in verdict.message()
    if not verdict.admit:
        assert verdict.retry_after_s >= MIN_RETRY_AFTER_S


@given(waiting=waitings(), line=lines, policy=policies, more=tokens)
def test_more_work_ahead_never_turns_a_refusal_into_an_admission(
    waiting: Waiting, line: tuple[float, float], policy: AdmissionPolicy, more: float
) -> None:
    cost = frozen(*line)
    heavier = Waiting(
        waiting.work_ahead_tokens + more,
        waiting.client_backlog_tokens,
        waiting.request_tokens,
        waiting.running_left_s,
        waiting.deadline_left_s,
        waiting.interactive,
    )
    if not admit(waiting, cost, BUDGET, policy).admit:
        assert not admit(heavier, cost, BUDGET, policy).admit


@given(waiting=waitings(), policy=policies)
def test_an_unmeasured_server_admits_everything(waiting: Waiting, policy: AdmissionPolicy) -> None:
    assert admit(waiting, ServiceCost(), BUDGET, policy).admit


@given(waiting=waitings(), line=lines, policy=policies)
def test_a_client_alone_in_the_queue_is_never_over_its_share(
    waiting: Waiting, line: tuple[float, float], policy: AdmissionPolicy
) -> None:
    alone = Waiting(
        waiting.client_backlog_tokens,  # all the work ahead is its own
        waiting.client_backlog_tokens,
        waiting.request_tokens,
        waiting.running_left_s,
        waiting.deadline_left_s,
        waiting.interactive,
    )
    assert admit(alone, frozen(*line), BUDGET, policy).code != "fair_share_queue"


@given(waiting=waitings(), line=lines, policy=policies)
def test_a_client_with_nothing_queued_is_never_over_its_share(
    waiting: Waiting, line: tuple[float, float], policy: AdmissionPolicy
) -> None:
    fresh = Waiting(waiting.work_ahead_tokens, 0.0, waiting.request_tokens, 0.0, waiting.deadline_left_s, False)
    assert admit(fresh, frozen(*line), BUDGET, policy).code != "fair_share_queue"


def test_an_idle_server_admits_even_with_a_zero_bound() -> None:
    policy = AdmissionPolicy(interactive_max_queue_ms=0.0, batch_max_queue_ms=0.0, own_work_allowance=0.0)
    idle = Waiting(0.0, 0.0, 300.0, 0.0, 60.0, True)
    assert admit(idle, frozen(0.01, 1e-4), BUDGET, policy).admit
    busy = Waiting(0.0, 0.0, 300.0, 0.002, 60.0, True)  # a pass is still running
    verdict = admit(busy, frozen(0.01, 1e-4), BUDGET, policy)
    assert (verdict.admit, verdict.code, verdict.retry_after_s) == (False, "queue_full", MIN_RETRY_AFTER_S)


def test_two_bulk_requests_from_two_clients_are_both_admitted_with_an_own_work_allowance() -> None:
    """The second of two equal 4-second requests waits about the first's whole request (their texts
    interleave in fair order): over the 100 ms class bound, within an own-work allowance of 1."""
    cost = frozen(0.0, 1e-3)  # 1,000 tokens/s
    second = Waiting(
        work_ahead_tokens=4000.0,
        client_backlog_tokens=0.0,
        request_tokens=4000.0,
        running_left_s=0.05,
        deadline_left_s=60.0,
        interactive=False,
    )
    bulk = AdmissionPolicy(own_work_allowance=1.0)
    assert admit(second, cost, BUDGET, bulk).admit
    strict = admit(second, cost, BUDGET, AdmissionPolicy())  # the default, 0
    assert (strict.admit, strict.code) == (False, "queue_full")
    # A third such request behind both is over its allowance: about 8 s ahead of a 4 s request.
    third = Waiting(8000.0, 0.0, 4000.0, 0.05, 60.0, False)
    assert not admit(third, cost, BUDGET, bulk).admit


def test_classes_have_their_own_bounds_and_a_deadline_can_only_shorten_them() -> None:
    policy = AdmissionPolicy(interactive_max_queue_ms=100.0, batch_max_queue_ms=300.0)
    cost = frozen(0.0, 1e-4)  # 10,000 tokens/s
    two_hundred_ms = dict(work_ahead_tokens=2000.0, client_backlog_tokens=0.0, request_tokens=10.0, running_left_s=0.0)
    assert not admit(Waiting(**two_hundred_ms, deadline_left_s=60.0, interactive=True), cost, BUDGET, policy).admit
    assert admit(Waiting(**two_hundred_ms, deadline_left_s=60.0, interactive=False), cost, BUDGET, policy).admit
    short = admit(Waiting(**two_hundred_ms, deadline_left_s=0.15, interactive=False), cost, BUDGET, policy)
    assert (short.admit, short.code) == (False, "deadline_unmeetable")
    assert short.retry_after_s == pytest.approx(0.05)


# -- the cost line ---------------------------------------------------------------------------------


@given(line=lines, sizes=st.lists(st.integers(1, 4096), min_size=3, max_size=40, unique=True))
def test_the_cost_line_recovers_a_noiseless_machine(line: tuple[float, float], sizes: list[int]) -> None:
    overhead_s, s_per_token = line
    cost = ServiceCost()
    for n in sizes:
        cost = cost.observe(n, overhead_s + s_per_token * n)
    got_overhead, got_slope = cost.line()
    assert got_slope == pytest.approx(s_per_token, rel=1e-4, abs=1e-9)
    assert got_overhead == pytest.approx(overhead_s, rel=1e-3, abs=1e-7)


@given(line=lines, factor=st.floats(0.25, 4.0))
def test_the_cost_line_follows_drift_away_from_its_seed(line: tuple[float, float], factor: float) -> None:
    overhead_s, s_per_token = line
    cost = ServiceCost.seeded(overhead_s, s_per_token, BUDGET)
    for i in range(400):
        n = 16 + (i * 37) % 500
        cost = cost.observe(n, factor * (overhead_s + s_per_token * n))
    assert cost.predict_s(256) == pytest.approx(factor * (overhead_s + s_per_token * 256), rel=0.02)


@given(line=lines, budget_ms=st.floats(0.1, 200.0))
def test_tokens_within_a_time_budget_invert_the_line(line: tuple[float, float], budget_ms: float) -> None:
    cost = frozen(*line)
    n = cost.tokens_within_s(budget_ms / 1000, min_tokens=1)
    if n > 1:
        assert cost.predict_s(n) <= budget_ms / 1000 * (1 + 1e-9)
    assert cost.predict_s(n + 1) > budget_ms / 1000 * (1 - 1e-9) or n == 1


@given(line=lines, work=tokens, more=tokens)
def test_draining_more_work_takes_longer(line: tuple[float, float], work: float, more: float) -> None:
    cost = frozen(*line)
    assert cost.drain_s(work + more, BUDGET) >= cost.drain_s(work, BUDGET)
    if work > 0:
        overhead_s, s_per_token = cost.line()
        assert cost.drain_s(work, BUDGET) == pytest.approx(s_per_token * work + overhead_s * math.ceil(work / BUDGET))


def test_observations_without_compute_change_nothing() -> None:
    cost = frozen(0.01, 1e-4)
    assert cost.observe(0, 1.0) == cost and cost.observe(10, 0.0) == cost
    assert not ServiceCost().known and ServiceCost().drain_s(100, BUDGET) == 0.0


# -- work ahead in fair order ----------------------------------------------------------------------


@given(
    pushes=st.lists(st.tuples(st.sampled_from("abcd"), st.integers(1, 300)), max_size=80),
    weights=st.fixed_dictionaries({c: st.sampled_from([1.0, 2.0, 4.0]) for c in "abcde"}),
    newcomer=st.sampled_from("abcde"),
)
def test_work_ahead_matches_the_queue_order_within_one_item_per_client(
    pushes: list[tuple[str, int]], weights: dict[str, float], newcomer: str
) -> None:
    queue: FairQueue[int] = FairQueue()
    for i, (client, cost) in enumerate(pushes):
        queue.push(client, i, cost, weights[client])
    probe = queue.push(newcomer, -1, 1, weights[newcomer])  # where a new item of ``newcomer`` lands
    exact = sum(t.cost_tokens for t in queue if (t.start, t.seq) < (probe.start, probe.seq))
    queue.remove_if(lambda item: item == -1)
    estimate = queue.work_ahead(newcomer)
    slack = sum(max((c for k, c in pushes if k == client), default=0) for client in "abcd")
    assert exact - slack <= estimate <= exact + slack
    assert queue.tokens_waiting(newcomer) == sum(c for k, c in pushes if k == newcomer)


@given(
    pushes=st.lists(st.tuples(st.sampled_from("abcd"), st.integers(1, 300)), max_size=80),
    newcomer=st.sampled_from("abcde"),
    num_items=st.integers(1, 20),
    item_cost=st.integers(1, 100),
)
def test_work_ahead_of_a_requests_last_item_matches_the_queue_order(
    pushes: list[tuple[str, int]], newcomer: str, num_items: int, item_cost: int
) -> None:
    queue: FairQueue[int] = FairQueue()
    for i, (client, cost) in enumerate(pushes):
        queue.push(client, i, cost, 1.0)
    estimate = queue.work_ahead(newcomer, num_items * item_cost, 1.0)
    new = [queue.push(newcomer, -1 - k, item_cost, 1.0) for k in range(num_items)]
    last = new[-1]
    exact = sum(t.cost_tokens for t in queue if t.item >= 0 and (t.start, t.seq) < (last.start, last.seq))
    slack = sum(item_cost + max((c for k, c in pushes if k == client), default=0) for client in "abcd")
    assert exact - slack <= estimate <= exact + slack


@given(pushes=st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 50)), min_size=1, max_size=40), data=st.data())
def test_per_client_tokens_follow_takes_and_removals(pushes: list[tuple[str, int]], data: st.DataObject) -> None:
    queue: FairQueue[int] = FairQueue()
    for i, (client, cost) in enumerate(pushes):
        queue.push(client, i, cost, 1.0)
    taken = data.draw(st.lists(st.integers(0, len(pushes) - 1), unique=True))
    queue.take(taken)
    dropped = data.draw(st.sets(st.integers(0, len(pushes) - 1)))
    queue.remove_if(lambda item: item in dropped)
    left = [t for t in queue]
    for client in "abc":
        assert queue.tokens_waiting(client) == sum(t.cost_tokens for t in left if t.client == client)
    assume(not left)
    assert queue.work_ahead("a") == 0.0


# -- spreading the refused demand ------------------------------------------------------------------


@given(
    refusals=st.lists(
        st.tuples(st.floats(0.0, 0.5), st.floats(0.0, 2.0), st.floats(0.0, 0.3)),  # (gap_s, retry_s, work_s)
        min_size=1,
        max_size=50,
    )
)
def test_refusals_are_told_to_come_back_after_the_work_refused_before_them(
    refusals: list[tuple[float, float, float]],
) -> None:
    demand = RefusedDemand()
    now_s = 100.0
    pending_s = 0.0  # the fluid model, computed directly
    for gap_s, retry_s, work_s in refusals:
        now_s += gap_s
        pending_s = max(0.0, pending_s - gap_s)
        demand, told_s = demand.refuse(now_s, retry_s, work_s)
        assert told_s == pytest.approx(retry_s + pending_s)
        assert told_s >= retry_s
        pending_s += work_s
    assert demand.pending_at(now_s + pending_s + 1e-9) == 0.0  # drained once the work could be done


def test_a_burst_of_refusals_is_spread_over_the_time_its_work_takes() -> None:
    demand = RefusedDemand()
    told = []
    for _ in range(64):  # 64 refusals at one instant, 40 ms of work each
        demand, retry_s = demand.refuse(5.0, 0.05, 0.040)
        told.append(retry_s)
    assert told[0] == pytest.approx(0.05) and told[-1] == pytest.approx(0.05 + 63 * 0.040)
    assert all(b - a == pytest.approx(0.040) for a, b in itertools.pairwise(told))


# -- calibrating predicted waits ---------------------------------------------------------------------


@given(ratio=st.floats(0.1, 20.0), predictions=st.lists(st.floats(0.005, 2.0), min_size=1, max_size=100))
def test_the_calibration_factor_is_the_measured_ratio_within_its_clamp(ratio: float, predictions: list[float]) -> None:
    calibration = WaitCalibration()
    for predicted_s in predictions:
        calibration = calibration.observe(predicted_s, ratio * predicted_s)
    assert calibration.factor == pytest.approx(min(4.0, max(0.5, ratio)))


def test_tiny_predictions_do_not_calibrate_and_a_factor_scales_the_verdict() -> None:
    assert WaitCalibration().observe(0.001, 5.0).factor == 1.0
    cost = frozen(0.0, 1e-4)
    waiting = Waiting(600.0, 0.0, 10.0, 0.0, 60.0, True)  # 60 ms of compute ahead
    policy = AdmissionPolicy(interactive_max_queue_ms=100.0)
    assert admit(waiting, cost, BUDGET, policy, factor=1.0).admit
    slow = admit(waiting, cost, BUDGET, policy, factor=2.0)  # the waits measured twice the compute
    assert not slow.admit and slow.expected_wait_s == pytest.approx(0.120)


def test_admission_and_the_ms_cap_are_configured_with_bounds() -> None:
    from polyray.config import ConfigError, parse_settings

    settings = parse_settings(
        {
            "admission": {"interactive_max_queue_ms": 80, "batch_max_queue_ms": 300.0},
            "fairness": {"interactive_budget_ms": 20},
        }
    )
    assert settings.admission == AdmissionPolicy(interactive_max_queue_ms=80.0, batch_max_queue_ms=300.0)
    assert settings.fairness.interactive_budget_ms == 20
    for bad in (
        {"admission": {"batch_max_queue_ms": -1}},
        {"admission": {"max_client_queue_fraction": 0}},
        {"admission": {"queue_ms": 5}},
        {"fairness": {"interactive_budget_ms": 0}},
    ):
        with pytest.raises(ConfigError):
            parse_settings(bad)
