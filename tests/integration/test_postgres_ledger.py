"""The ledger against a real PostgreSQL (127.0.0.1:5432; README.md, *Tests need Redis and PostgreSQL*), in a fresh database.

The outage tests never stop the server: the ledger reaches PostgreSQL through a small TCP
forwarder written here, and ``cut()`` closes its listener and every connection through it (the
database "goes away" for the ledger), ``restore()`` listens again on the same port. The totals
are then read from PostgreSQL directly, not through the forwarder.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from postgres_support import PG_PORT, Forwarder

from polyray.db.connection import Database, open_database, schema_version
from polyray.db.schema import metadata, usage, usage_batches
from polyray.errors import Forbidden, Unauthenticated
from polyray.tenancy.directory import ClientDirectory
from polyray.tenancy.ledger import Spool, UsageBatch, UsageLedger, UsageRow, apply_batch, compute_s_today
from polyray.tenancy.model import PriorityClass, Quota
from polyray.tenancy.reports import usage_totals
from polyray.tenancy.store import ClientStore
from polyray.types import UsageRecord

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC).timestamp()
Totals = dict[str, tuple[int, int, int, int, int]]


def totals(db: Database) -> Totals:
    cols = [usage.c.num_requests, usage.c.num_texts, usage.c.num_cached, usage.c.num_tokens, usage.c.compute_ns]
    query = sa.select(usage.c.client, *(sa.func.sum(c) for c in cols)).group_by(usage.c.client)
    with db.connect() as conn:
        return {r[0]: tuple(int(v) for v in r[1:]) for r in conn.execute(query)}  # type: ignore[misc]


def expected(records: list[UsageRecord]) -> Totals:
    sums: dict[str, list[int]] = {}
    for r in records:
        acc = sums.setdefault(r.client, [0, 0, 0, 0, 0])
        for i, v in enumerate((r.num_requests, r.num_texts, r.num_cached, r.num_tokens, r.compute_ns)):
            acc[i] += v
    return {c: tuple(v) for c, v in sums.items()}  # type: ignore[misc]


class Recorder:
    """Makes distinct, varied usage records and remembers every one it made."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.made: list[UsageRecord] = []

    def next(self) -> UsageRecord:
        rnd = self.rnd
        rec = UsageRecord(
            rnd.choice(["alpha", "beta", "gamma"]),
            "minilm",
            rnd.choice(["1", "2"]),
            T0 + rnd.uniform(0, 600),  # ten minutes of rows
            num_requests=rnd.randint(0, 1),
            num_texts=rnd.randint(0, 8),
            num_cached=rnd.randint(0, 3),
            num_tokens=rnd.randint(0, 500),
            compute_ns=rnd.randint(1, 5 * 10**9),
        )
        self.made.append(rec)
        return rec


# -- a TCP forwarder that can cut PostgreSQL off (postgres_support.Forwarder) -------------------


@pytest.fixture
def forwarder() -> Iterator[Forwarder]:
    fwd = Forwarder(PG_PORT)
    yield fwd
    fwd.close()


