"""Fixtures of the Redis integration tests: a private redis-server, and a key prefix cleaned up after the test."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from redis_support import REDIS_URL, PrivateRedis, free_port


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = f"polyray:test:{uuid.uuid4().hex}:"
    yield value
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        found = [k async for k in client.scan_iter(match=value.encode() + b"*")]
        if found:
            await client.delete(*found)
    finally:
        await client.aclose()
