"""Per-client admission (``tenancy.quotas``): token buckets over injected times, concurrency and
the daily compute budget. No clock is read: every call names its ``now``."""

from __future__ import annotations

from dataclasses import replace

import pytest

from polyray.errors import RateLimited
from polyray.tenancy.model import ClientRecord, PriorityClass, Quota
from polyray.tenancy.quotas import SECONDS_PER_DAY, QuotaTracker, TokenBucket, bucket_for

DAY = 20_000  # an arbitrary UTC day number
NOON = DAY * SECONDS_PER_DAY + 12 * 3600.0


def client(name: str = "team", **quota: float | int | None) -> ClientRecord:
    return ClientRecord(id=1, name=name, priority=PriorityClass.BATCH, quota=Quota(**quota))  # type: ignore[arg-type]


# -- TokenBucket -------------------------------------------------------------------------------


def test_bucket_starts_full_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=4.0)
    assert bucket.level == 4.0
    assert bucket.wait_s(10.0) == 0.0
    bucket.take(4.0, 10.0)
    assert bucket.level == 0.0
    assert bucket.wait_s(10.0) > 0  # empty: nothing may be taken now
    assert bucket.wait_s(10.5) == 0.0
    assert bucket.level == pytest.approx(1.0)
    bucket.take(1.0, 10.5)
    assert bucket.wait_s(11.0) == 0.0
    assert bucket.level == pytest.approx(1.0)


def test_bucket_refill_is_capped_at_the_burst() -> None:
    bucket = TokenBucket(rate_per_s=5.0, burst=3.0)
    bucket.take(3.0, 0.0)
    bucket.wait_s(1000.0)
    assert bucket.level == 3.0


def test_bucket_debt_and_wait() -> None:
    bucket = TokenBucket(rate_per_s=4.0, burst=8.0)
    bucket.take(20.0, 0.0)  # larger than the burst: allowed, the bucket goes into debt
    assert bucket.level == -12.0
    assert bucket.wait_s(0.0) == pytest.approx(3.0)
    assert bucket.wait_s(1.0) == pytest.approx(2.0)
    assert bucket.wait_s(2.9) == pytest.approx(0.1)
    assert bucket.wait_s(3.001) == 0.0


def test_bucket_ignores_time_going_backwards() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=10.0)
    bucket.take(10.0, 100.0)
    assert bucket.wait_s(50.0) > 0
    assert bucket.level == 0.0
    assert bucket.wait_s(101.0) == 0.0
    assert bucket.level == pytest.approx(1.0)


def test_bucket_give_back_is_capped() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=5.0)
    bucket.take(3.0, 0.0)
    bucket.give_back(2.0)
    assert bucket.level == 4.0
    bucket.give_back(100.0)
    assert bucket.level == 5.0


def test_bucket_for() -> None:
    assert bucket_for(None) is None
    small = bucket_for(0.5)
    assert small is not None and small.burst == 1.0 and small.rate_per_s == 0.5  # at least one unit
    big = bucket_for(50.0)
    assert big is not None and big.burst == 50.0 and big.level == 50.0  # one second of rate


# -- requests_per_s ----------------------------------------------------------------------------


def test_requests_per_s_admits_the_burst_then_refuses_naming_the_limit() -> None:
    quotas = QuotaTracker()
    team = client(requests_per_s=2.0)
    quotas.admit(team, 0.0, NOON)
    quotas.admit(team, 0.0, NOON)
    with pytest.raises(RateLimited) as info:
        quotas.admit(team, 0.0, NOON)
    assert info.value.code == "requests_per_s"
    assert "requests_per_s=2" in info.value.message and "'team'" in info.value.message
    assert info.value.retry_after_s is not None and 0 < info.value.retry_after_s <= 0.5
    assert quotas.num_in_flight("team") == 2  # the refused request holds nothing
    quotas.admit(team, 0.6, NOON)  # a second later the rate allows more
    assert quotas.num_in_flight("team") == 3


def test_requests_per_s_long_run_rate() -> None:
    quotas = QuotaTracker()
    team = client(requests_per_s=10.0)
    admitted = 0
    for step in range(1000):  # 10 s at 100 attempts per second
        try:
            ticket = quotas.admit(team, step * 0.01, NOON)
        except RateLimited:
            continue
        quotas.release(ticket)
        admitted += 1
    # 10/s over 10 s plus at most the burst (and one unit of debt).
    assert 100 <= admitted <= 100 + 10 + 1


