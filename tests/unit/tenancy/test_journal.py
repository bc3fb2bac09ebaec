"""The usage journal, the ledger's failure counters, the call deadline and file permissions, on real
SQLite files and real processes (``tenancy.journal``, ``tenancy.ledger``, ``db.connection``)."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from polyray.config import ConfigError, TenancyConfig, load_settings
from polyray.db.connection import Database, DatabaseTimeout, call_with_deadline, open_database
from polyray.db.schema import usage
from polyray.tenancy.journal import UsageJournal
from polyray.tenancy.ledger import Spool, UsageBatch, UsageLedger, apply_batch
from polyray.tenancy.service import journal_dir
from polyray.types import UsageRecord

T0 = 1_767_610_000.0
Totals = tuple[int, int, int, int, int]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    db = open_database(f"sqlite:///{tmp_path}/ledger.db")
    yield db
    db.dispose()


def totals(db: Database) -> Totals:
    cols = (usage.c.num_requests, usage.c.num_texts, usage.c.num_cached, usage.c.num_tokens, usage.c.compute_ns)
    with db.connect() as conn:
        row = conn.execute(sa.select(*(sa.func.coalesce(sa.func.sum(c), 0) for c in cols))).one()
    return tuple(int(v) for v in row)  # type: ignore[return-value]


def records(n: int, client: str = "alpha") -> list[UsageRecord]:
    """Varied records over a few minutes (several aggregate rows)."""
    return [UsageRecord(client, "minilm", "1", T0 + 17 * i, i % 2, i % 5, i % 3, 7 * i, 1000 + i) for i in range(n)]


def expected(recs: list[UsageRecord]) -> Totals:
    return (
        sum(r.num_requests for r in recs),
        sum(r.num_texts for r in recs),
        sum(r.num_cached for r in recs),
        sum(r.num_tokens for r in recs),
        sum(r.compute_ns for r in recs),
    )


def ledger_for(db: Database, tmp_path: Path, journal: bool = True) -> UsageLedger:
    spool = tmp_path / "usage-spool.jsonl"
    return UsageLedger(
        db,
        spool,
        flush_interval_s=0.05,
        max_backoff_s=0.1,
        journal=UsageJournal(journal_dir(spool)) if journal else None,
    )


# -- a hard kill ---------------------------------------------------------------------------------

KILLED_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from polyray.db.connection import open_database
    from polyray.tenancy.journal import UsageJournal
    from polyray.tenancy.ledger import UsageLedger
    from polyray.types import UsageRecord
    from polyray.tenancy.service import journal_dir

    home, n, with_journal = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"

    async def main():
        spool = home / "usage-spool.jsonl"
        journal = UsageJournal(journal_dir(spool)) if with_journal else None
        # A flush interval longer than the test: all usage is in memory (and the journal) when killed.
        ledger = UsageLedger(open_database(f"sqlite:///{home}/ledger.db"), spool, flush_interval_s=3600, journal=journal)
        await ledger.start()
        for i in range(n):
            ledger.record(UsageRecord("alpha", "minilm", "1", 1_767_610_000.0 + 17 * i, i % 2, i % 5, i % 3, 7 * i, 1000 + i))
        print("recorded", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("with_journal", [True, False])
async def test_sigkill_after_the_records_loses_nothing_with_the_journal(tmp_path: Path, with_journal: bool) -> None:
    n = 500
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(tmp_path), str(n), "1" if with_journal else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "recorded"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL

    db = open_database(f"sqlite:///{tmp_path}/ledger.db")
    try:
        assert totals(db) == (0, 0, 0, 0, 0)  # nothing had been flushed
        restarted = ledger_for(db, tmp_path, journal=with_journal)
        await restarted.start()
        await restarted.stop()
        if with_journal:
            assert totals(db) == expected(records(n))
            assert restarted.num_recovered_batches == 1
            assert list(journal_dir(tmp_path / "usage-spool.jsonl").glob("*.jsonl")) == []  # replayed, then removed
        else:
            assert totals(db) == (0, 0, 0, 0, 0)  # what the journal exists for: without it all was lost
    finally:
        db.dispose()


async def test_a_kill_between_spool_and_journal_cleanup_counts_once(db: Database, tmp_path: Path) -> None:
    """Killed after the batch reached the spool (and even the database) but before its journal
    segment was removed: the segment's id is the batch's, so the replay counts it once."""
    ledger = ledger_for(db, tmp_path)
    await ledger.start()
    recs = records(40)
    for rec in recs:
        ledger.record(rec)
    assert ledger.journal is not None
    # What flush does, up to the point of the "kill": take + rotate, spool, apply; no discard.
    rows = ledger.aggregator.take()
    segment_id, segment = ledger.journal.rotate()
    batch = UsageBatch(segment_id, tuple(rows))
    Spool(ledger.spool.path).append([batch])
    assert apply_batch(db, batch)
    assert segment.exists()
    ledger.journal.abandon()  # the "kill"

    restarted = ledger_for(db, tmp_path)
    await restarted.start()
    await restarted.stop()
    assert totals(db) == expected(recs)
    assert not segment.exists()
    assert not ledger.spool.path.exists()


async def test_a_torn_journal_line_is_skipped_and_the_rest_recovered(db: Database, tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path / "j")
    journal.open()
    recs = records(10)
    for rec in recs:
        journal.write(rec)
    with open(tmp_path / "j" / f"{journal.segment_id}.jsonl", "ab") as fh:
        fh.write(b'["alpha","minilm","1",17676')  # power lost mid-write
    journal.abandon()
    found = UsageJournal(tmp_path / "j").open()
    assert len(found) == 1  # the first process's one segment
    batches = {b.batch_id: b for b, _ in found}
    batch = batches[journal.segment_id]
    assert sum(r.num_tokens for r in batch.rows) == sum(r.num_tokens for r in recs)
    assert sum(r.compute_ns for r in batch.rows) == sum(r.compute_ns for r in recs)


async def test_clean_stop_leaves_no_journal_and_nothing_twice(db: Database, tmp_path: Path) -> None:
    ledger = ledger_for(db, tmp_path)
    await ledger.start()
    recs = records(100)
    for i, rec in enumerate(recs):
        ledger.record(rec)
        if i % 25 == 0:
            await asyncio.sleep(0.06)  # let background flushes (and rotations) happen
    await ledger.stop()
    assert totals(db) == expected(recs)
    assert list(journal_dir(ledger.spool.path).glob("*.jsonl")) == []
    again = ledger_for(db, tmp_path)
    await again.start()
    await again.stop()
    assert totals(db) == expected(recs)
    assert again.num_recovered_batches == 0


# -- failures are counted, spooled and replayed ----------------------------------------------------


async def test_write_failures_are_counted_spooled_and_replayed(db: Database, tmp_path: Path) -> None:
    ledger = ledger_for(db, tmp_path, journal=False)
    await ledger.start()
    try:
        with db.begin() as conn:
            conn.execute(sa.text("ALTER TABLE usage_minutes RENAME TO usage_away"))  # every write now fails
        recs = records(30)
        for rec in recs[:15]:
            ledger.record(rec)
        assert not await ledger.flush()
        for rec in recs[15:]:
            ledger.record(rec)
        assert not await ledger.flush()
        assert not ledger.healthy
        assert ledger.num_failed_flushes >= 2
        assert ledger.num_spooled_batches == 2
        assert len(Spool(ledger.spool.path).read()) == 2
        with db.begin() as conn:
            conn.execute(sa.text("ALTER TABLE usage_away RENAME TO usage_minutes"))
        assert await ledger.flush()
        assert ledger.healthy
        assert ledger.num_replayed_batches == 2
    finally:
        await ledger.stop()
    assert totals(db) == expected(recs)


# -- deadlines -------------------------------------------------------------------------------------


async def test_call_with_deadline_gives_up_on_a_stuck_call() -> None:
    began = time.monotonic()
    with pytest.raises(DatabaseTimeout):
        await call_with_deadline(0.2, time.sleep, 3.0)
    assert time.monotonic() - began < 2.0  # the caller is free long before the call ends
    assert await call_with_deadline(2.0, sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await call_with_deadline(2.0, divmod, 1, 0)


# -- private files ---------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_database_spool_and_journal_are_private(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        home = tmp_path / "fresh" / "polyray"
        db = open_database(f"sqlite:///{home}/polyray.db")
        try:
            ledger = ledger_for(db, home)
            await ledger.start()
            ledger.record(records(1)[0])
            with db.begin() as conn:  # hold a write so the WAL and shared-memory files exist
                conn.execute(sa.text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
                assert _mode(Path(f"{home}/polyray.db-wal")) == 0o600
                assert _mode(Path(f"{home}/polyray.db-shm")) == 0o600
            assert _mode(home) == 0o700
            assert _mode(home / "polyray.db") == 0o600
            segment = next(journal_dir(ledger.spool.path).glob("*.jsonl"))
            assert _mode(segment) == 0o600 and _mode(segment.parent) == 0o700
            with db.begin() as conn:
                conn.execute(sa.text("ALTER TABLE usage_minutes RENAME TO usage_away"))
            await ledger.flush()  # fails: the batch stays in the spool
            assert _mode(ledger.spool.path) == 0o600
            with db.begin() as conn:
                conn.execute(sa.text("ALTER TABLE usage_away RENAME TO usage_minutes"))
            await ledger.stop()
        finally:
            db.dispose()

        # A file an older version left world-readable is narrowed on open.
        os.chmod(home / "polyray.db", 0o644)
        db = open_database(f"sqlite:///{home}/polyray.db")
        db.dispose()
        assert _mode(home / "polyray.db") == 0o600
    finally:
        os.umask(old_umask)


def test_a_journal_in_use_by_a_live_server_is_refused(tmp_path: Path) -> None:
    first = UsageJournal(tmp_path / "j")
    first.open()
    with pytest.raises(ConfigError, match="in use by another running server"):
        UsageJournal(tmp_path / "j").open()
    first.close()
    second = UsageJournal(tmp_path / "j")
    assert second.open() == []  # free again once the first let go (a killed process lets go too)
    second.close()


def test_db_timeout_is_bounded_and_the_keys_load_from_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="db_timeout_s"):
        TenancyConfig(db_timeout_s=0.1)
    with pytest.raises(ConfigError, match="db_timeout_s"):
        TenancyConfig(db_timeout_s=601)
    config = tmp_path / "polyray.toml"
    config.write_text("[tenancy]\ndb_timeout_s = 2.5\njournal = false\n")
    tenancy = load_settings(str(config)).tenancy
    assert (tenancy.db_timeout_s, tenancy.journal) == (2.5, False)
