"""The shared tier: Redis, one MGET per lookup batch and one pipeline of SET PX per fill.

It never raises to the caller. The cache is an optimization, so a Redis outage must cost hit
ratio, not requests: every failure (refused, reset, timeout, a protocol error) is counted and
answered as misses (reads) or dropped (writes). After a failure the tier is *down* and skipped
without touching the network until an exponential backoff (doubling, capped) expires; then one
call probes it, and success brings it back up.

Timeouts are short by default (50 ms connect, 100 ms per operation): a lookup that waits longer
than that for Redis would be better spent computing. redis-py's own retries are turned off for
the same reason; an outer ``asyncio.timeout`` guards against anything the socket timeouts miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


@dataclass(frozen=True)
class RedisTierStats:
    num_get_calls: int
    num_keys_requested: int
    num_hits: int
    num_set_calls: int
    num_keys_written: int
    num_errors: int  # calls that failed (each one also marked the tier down)
    num_skipped: int  # calls answered without Redis because the tier was down
    num_reconnects: int  # down -> up transitions
    up: bool
    backoff_s: float  # the current wait between probes (doubles per failed probe)


class RedisTier:
    def __init__(
        self,
        url: str | None = None,
        *,
        key_prefix: str = "polyray:v1:",
        connect_timeout_s: float = 0.05,
        op_timeout_s: float = 0.1,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        client: aioredis.Redis | None = None,
    ) -> None:
        if client is None:
            if url is None:
                raise ValueError("RedisTier needs a url or a client")
            client = aioredis.Redis.from_url(
                url,
                socket_connect_timeout=connect_timeout_s,
                socket_timeout=op_timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
        self._client = client
        self._prefix = key_prefix.encode()
        self._guard_s = connect_timeout_s + op_timeout_s + 0.05
        self._clock = clock
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._backoff_s = backoff_initial_s
        self._down_until_s: float | None = None  # None: up
        self._probing = False
        self.num_get_calls = self.num_keys_requested = self.num_hits = 0
        self.num_set_calls = self.num_keys_written = 0
        self.num_errors = self.num_skipped = self.num_reconnects = 0

    @property
    def up(self) -> bool:
        return self._down_until_s is None

    def _may_call(self) -> bool:
        """Up, or down with the backoff expired and no other call already probing."""
        if self._down_until_s is None:
            return True
        if self._probing or self._clock() < self._down_until_s:
            self.num_skipped += 1
            return False
        return True

    async def _call(self, op: Callable[[], Any]) -> tuple[bool, Any]:
        probe = self._down_until_s is not None
        if probe:
            self._probing = True
        try:
            async with asyncio.timeout(self._guard_s):
                result = await op()
        except Exception:  # noqa: BLE001 - any failure of the shared tier is a miss, never an error
            self.num_errors += 1
            # One outage, one step: calls that were in flight together when Redis went away fail
            # together and must not each double the wait. Only a failed probe (the outage goes on)
            # doubles it.
            if probe:
                self._backoff_s = min(self._backoff_s * 2.0, self._backoff_max_s)
            if probe or self._down_until_s is None:
                self._down_until_s = self._clock() + self._backoff_s
            await self._drop_connections()
            return False, None
        finally:
            if probe:
                self._probing = False
        if probe:
            self.num_reconnects += 1
        self._down_until_s = None
        self._backoff_s = self._backoff_initial_s
        return True, result

    async def _drop_connections(self) -> None:
        # A timed-out connection may still have a reply in flight: never reuse it.
        # Best effort; the next probe reconnects anyway.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._guard_s):
                await self._client.connection_pool.disconnect()

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values for ``keys`` in order; None for misses and for every key when Redis fails."""
        if not keys:
            return []
        self.num_get_calls += 1
        self.num_keys_requested += len(keys)
        if not self._may_call():
            return [None] * len(keys)
        full = [self._prefix + k for k in keys]
        ok, values = await self._call(lambda: self._client.mget(full))
        if not ok:
            return [None] * len(keys)
        out: list[bytes | None] = [v if isinstance(v, bytes) else None for v in values]
        self.num_hits += sum(v is not None for v in out)
        return out

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl_s: float) -> bool:
        """Write all items with a TTL in one round trip; False (and dropped) when Redis fails."""
        if not items:
            return True
        self.num_set_calls += 1
        if not self._may_call():
            return False
        ttl_ms = max(1, int(ttl_s * 1000))

        async def write() -> Any:
            pipe = self._client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(self._prefix + key, value, px=ttl_ms)
            return await pipe.execute()

        ok, _ = await self._call(write)
        if ok:
            self.num_keys_written += len(items)
        return bool(ok)

    async def close(self) -> None:
        # Closing a dead connection may fail; there is nothing left to do about it.
        with contextlib.suppress(Exception):
            await self._client.aclose()

    def stats(self) -> RedisTierStats:
        return RedisTierStats(
            num_get_calls=self.num_get_calls,
            num_keys_requested=self.num_keys_requested,
            num_hits=self.num_hits,
            num_set_calls=self.num_set_calls,
            num_keys_written=self.num_keys_written,
            num_errors=self.num_errors,
            num_skipped=self.num_skipped,
            num_reconnects=self.num_reconnects,
            up=self.up,
            backoff_s=self._backoff_s,
        )