def test_requests_per_s_one_refuses_a_second_request_a_millisecond_later() -> None:
    quotas = QuotaTracker()
    team = client(requests_per_s=1.0)
    quotas.admit(team, 0.0, NOON)
    # A token bucket of rate r and burst b admits at most b + r·T requests in any T seconds:
    # here 1 + 0.001, so the second request must wait about a second.
    with pytest.raises(RateLimited) as info:
        quotas.admit(team, 0.001, NOON)
    assert info.value.retry_after_s == pytest.approx(0.999, abs=1e-3)


# -- tokens_per_s ------------------------------------------------------------------------------


def test_tokens_per_s_large_request_admitted_once_then_waits() -> None:
    quotas = QuotaTracker()
    team = client(tokens_per_s=100.0)
    ticket = quotas.admit(team, 0.0, NOON)
    quotas.charge_tokens(ticket, team, 250, 0.0)  # over the burst, but the bucket was not empty
    quotas.release(ticket)
    ticket = quotas.admit(team, 0.0, NOON)
    with pytest.raises(RateLimited) as info:
        quotas.charge_tokens(ticket, team, 1, 0.5)
    assert info.value.code == "tokens_per_s"
    assert "tokens_per_s=100" in info.value.message
    assert info.value.retry_after_s == pytest.approx(1.0)  # 150 - 50 refilled = 100 tokens of debt left
    quotas.release(ticket)
    ticket = quotas.admit(team, 1.6, NOON)
    quotas.charge_tokens(ticket, team, 10, 1.6)  # debt repaid
    quotas.release(ticket)
    assert quotas.num_in_flight("team") == 0


def test_tokens_without_a_limit_are_free() -> None:
    quotas = QuotaTracker()
    team = client()
    ticket = quotas.admit(team, 0.0, NOON)
    for _ in range(100):
        quotas.charge_tokens(ticket, team, 1_000_000, 0.0)


# -- max_concurrent ----------------------------------------------------------------------------


def test_max_concurrent_with_release() -> None:
    quotas = QuotaTracker()
    team = client(max_concurrent=2)
    first = quotas.admit(team, 0.0, NOON)
    second = quotas.admit(team, 0.0, NOON)
    with pytest.raises(RateLimited) as info:
        quotas.admit(team, 0.0, NOON)
    assert info.value.code == "max_concurrent"
    assert "max_concurrent=2" in info.value.message
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
    assert quotas.num_in_flight("team") == 2
    quotas.release(first)
    quotas.release(first)  # releasing twice frees one slot, not two
    assert quotas.num_in_flight("team") == 1
    third = quotas.admit(team, 0.0, NOON)
    with pytest.raises(RateLimited):
        quotas.admit(team, 0.0, NOON)
    quotas.release(second)
    quotas.release(third)
    assert quotas.num_in_flight("team") == 0


def test_clients_are_limited_separately() -> None:
    quotas = QuotaTracker()
    one, two = client("one", max_concurrent=1, requests_per_s=1.0), client("two", max_concurrent=1)
    quotas.admit(one, 0.0, NOON)
    with pytest.raises(RateLimited):
        quotas.admit(one, 0.0, NOON)
    quotas.admit(two, 0.0, NOON)
    assert quotas.num_in_flight("one") == quotas.num_in_flight("two") == 1
    assert quotas.num_in_flight("nobody") == 0


def test_unlimited_client_is_never_refused() -> None:
    quotas = QuotaTracker()
    team = client()
    tickets = [quotas.admit(team, 0.0, NOON) for _ in range(1000)]
    assert quotas.num_in_flight("team") == 1000
    for ticket in tickets:
        quotas.release(ticket)
    assert quotas.num_in_flight("team") == 0


# -- daily compute budget ----------------------------------------------------------------------


