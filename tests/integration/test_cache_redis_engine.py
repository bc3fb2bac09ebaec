"""The engine's two-tier cache against real Redis: a shared tier between engines, and outages.

Needs Redis at 127.0.0.1:6379 (README.md, *Tests need Redis and PostgreSQL*) and ``redis-server`` on the PATH for the outage
tests, which run a private server on a free port and kill (or freeze) it mid-stream, so the
shared instance is never disturbed. Every test uses its own key prefix and deletes its keys.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import redis.asyncio as aioredis
from redis_support import PrivateRedis, free_port

from polyray.backends.dummy import DummyBackend
from polyray.cache.config import CacheConfig
from polyray.cache.redis_tier import RedisTier
from polyray.cache.service import EngineCache
from polyray.config import ServerConfig
from polyray.engine.engine import Engine
from polyray.policies import BatchPolicy
from polyray.tenancy.accounts import Accounts
from polyray.types import EmbedRequest, EmbedResult, ModelRef, UsageRecord

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"
REF = ModelRef("minilm", "1")
MIN_COSINE = 1.0 - 1e-3


async def count_keys(url: str, prefix: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        return len([k async for k in client.scan_iter(match=prefix.encode() + b"*")])
    finally:
        await client.aclose()


class Node:
    """One engine (a replica) with its own local tier and its own view of the shared tier."""

    def __init__(self, cache: EngineCache) -> None:
        self.backend = DummyBackend(dim=32)
        self.records: list[UsageRecord] = []
        self.cache = cache
        self.engine = Engine(
            {REF: self.backend},
            BatchPolicy(max_wait_ms=1.0, rejoin_wait_ms=0.0),
            ServerConfig(),
            accounts=Accounts(sink=self.records.append),
            cache=cache,
        )

    async def embed(self, *texts: str) -> EmbedResult:
        return await self.engine.embed(EmbedRequest("minilm", texts, client="c"))

    async def settle(self) -> None:
        """Wait for the fills already scheduled (local put, then the Redis write)."""
        for _ in range(5):
            await asyncio.sleep(0)
        await asyncio.gather(*self.engine._fill_tasks)

    def model_report(self) -> dict[str, int]:
        report: dict[str, int] = self.cache.report()["models"][str(REF)]
        return report


def truth(backend: DummyBackend, text: str) -> np.ndarray:
    return backend.vector(backend.tokenize([text])[0].ids)


async def test_a_second_engine_answers_from_the_shared_tier(prefix: str) -> None:
    config = CacheConfig(redis_url=REDIS_URL, key_prefix=prefix, admission="always", retune_interval_s=3600.0)
    first = Node(EngineCache(config, [REF]))
    second = Node(EngineCache(config, [REF]))
    await first.engine.start(warmup=False)
    await second.engine.start(warmup=False)
    try:
        texts = tuple(f"shared tier text number {i}" for i in range(12))
        await first.embed(*texts)
        await first.settle()
        assert await count_keys(REDIS_URL, prefix) == 12

        # The second replica has an empty local tier: every text comes from Redis, none is computed.
        result = await second.embed(*texts, "only here")
        assert second.backend.batch_sizes == [1]  # just "only here"
        assert result.usage.num_cached == 12
        for text, vec in zip(texts, result.vectors[:12], strict=True):
            assert float(vec @ truth(second.backend, text)) >= MIN_COSINE
        report = second.model_report()
        assert (report["shared_hits"], report["local_hits"], report["misses"]) == (12, 0, 1)
        shared = second.cache.report()["shared"]
        assert shared["num_hits"] == 12 and shared["num_errors"] == 0

        # A shared hit fills the local tier: asked again, the second replica answers locally.
        again = await second.embed(*texts[:4])
        assert again.usage.num_cached == 4
        report = second.model_report()
        assert (report["shared_hits"], report["local_hits"]) == (12, 4)
        # Its own computed text went to Redis too, where the first replica finds it.
        await second.settle()
        back = await first.embed("only here")
        assert back.usage.num_cached == 1 and first.model_report()["shared_hits"] == 1
        assert sum(r.num_cached for r in second.records) == 16
    finally:
        await first.engine.stop()
        await second.engine.stop()


async def run_stream(node: Node, start: int, count: int, failures: list[BaseException]) -> list[EmbedResult]:
    """``count`` requests of four texts: two hot ones (answered by the local tier) and two new."""
    results = []
    for i in range(start, start + count):
        try:
            result = await asyncio.wait_for(node.embed("hot one", "hot two", f"new text {i}a", f"new text {i}b"), 5.0)
        except Exception as exc:  # noqa: BLE001 - counting failures is the point
            failures.append(exc)
            continue
        for text, vec in zip(("hot one", "hot two", f"new text {i}a", f"new text {i}b"), result.vectors, strict=True):
            assert float(vec @ truth(node.backend, text)) >= MIN_COSINE
        results.append(result)
        await node.settle()
    return results


async def wait_reconnected(node: Node, tier: RedisTier, start: int, failures: list[BaseException]) -> int:
    """Keep sending until a call has probed Redis and found it back (backoff is short here)."""
    deadline = time.monotonic() + 5.0
    i = start
    while not (tier.up and tier.num_reconnects >= 1):
        assert time.monotonic() < deadline, "the shared tier never came back"
        await run_stream(node, i, 1, failures)
        i += 1
        await asyncio.sleep(0.02)
    return i


async def test_redis_killed_mid_stream_costs_no_request(private_redis: PrivateRedis) -> None:
    tier = RedisTier(private_redis.url, key_prefix="outage:", backoff_initial_s=0.05, backoff_max_s=0.2)
    node = Node(EngineCache(CacheConfig(admission="always", retune_interval_s=3600.0), [REF], shared=tier))
    await node.engine.start(warmup=False)
    failures: list[BaseException] = []
    try:
        await run_stream(node, 0, 10, failures)
        written_before = tier.stats().num_keys_written
        assert written_before == 2 + 2 * 10 and tier.stats().num_errors == 0
        assert await count_keys(private_redis.url, "outage:") == 22

        private_redis.kill()
        started = time.monotonic()
        down = await run_stream(node, 10, 15, failures)
        elapsed_s = time.monotonic() - started
        assert failures == [] and len(down) == 15
        assert all(r.usage.num_cached == 2 for r in down)  # the local tier kept answering the hot texts
        stats = tier.stats()
        assert not stats.up and stats.num_errors >= 1
        assert stats.num_keys_written == written_before  # fills dropped, not failed
        assert elapsed_s < 5.0  # refused connections fail fast; backoff skips most calls

        private_redis.start()  # empty: no persistence
        resumed_at = await wait_reconnected(node, tier, 25, failures)
        after = await run_stream(node, resumed_at, 5, failures)
        assert failures == [] and len(after) == 5
        stats = tier.stats()
        assert stats.up and stats.num_reconnects >= 1 and stats.num_keys_written > written_before
        # The fills after the restart reached the new (empty) Redis: it holds the texts sent since.
        assert await count_keys(private_redis.url, "outage:") >= 2 * 5
        report = node.cache.report()
        assert report["shared"]["num_reconnects"] >= 1 and report["shared"]["num_errors"] >= 1
    finally:
        await node.engine.stop()
    assert failures == []


async def test_a_frozen_redis_costs_latency_not_requests(private_redis: PrivateRedis) -> None:
    """SIGSTOP: the socket connects but never answers, so only the operation timeout ends each
    call. Requests stay answered; the backoff keeps most of them from waiting at all."""
    tier = RedisTier(
        private_redis.url, key_prefix="frozen:", op_timeout_s=0.05, backoff_initial_s=0.2, backoff_max_s=0.4
    )
    node = Node(EngineCache(CacheConfig(admission="always", retune_interval_s=3600.0), [REF], shared=tier))
    await node.engine.start(warmup=False)
    failures: list[BaseException] = []
    try:
        await run_stream(node, 0, 3, failures)
        private_redis.freeze(True)
        started = time.monotonic()
        frozen = await run_stream(node, 3, 12, failures)
        elapsed_s = time.monotonic() - started
        assert failures == [] and len(frozen) == 12
        assert tier.stats().num_errors >= 1 and tier.stats().num_skipped >= 1
        assert elapsed_s < 4.0  # 12 requests, most of them skipping Redis while it is backed off
        private_redis.freeze(False)
        resumed_at = await wait_reconnected(node, tier, 15, failures)
        await run_stream(node, resumed_at, 2, failures)
        assert failures == [] and tier.up
    finally:
        await node.engine.stop()


async def test_calls_failing_together_back_off_once() -> None:
    now = [0.0]
    tier = RedisTier(
        f"redis://127.0.0.1:{free_port()}/0", backoff_initial_s=1.0, backoff_max_s=60.0, clock=lambda: now[0]
    )
    try:
        results = await asyncio.gather(*(tier.get_many([b"k" * 16]) for _ in range(32)))
        assert all(r == [None] for r in results)  # never raises: misses
        assert tier.stats().num_errors == 32 and not tier.up
        now[0] = 2.5  # past twice the initial backoff: one outage event has surely been waited out
        await tier.get_many([b"k" * 16])
        assert tier.stats().num_skipped == 0  # the call probed Redis instead of being skipped
        assert tier.stats().backoff_s <= 4.0
    finally:
        await tier.close()
