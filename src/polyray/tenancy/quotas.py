"""Per-client admission: token buckets (requests/s, tokens/s), concurrency and a daily budget.

``TokenBucket`` is pure arithmetic over an injected ``now_s``: it may go into debt, so a single
request larger than the burst is still admitted when the bucket is not empty, and the next one
waits until the debt is repaid (Retry-After = debt / rate). Without debt, a request of more
tokens than the burst could never pass.

``QuotaTracker`` keeps one state per client and answers ``admit`` with either a ``Ticket`` (to
``release`` when the request ends) or ``RateLimited`` naming the limit. It holds no lock: all of
it runs on the event-loop thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from polyray.errors import RateLimited
from polyray.tenancy.model import ClientRecord

SECONDS_PER_DAY = 86_400.0


@dataclass
class TokenBucket:
    """``rate_per_s`` refill up to ``burst``; starts full."""

    rate_per_s: float
    burst: float
    level: float = math.nan
    updated_s: float = math.nan

    def __post_init__(self) -> None:
        if math.isnan(self.level):
            self.level = self.burst

    def _refill(self, now_s: float) -> None:
        if not math.isnan(self.updated_s) and now_s > self.updated_s:
            self.level = min(self.burst, self.level + (now_s - self.updated_s) * self.rate_per_s)
        if math.isnan(self.updated_s) or now_s > self.updated_s:
            self.updated_s = now_s

    def wait_s(self, now_s: float, need: float = 0.0) -> float:
        """0 when the bucket holds more than ``need`` now, else the seconds until it will.

        ``need`` 0 allows debt (tokens/s: a large request passes when the bucket is not empty);
        ``need`` 1 does not (requests/s: each request takes a whole token).
        """
        self._refill(now_s)
        if (self.level >= need) if need > 0 else (self.level > 0):
            return 0.0
        # With debt allowed the bucket must be strictly positive: step just past the instant it is 0.
        return (need - self.level) / self.rate_per_s + (0.0 if need > 0 else 1e-9)

    def take(self, amount: float, now_s: float) -> None:
        self._refill(now_s)
        self.level -= amount

    def give_back(self, amount: float) -> None:
        self.level = min(self.burst, self.level + amount)


def bucket_for(rate_per_s: float | None) -> TokenBucket | None:
    """A bucket holding one second of rate (at least one unit), or None for unlimited."""
    return None if rate_per_s is None else TokenBucket(rate_per_s, burst=max(1.0, rate_per_s))


@dataclass
class ClientState:
    client: ClientRecord
    requests: TokenBucket | None
    tokens: TokenBucket | None
    num_in_flight: int = 0
    day: int = -1
    compute_s_today: float = 0.0


@dataclass
class Ticket:
    """An admitted request; ``release`` it exactly once when it ends."""

    client: str
    released: bool = field(default=False)


class QuotaTracker:
    def __init__(self) -> None:
        self._states: dict[str, ClientState] = {}
        self._seeds: dict[str, tuple[int, float]] = {}  # (UTC day, compute_s) read from the ledger

    def _state(self, client: ClientRecord) -> ClientState:
        state = self._states.get(client.name)
        if state is None or state.client != client:
            # New client or changed quota: rebuild the buckets, keep what was used.
            old = state
            state = ClientState(client, bucket_for(client.quota.requests_per_s), bucket_for(client.quota.tokens_per_s))
            if old is not None:
                state.num_in_flight, state.day, state.compute_s_today = old.num_in_flight, old.day, old.compute_s_today
            seed = self._seeds.pop(client.name, None)
            if seed is not None:
                state.day, state.compute_s_today = seed
            self._states[client.name] = state
        return state

    def seed_compute_today(self, client_name: str, compute_s: float, now_wall_s: float) -> None:
        """Start the daily budget from what the ledger already holds for today (after a restart)."""
        self._seeds[client_name] = (int(now_wall_s // SECONDS_PER_DAY), compute_s)

    def admit(self, client: ClientRecord, now_s: float, now_wall_s: float) -> Ticket:
        """Check concurrency, requests/s and the daily compute budget; raise ``RateLimited``."""
        state = self._state(client)
        quota = client.quota
        if quota.max_concurrent is not None and state.num_in_flight >= quota.max_concurrent:
            raise RateLimited(
                f"client {client.name!r} has {state.num_in_flight} requests in flight, its limit is "
                f"max_concurrent={quota.max_concurrent}",
                code="max_concurrent",
                retry_after_s=1.0,
            )
        day = int(now_wall_s // SECONDS_PER_DAY)
        if day != state.day:
            state.day, state.compute_s_today = day, 0.0
        if quota.daily_compute_s is not None and state.compute_s_today >= quota.daily_compute_s:
            raise RateLimited(
                f"client {client.name!r} has used {state.compute_s_today:.1f} of its daily_compute_s="
                f"{quota.daily_compute_s:g} compute-seconds today (UTC)",
                code="daily_compute_s",
                retry_after_s=(day + 1) * SECONDS_PER_DAY - now_wall_s,
            )
        if state.requests is not None:
            wait_s = state.requests.wait_s(now_s, need=1.0)
            if wait_s > 0:
                raise RateLimited(
                    f"client {client.name!r} is over its requests_per_s={quota.requests_per_s:g}",
                    code="requests_per_s",
                    retry_after_s=wait_s,
                )
            state.requests.take(1.0, now_s)
        state.num_in_flight += 1
        return Ticket(client.name)

    def charge_tokens(self, ticket: Ticket, client: ClientRecord, num_tokens: int, now_s: float) -> None:
        """Take ``num_tokens`` from the tokens/s bucket (counted once tokenized); raise ``RateLimited``."""
        state = self._state(client)
        if state.tokens is None:
            return
        wait_s = state.tokens.wait_s(now_s)
        if wait_s > 0:
            raise RateLimited(
                f"client {client.name!r} is over its tokens_per_s={client.quota.tokens_per_s:g}",
                code="tokens_per_s",
                retry_after_s=wait_s,
            )
        state.tokens.take(float(num_tokens), now_s)

    def charge_compute(self, client_name: str, compute_s: float) -> None:
        state = self._states.get(client_name)
        if state is not None:
            state.compute_s_today += compute_s

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        state = self._states.get(ticket.client)
        if state is not None:
            state.num_in_flight -= 1

    def num_in_flight(self, client_name: str) -> int:
        state = self._states.get(client_name)
        return state.num_in_flight if state else 0
