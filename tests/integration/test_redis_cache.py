"""The shared tier against real Redis: round trips, TTL, and Redis dying and coming back.

Needs Redis at 127.0.0.1:6379 (README.md, *Tests need Redis and PostgreSQL*). The outage test starts its own private
``redis-server`` on a free port, kills it mid-test and restarts it, so the shared instance is
never disturbed. Every test uses its own key prefix and deletes its keys.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import redis.asyncio as aioredis
from redis_support import PrivateRedis, free_port

from polyray.cache.keys import cache_key
from polyray.cache.local import LocalCache
from polyray.cache.redis_tier import RedisTier
from polyray.cache.tiered import FillPolicy, TieredCache
from polyray.types import ModelRef

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"
REF = ModelRef("minilm", "1")


def vec(i: int) -> np.ndarray:
    v = np.random.default_rng(i).standard_normal(384).astype(np.float32)
    return v / np.linalg.norm(v)


def keys(n: int, tag: str = "") -> list[bytes]:
    return [cache_key(REF, "l2", f"{tag}text {i}") for i in range(n)]


async def test_round_trip_through_real_redis(prefix: str) -> None:
    tier = RedisTier(REDIS_URL, key_prefix=prefix)
    cache = TieredCache(LocalCache(1 << 20), tier, FillPolicy(shared_ttl_s=30.0))
    ks = keys(20)
    await cache.put_many(ks[:10], [vec(i) for i in range(10)])
    # A second process (empty local tier) finds them in Redis.
    other = TieredCache(LocalCache(1 << 20), RedisTier(REDIS_URL, key_prefix=prefix))
    found = await other.get_many(ks)
    assert [t for _, t in found] == ["shared"] * 10 + [None] * 10
    for i in range(10):
        got = found[i][0]
        assert got is not None and float(got @ vec(i)) > 0.999
    assert [t for _, t in await other.get_many(ks[:10])] == ["local"] * 10
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        ttl_ms = await client.pttl(prefix.encode() + ks[0])
        assert 0 < ttl_ms <= 30_000
    finally:
        await client.aclose()
    assert tier.stats().num_keys_written == 10 and tier.stats().num_errors == 0
    await cache.close()
    await other.close()


async def test_entries_expire_with_their_ttl(prefix: str) -> None:
    tier = RedisTier(REDIS_URL, key_prefix=prefix)
    ks = keys(3, "ttl")
    assert await tier.set_many([(k, b"\x02" + bytes(8)) for k in ks], ttl_s=0.2)
    assert all(v is not None for v in await tier.get_many(ks))
    # Poll (generous bound) rather than sleep a guess past the TTL: Redis expires the keys on its clock.
    deadline = time.monotonic() + 10.0
    while await tier.get_many(ks) != [None, None, None]:
        assert time.monotonic() < deadline, "entries outlived their 0.2 s TTL by 10 s"
        await asyncio.sleep(0.05)
    await tier.close()


async def test_a_closed_port_is_a_miss_and_backs_off() -> None:
    now = [0.0]
    tier = RedisTier(f"redis://127.0.0.1:{free_port()}/0", backoff_initial_s=1.0, clock=lambda: now[0])
    assert await tier.get_many([b"k" * 16]) == [None]
    assert not tier.up and tier.stats().num_errors == 1
    assert await tier.get_many([b"k" * 16]) == [None]  # skipped: backoff not over
    assert not await tier.set_many([(b"k" * 16, b"v")], 10.0)
    assert tier.stats().num_errors == 1 and tier.stats().num_skipped == 2
    now[0] = 1.5
    assert await tier.get_many([b"k" * 16]) == [None]  # probe fails: backoff doubles
    assert tier.stats().num_errors == 2 and tier.stats().backoff_s == 2.0
    await tier.close()


async def test_redis_dies_mid_stream_with_zero_failed_lookups(private_redis: PrivateRedis) -> None:
    """Lookups keep flowing while the shared tier goes away and comes back: none fails,
    local hits keep being served, failures are counted, and the tier reconnects after backoff."""
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    now = [0.0]
    tier = RedisTier(url, key_prefix="outage:", backoff_initial_s=0.5, backoff_max_s=2.0, clock=lambda: now[0])
    cache = TieredCache(LocalCache(1 << 20), tier)
    hot = keys(5, "hot")
    cold = keys(50, "cold")
    await cache.put_many(hot, [vec(i) for i in range(5)])
    # A second replica whose local tier is empty relies on Redis for the cold keys.
    await cache.put_many(cold[:25], [vec(100 + i) for i in range(25)])
    replica = TieredCache(LocalCache(1 << 20), tier)
    up_found = await replica.get_many(cold[:25])
    assert all(t == "shared" for _, t in up_found)

    num_lookups = num_failed = 0

    async def lookup_round(batch: list[bytes]) -> list[str | None]:
        nonlocal num_lookups, num_failed
        num_lookups += 1
        try:
            found = await asyncio.wait_for(cache.get_many(batch), timeout=1.0)
        except Exception:  # noqa: BLE001 - counting failures is the point of this test
            num_failed += 1
            return []
        return [t for _, t in found]

    private_redis.kill()
    started = time.monotonic()
    for step in range(20):
        now[0] = step * 0.1
        tiers = await lookup_round(hot + cold[25 + step : 26 + step])
        assert tiers[:5] == ["local"] * 5  # the local tier keeps answering
        assert tiers[5] is None  # miss: the caller computes
        await cache.put_many(cold[25 + step : 26 + step], [vec(200 + step)])  # dropped write, no error
    elapsed_s = time.monotonic() - started
    assert num_failed == 0 and num_lookups == 20
    stats = tier.stats()
    assert not stats.up and stats.num_errors >= 1
    assert stats.num_skipped > stats.num_errors  # most calls never touched the dead socket
    assert elapsed_s < 5.0  # short timeouts and backoff: an outage does not stall lookups

    private_redis.start()  # empty again: no persistence
    now[0] += 10.0  # past any backoff
    assert await tier.set_many([(cold[0], b"\x02" + vec(0).tobytes())], 60.0)
    assert tier.up and tier.stats().num_reconnects == 1
    fresh = TieredCache(LocalCache(1 << 20), tier)  # empty local tier: this answer comes from Redis
    found = await fresh.get_many([cold[0]])
    assert found[0][1] == "shared"
    await cache.close()