def test_daily_budget_refuses_until_the_next_utc_day() -> None:
    quotas = QuotaTracker()
    team = client(daily_compute_s=1.0)
    quotas.release(quotas.admit(team, 0.0, NOON))
    quotas.charge_compute("team", 0.6)
    quotas.release(quotas.admit(team, 1.0, NOON + 1))
    quotas.charge_compute("team", 0.5)
    with pytest.raises(RateLimited) as info:
        quotas.admit(team, 2.0, NOON + 2)
    assert info.value.code == "daily_compute_s"
    assert "daily_compute_s=1" in info.value.message
    assert info.value.retry_after_s == pytest.approx(12 * 3600.0 - 2)  # until UTC midnight
    assert quotas.num_in_flight("team") == 0
    # The next UTC day starts from zero.
    next_day = (DAY + 1) * SECONDS_PER_DAY + 1.0
    quotas.release(quotas.admit(team, 3.0, next_day))
    quotas.charge_compute("team", 0.9)
    quotas.release(quotas.admit(team, 4.0, next_day + 1))


def test_daily_refusal_takes_no_request_token() -> None:
    quotas = QuotaTracker()
    team = client(daily_compute_s=1.0, requests_per_s=1.0)
    quotas.release(quotas.admit(team, 0.0, NOON))
    quotas.charge_compute("team", 5.0)
    for _ in range(3):
        with pytest.raises(RateLimited) as info:
            quotas.admit(team, 10.0, NOON)
        assert info.value.code == "daily_compute_s"
    quotas.admit(team, 10.0, (DAY + 1) * SECONDS_PER_DAY)  # the bucket is still full


def test_seed_compute_today_counts_what_the_ledger_holds() -> None:
    quotas = QuotaTracker()
    quotas.seed_compute_today("team", 0.9, NOON - 3600)
    team = client(daily_compute_s=1.0)
    quotas.release(quotas.admit(team, 0.0, NOON))
    quotas.charge_compute("team", 0.2)
    with pytest.raises(RateLimited) as info:
        quotas.admit(team, 0.0, NOON)
    assert info.value.code == "daily_compute_s"
    assert "1.1 of" in info.value.message


def test_seed_from_yesterday_does_not_count_today() -> None:
    quotas = QuotaTracker()
    quotas.seed_compute_today("team", 50.0, NOON - SECONDS_PER_DAY)
    team = client(daily_compute_s=1.0)
    quotas.release(quotas.admit(team, 0.0, NOON))


def test_charge_for_an_unknown_client_is_ignored() -> None:
    quotas = QuotaTracker()
    quotas.charge_compute("ghost", 100.0)
    quotas.release(quotas.admit(client("ghost", daily_compute_s=1.0), 0.0, NOON))


# -- a quota change keeps what was used --------------------------------------------------------


def test_quota_change_keeps_in_flight_and_compute_used() -> None:
    quotas = QuotaTracker()
    before = client(max_concurrent=5, daily_compute_s=10.0)
    tickets = [quotas.admit(before, 0.0, NOON) for _ in range(2)]
    quotas.charge_compute("team", 3.0)

    tighter = replace(before, quota=Quota(max_concurrent=2, daily_compute_s=10.0))
    with pytest.raises(RateLimited) as info:
        quotas.admit(tighter, 0.0, NOON)  # the two in flight count against the new limit
    assert info.value.code == "max_concurrent"
    assert quotas.num_in_flight("team") == 2

    budget = replace(before, quota=Quota(max_concurrent=5, daily_compute_s=3.5))
    tickets.append(quotas.admit(budget, 0.0, NOON))  # 3 s used, under 3.5
    quotas.charge_compute("team", 1.0)
    with pytest.raises(RateLimited) as info:
        quotas.admit(budget, 0.0, NOON)
    assert info.value.code == "daily_compute_s"
    assert "4.0 of" in info.value.message

    for ticket in tickets:  # tickets from before the change release into the new state
        quotas.release(ticket)
    assert quotas.num_in_flight("team") == 0


def test_new_rate_applies_after_a_change() -> None:
    quotas = QuotaTracker()
    slow = client(requests_per_s=1.0)
    quotas.release(quotas.admit(slow, 0.0, NOON))
    fast = replace(slow, quota=Quota(requests_per_s=100.0))
    for _ in range(50):
        quotas.release(quotas.admit(fast, 0.0, NOON))
    assert quotas.num_in_flight("team") == 0


def test_same_client_snapshot_keeps_its_buckets() -> None:
    """The directory reloads clients as new but equal objects: that must not refill the buckets."""
    quotas = QuotaTracker()
    quotas.admit(client(requests_per_s=1.0), 0.0, NOON)
    with pytest.raises(RateLimited):
        quotas.admit(client(requests_per_s=1.0), 0.0, NOON)
