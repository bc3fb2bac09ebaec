"""Fixtures of the integration tests: a private redis-server, a Redis key prefix cleaned up after the
test, and a fresh PostgreSQL database per test module (tables emptied before each test)."""

from __future__ import annotations

import secrets
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from postgres_support import ADMIN_URL, database_url
from redis_support import REDIS_URL, PrivateRedis, free_port

from polyray.db.connection import Database, open_database
from polyray.db.schema import metadata


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    # Fail, never skip: a skipped outage test reads as a pass (.ci/run installs redis-server).
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH: the Redis-outage tests cannot run (apt-get install redis-server)")
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


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A fresh PostgreSQL database for the test module, dropped (connections and all) afterwards."""
    name = f"polyray_t_{secrets.token_hex(6)}"
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def db(database: str) -> Iterator[Database]:
    """The module's database, migrated, direct (not through a forwarder), emptied for each test
    (the heads' generation row included: the head store re-creates it)."""
    db = open_database(database_url(database))
    with db.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
    yield db
    db.dispose()