async def wait_for(cond: object, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


# -- schema, clients and auth on PostgreSQL ----------------------------------------------------


def test_migrations_reach_head_and_match_the_schema_module(db: Database) -> None:
    assert schema_version(db) == "0002"
    with db.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    inspector = sa.inspect(db)
    for table in metadata.sorted_tables:
        assert {c["name"] for c in inspector.get_columns(table.name)} == {c.name for c in table.columns}


def test_store_and_directory(db: Database) -> None:
    store = ClientStore(db)
    made, key = store.create_client("search", PriorityClass.INTERACTIVE, 2.0, Quota(requests_per_s=3.0))
    admin_key = store.create_admin_key()
    directory = ClientDirectory(store)
    directory.load()
    who = directory.authenticate(key)
    assert who.client == made == store.get("search")
    assert directory.authenticate(admin_key).is_admin
    store.update("search", disabled=True)
    directory.load()
    with pytest.raises(Forbidden):
        directory.authenticate(key)
    store.update("search", disabled=False, quota=Quota(max_concurrent=4))
    new_key = store.rotate_key("search")
    directory.load()
    with pytest.raises(Unauthenticated):
        directory.authenticate(key)
    client = directory.authenticate(new_key).client
    assert client is not None and client.quota == Quota(max_concurrent=4)
    # A fresh connection pool (a restart) sees the same state.
    again = sa.create_engine(db.url)
    try:
        other = ClientDirectory(ClientStore(again))
        other.load()
        assert other.authenticate(new_key).client == client
    finally:
        again.dispose()


def test_apply_batch_reports_and_big_values(db: Database) -> None:
    minute = int(T0 // 60) * 60
    big = 4 * 10**15
    assert apply_batch(db, UsageBatch("pg-1", (UsageRow("a", "minilm", "1", minute, 1, 2, 1, 30, big),))) is True
    apply_batch(db, UsageBatch("pg-2", (UsageRow("a", "minilm", "1", minute, 1, 1, 0, 5, big),)))
    assert totals(db) == {"a": (2, 3, 1, 35, 2 * big)}
    day = datetime(2026, 3, 2, tzinfo=UTC)
    by_day = usage_totals(db, day, by="day")
    assert [(t.group, t.num_tokens) for t in by_day] == [("2026-03-02", 35)]
    assert [t.group for t in usage_totals(db, day, by="model")] == ["minilm@1"]
    assert [(t.group, t.num_requests) for t in usage_totals(db, day, client="a")] == [("a", 2)]
    assert compute_s_today(db, T0 + 60) == {"a": pytest.approx(2 * big / 1e9)}


def test_apply_batch_twice_counts_once(db: Database) -> None:
    batch = UsageBatch("pg-once", (UsageRow("a", "minilm", "1", int(T0 // 60) * 60, 1, 2, 1, 30, 777),))
    assert apply_batch(db, batch) is True
    second = apply_batch(db, batch)
    assert totals(db) == {"a": (1, 2, 1, 30, 777)}
    assert second is False


async def test_ledger_replay_of_an_applied_batch_counts_once(db: Database, tmp_path: Path) -> None:
    """Commit sent, answer lost: the batch is in the database and still in the spool."""
    spool = Spool(tmp_path / "spool.jsonl")
    done = UsageBatch("committed", (UsageRow("a", "minilm", "1", int(T0 // 60) * 60, 1, 1, 0, 10, 100),))
    apply_batch(db, done)
    spool.append([done])
    ledger = UsageLedger(db, spool.path)
    await ledger.start()
    await ledger.stop()
    assert not spool.path.exists()
    assert totals(db) == {"a": (1, 1, 0, 10, 100)}


def test_concurrent_apply_of_the_same_batch_applies_once(db: Database) -> None:
    minute = int(T0 // 60) * 60
    num_batches = 20
    outcomes: list[bool] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for n in range(num_batches):
            batch = UsageBatch(f"dup-{n}", (UsageRow("a", "minilm", "1", minute, 1, 1, 0, 10, 1000 + n),))
            barrier = threading.Barrier(2)

            def apply(b: UsageBatch = batch, bar: threading.Barrier = barrier) -> bool:
                bar.wait(timeout=10)
                return apply_batch(db, b)

            results = list(pool.map(lambda _: apply(), range(2)))
            assert sorted(results) == [False, True], n
            outcomes.extend(results)
    assert totals(db) == {"a": (num_batches, num_batches, 0, 10 * num_batches, sum(1000 + n for n in range(20)))}
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(usage_batches)).scalar_one() == num_batches


# -- PostgreSQL unreachable mid-run: nothing lost, nothing counted twice -----------------------


async def test_outage_mid_run_loses_no_usage(db: Database, database: str, forwarder: Forwarder, tmp_path: Path) -> None:
    spool = tmp_path / "usage-spool.jsonl"
    through = open_database(f"postgresql://postgres@{forwarder.url}/{database}")
    ledger = UsageLedger(through, spool, flush_interval_s=0.05, max_backoff_s=0.2)
    recorder = Recorder(seed=11)
    await ledger.start()
    try:
        # Phase 1: the database is there; usage flows in the background.
        for _ in range(15):
            for _ in range(10):
                ledger.record(recorder.next())
            await asyncio.sleep(0.01)
        await wait_for(lambda: bool(totals(db)), "the first flushes to reach PostgreSQL")
        assert ledger.healthy

        # Phase 2: PostgreSQL is unreachable; usage keeps coming and goes to the spool.
        forwarder.cut()
        spooled_sizes = []
        for _ in range(30):
            for _ in range(10):
                ledger.record(recorder.next())
            await asyncio.sleep(0.02)
            spooled_sizes.append(len(Spool(spool).read()))
        await wait_for(lambda: not ledger.healthy, "the ledger to notice the outage")
        assert ledger.num_failed_flushes >= 1
        assert spool.exists() and ledger.num_pending_batches >= 2
        assert spooled_sizes[-1] > spooled_sizes[0]  # the spool grows while the database is away
        during = totals(db)

        # Phase 3: back again; the spool drains and usage keeps flowing.
        forwarder.restore()
        for _ in range(15):
            for _ in range(10):
                ledger.record(recorder.next())
            await asyncio.sleep(0.01)
        await wait_for(lambda: ledger.healthy and not spool.exists(), "the spool to drain after the outage")
    finally:
        await ledger.stop()
        through.dispose()
    final = totals(db)
    assert final == expected(recorder.made)
    assert final != during  # the outage's usage arrived only after the restore
    assert not spool.exists()
    assert ledger.num_pending_batches == 0
    assert forwarder.num_accepted >= 2  # the ledger really went through the forwarder, and reconnected


async def test_outage_then_restart_replays_the_spool(
    db: Database, database: str, forwarder: Forwarder, tmp_path: Path
) -> None:
    spool = tmp_path / "usage-spool.jsonl"
    url = f"postgresql://postgres@{forwarder.url}/{database}"
    through = open_database(url)
    recorder = Recorder(seed=23)
    ledger = UsageLedger(through, spool, flush_interval_s=0.05, max_backoff_s=0.2)
    await ledger.start()
    for _ in range(5):
        ledger.record(recorder.next())
    await ledger.flush()
    forwarder.cut()
    for _ in range(10):
        for _ in range(20):
            ledger.record(recorder.next())
        await asyncio.sleep(0.02)
    await ledger.stop()  # the database is away: the last aggregate goes to the spool too
    through.dispose()
    assert not ledger.healthy
    pending = Spool(spool).read()
    assert pending
    assert totals(db) == expected(recorder.made[:5])

    # The restarted server: a new ledger on the same spool, PostgreSQL reachable again.
    forwarder.restore()
    again = open_database(url)
    restarted = UsageLedger(again, spool, flush_interval_s=0.05, max_backoff_s=0.2)
    try:
        await restarted.start()
        await restarted.stop()
    finally:
        again.dispose()
    assert totals(db) == expected(recorder.made)
    assert not spool.exists()
    with db.connect() as conn:
        applied = {r.batch_id for r in conn.execute(sa.select(usage_batches.c.batch_id))}
    assert {b.batch_id for b in pending} <= applied


# -- a silent partition (sockets open, nothing answered): every call ends at its deadline ---------


async def test_silent_partition_spools_within_the_deadline_and_replays_once(
    db: Database, database: str, forwarder: Forwarder, tmp_path: Path
) -> None:
    spool = tmp_path / "usage-spool.jsonl"
    url = f"postgresql://postgres@{forwarder.url}/{database}"
    through = open_database(url, timeout_s=1.0)
    recorder = Recorder(seed=31)
    ledger = UsageLedger(through, spool, flush_interval_s=0.05, max_backoff_s=0.2, db_timeout_s=1.0)
    directory = ClientDirectory(ClientStore(through), db_timeout_s=1.0)
    await ledger.start()
    for _ in range(20):
        ledger.record(recorder.next())
    await wait_for(lambda: bool(totals(db)), "the first flush to reach PostgreSQL")

    forwarder.silence()
    for _ in range(50):
        ledger.record(recorder.next())
    began = time.monotonic()
    assert not await ledger.flush()  # before the deadline, this waited forever
    assert time.monotonic() - began < 5.0
    assert not ledger.healthy and ledger.num_failed_flushes >= 1
    assert {b.batch_id for b in Spool(spool).read()} >= {b.batch_id for b in ledger._pending}

    began = time.monotonic()
    with pytest.raises(sa.exc.SQLAlchemyError):  # a timeout or a connect timeout: the directory keeps its snapshot
        await directory.refresh()
    assert time.monotonic() - began < 5.0

    for _ in range(30):
        ledger.record(recorder.next())
    began = time.monotonic()
    await ledger.stop()  # the database is known away: the last aggregate goes to the spool only
    assert time.monotonic() - began < 5.0
    through.dispose()
    assert Spool(spool).read()

    # Healed: bytes held in the partition arrive late (a held COMMIT would commit now); the
    # restarted ledger replays the spool; batch ids make every row count exactly once.
    forwarder.heal()
    again = open_database(url, timeout_s=1.0)
    restarted = UsageLedger(again, spool, flush_interval_s=0.05, max_backoff_s=0.2, db_timeout_s=1.0)
    try:
        await restarted.start()
        await restarted.stop()
    finally:
        again.dispose()
    assert totals(db) == expected(recorder.made)
    assert not spool.exists()
    assert restarted.num_replayed_batches >= 1
