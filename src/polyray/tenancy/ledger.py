"""The usage ledger: per-request usage aggregated per (client, model, version, minute), written
to the database in batches, off the request path, without losing a row.

Write path: ``record`` adds a request's usage to the in-memory aggregate (O(1), event loop) and,
with the journal on, appends it to the local journal (``polyray.tenancy.journal``). Every
``flush_interval_s`` the aggregate becomes a *usage batch* with an id, is appended to the spool
file (one JSON line, fsynced) and written to the database in one transaction that also inserts
the batch id into ``usage_batches``; once written it leaves the spool. If the database cannot be
reached, or does not answer within ``db_timeout_s`` (each call has a client-side deadline, see
``polyray.db.connection``), the batch stays in the spool and is retried with backoff. A batch whose
commit outcome is unknown (a timed-out transaction may still commit later) is simply retried: the
id makes the second apply a no-op, so every row is counted exactly once. On start the spool (and
any journal a killed process left) is replayed first; on stop the aggregate is flushed to the
spool and, unless the database is known to be away, to the database.

What can be lost: with the journal, nothing on a kill of the process (SIGKILL included); on a
power loss or kernel crash, the records since the last flush (the journal is not fsynced per
record). Without the journal, a kill without a chance to stop loses the aggregate of the last
``flush_interval_s``; SIGTERM/SIGINT flush, in a partition too (within about ``db_timeout_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from polyray.db.connection import DEFAULT_DB_TIMEOUT_S, Database, call_with_deadline
from polyray.db.schema import usage, usage_batches
from polyray.types import UsageRecord

if TYPE_CHECKING:
    from polyray.tenancy.journal import UsageJournal

log = logging.getLogger(__name__)


@dataclass
class UsageRow:
    """One aggregate row: the sums of a (client, model, version, minute)."""

    client: str
    model: str
    version: str
    minute_s: int  # UTC epoch seconds of the minute's start
    num_requests: int = 0
    num_texts: int = 0
    num_cached: int = 0
    num_tokens: int = 0
    compute_ns: int = 0

    def key(self) -> tuple[str, str, str, int]:
        return (self.client, self.model, self.version, self.minute_s)

    def add(self, other: UsageRow) -> None:
        self.num_requests += other.num_requests
        self.num_texts += other.num_texts
        self.num_cached += other.num_cached
        self.num_tokens += other.num_tokens
        self.compute_ns += other.compute_ns


class UsageAggregator:
    """Sums records per (client, model, version, minute) until ``take`` empties it."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str, str, int], UsageRow] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, rec: UsageRecord) -> None:
        minute_s = int(rec.at_wall_s // 60) * 60
        key = (rec.client, rec.model, rec.version, minute_s)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = UsageRow(rec.client, rec.model, rec.version, minute_s)
        row.num_requests += rec.num_requests
        row.num_texts += rec.num_texts
        row.num_cached += rec.num_cached
        row.num_tokens += rec.num_tokens
        row.compute_ns += rec.compute_ns

    def take(self) -> list[UsageRow]:
        rows, self._rows = list(self._rows.values()), {}
        return rows


@dataclass(frozen=True)
class UsageBatch:
    batch_id: str
    rows: tuple[UsageRow, ...]

    def to_json(self) -> str:
        return json.dumps({"batch_id": self.batch_id, "rows": [asdict(r) for r in self.rows]})

    @staticmethod
    def from_json(line: str) -> UsageBatch:
        data = json.loads(line)
        return UsageBatch(data["batch_id"], tuple(UsageRow(**r) for r in data["rows"]))


def _minute(minute_s: int) -> datetime:
    return datetime.fromtimestamp(minute_s, UTC)


def apply_batch(db: Database, batch: UsageBatch) -> bool:
    """Add the batch's rows to the ledger once; False if this batch id was applied before."""
    insert = postgresql.insert if db.dialect.name == "postgresql" else sqlite.insert
    with db.begin() as conn:
        marker = insert(usage_batches).values(batch_id=batch.batch_id, applied_at=datetime.now(UTC))
        # RETURNING, not rowcount: psycopg reports rowcount -1 for INSERT ... ON CONFLICT DO NOTHING.
        done = conn.execute(
            marker.on_conflict_do_nothing(index_elements=["batch_id"]).returning(usage_batches.c.batch_id)
        )
        if done.first() is None:
            return False
        for row in batch.rows:
            values = {
                "client": row.client,
                "model": row.model,
                "version": row.version,
                "minute": _minute(row.minute_s),
                "num_requests": row.num_requests,
                "num_texts": row.num_texts,
                "num_cached": row.num_cached,
                "num_tokens": row.num_tokens,
                "compute_ns": row.compute_ns,
            }
            stmt = insert(usage).values(**values)
            sums = {c: usage.c[c] + stmt.excluded[c] for c in values if c.startswith("num_") or c == "compute_ns"}
            conn.execute(stmt.on_conflict_do_update(index_elements=["client", "model", "version", "minute"], set_=sums))
    return True


def _private(path: str, flags: int) -> int:
    """Open with mode 0600: the spool names clients and their usage."""
    return os.open(path, flags, 0o600)


class Spool:
    """Append-only JSON lines of batches not yet in the database; survives restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, batches: Iterable[UsageBatch]) -> None:
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, mode=0o700)
        with open(self.path, "a", encoding="utf-8", opener=_private) as fh:
            for batch in batches:
                fh.write(batch.to_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[UsageBatch]:
        if not self.path.exists():
            return []
        batches = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    batches.append(UsageBatch.from_json(line))
                except (ValueError, KeyError, TypeError):
                    log.error("usage spool %s: skipping a corrupt line (a crash mid-write?)", self.path)
        return batches

    def replace(self, batches: list[UsageBatch]) -> None:
        """Atomically rewrite the spool with ``batches`` (empty: remove it)."""
        if not batches:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8", opener=_private) as fh:
            fh.write("".join(b.to_json() + "\n" for b in batches))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


class UsageLedger:
    """Aggregates usage and writes it to the database in the background (see module docstring)."""

    def __init__(
        self,
        db: Database,
        spool_path: Path,
        flush_interval_s: float = 1.0,
        max_backoff_s: float = 30.0,
        on_flush: Callable[[int, bool], None] | None = None,
        db_timeout_s: float = DEFAULT_DB_TIMEOUT_S,
        journal: UsageJournal | None = None,
    ) -> None:
        self.db = db
        self.spool = Spool(spool_path)
        self.flush_interval_s = flush_interval_s
        self.max_backoff_s = max_backoff_s
        # The watchdog cuts a stuck call at db_timeout_s; this outer bound (for the rare call that
        # needs a reconnect on top) keeps a flush, and so shutdown, from ever waiting longer.
        self.call_timeout_s = db_timeout_s + 1.0
        self.journal = journal
        self.aggregator = UsageAggregator()
        self.on_flush = on_flush  # (rows written, ok) for metrics
        self._pending: list[UsageBatch] = []  # not yet in the database; mirrored in the spool
        self._missed: set[str] = set()  # pending batch ids that missed a write or come from a previous run
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        # Counters for /metrics (read at scrape time).
        self.num_failed_flushes = 0  # failed (or timed-out) batch writes
        self.num_spooled_batches = 0  # batches that missed their first write and waited in the spool
        self.num_replayed_batches = 0  # batches written from the spool (after an outage or a restart)
        self.num_recovered_batches = 0  # batches rebuilt from a killed process's journal
        self.healthy = True

    def record(self, rec: UsageRecord) -> None:
        self.aggregator.record(rec)
        if self.journal is not None:
            self.journal.write(rec)

    @property
    def num_pending_batches(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._pending = await asyncio.to_thread(self.spool.read)
        if self.journal is not None:
            found = await asyncio.to_thread(self.journal.open)
            known = {b.batch_id for b in self._pending}
            recovered = [b for b, _ in found if b.rows and b.batch_id not in known]
            if recovered:
                await asyncio.to_thread(self.spool.append, recovered)
                self._pending.extend(recovered)
                self.num_recovered_batches += len(recovered)
                log.warning(
                    "usage ledger: recovered %d batches from the journal of a process that was killed", len(recovered)
                )
            for _, path in found:
                self.journal.discard(path)  # in the spool now (or empty)
        self._missed = {b.batch_id for b in self._pending}
        if self._pending:
            log.info("usage ledger: replaying %d spooled batches", len(self._pending))
        await self.flush()
        self._task = asyncio.create_task(self._run(), name="usage-ledger")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task
        await self.flush(final=True)
        if self.journal is not None:
            self.journal.close()

    async def flush(self, final: bool = False) -> bool:
        """Write the aggregate and everything pending; True when nothing is left pending.

        ``final`` (stop): if the database is known to be away, the aggregate goes to the spool only,
        so a shutdown in a partition does not wait for another deadline."""
        async with self._lock:
            # Take the aggregate and rotate the journal in one synchronous step: the closed
            # segment holds exactly these rows, and lends the batch its id (journal docstring).
            rows = self.aggregator.take()
            closed = self.journal.rotate() if self.journal is not None else None
            if rows:
                batch = UsageBatch(closed[0] if closed is not None else str(uuid.uuid4()), tuple(rows))
                self._pending.append(batch)
                if not self.healthy:  # made in an outage: it waits in the spool
                    self._missed.add(batch.batch_id)
                    self.num_spooled_batches += 1
                await asyncio.to_thread(self.spool.append, [batch])
            if closed is not None and self.journal is not None:
                self.journal.discard(closed[1])  # fsynced in the spool now (or empty)
            if not self._pending:
                return True
            if final and not self.healthy:
                log.warning(
                    "usage ledger: stopping with the database away; %d batches stay in the spool for the next start",
                    len(self._pending),
                )
                return False
            written = await self._write_pending()
            ok = not self._pending
            if self.on_flush is not None:
                self.on_flush(written, ok)
            return ok

    async def _write_pending(self) -> int:
        """Apply pending batches in order, each within the deadline; stop at the first failure
        (kept, in the spool, for the next try)."""
        num_rows = num_batches = 0
        while self._pending:
            batch = self._pending[0]
            try:
                await call_with_deadline(self.call_timeout_s, apply_batch, self.db, batch)
            except Exception as exc:  # noqa: BLE001 - any database failure: keep the batch, retry later
                self.num_failed_flushes += 1
                for waiting in self._pending:
                    if waiting.batch_id not in self._missed:
                        self._missed.add(waiting.batch_id)
                        self.num_spooled_batches += 1
                if self.healthy:
                    log.warning(
                        "usage ledger: database unavailable (%s); spooling to %s and retrying",
                        _one_line(exc),
                        self.spool.path,
                    )
                self.healthy = False
                break
            if batch.batch_id in self._missed:
                self._missed.discard(batch.batch_id)
                self.num_replayed_batches += 1
            num_rows += len(batch.rows)
            num_batches += 1
            self._pending.pop(0)
        if not self._pending and not self.healthy:
            log.warning(
                "usage ledger: database back; spool drained (%d write failures so far)", self.num_failed_flushes
            )
            self.healthy = True
        if num_batches:
            await asyncio.to_thread(self.spool.replace, list(self._pending))
        return num_rows

    async def _run(self) -> None:
        backoff_s = self.flush_interval_s
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=backoff_s)
            if self._stopping.is_set():
                return
            ok = await self.flush()
            backoff_s = self.flush_interval_s if ok else min(self.max_backoff_s, max(backoff_s * 2, 0.5))


def _one_line(exc: BaseException) -> str:
    """A database error as one short line (psycopg's messages span lines and carry the SQL)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def compute_s_today(db: Database, now_wall_s: float | None = None) -> dict[str, float]:
    """Compute-seconds each client has been charged today (UTC), for the daily budget after a restart."""
    now_wall_s = time.time() if now_wall_s is None else now_wall_s
    day_start = _minute(int(now_wall_s // 86_400) * 86_400)
    with db.connect() as conn:
        rows = conn.execute(
            sa.select(usage.c.client, sa.func.sum(usage.c.compute_ns))
            .where(usage.c.minute >= day_start, usage.c.minute < day_start + timedelta(days=1))
            .group_by(usage.c.client)
        )
        return {client: int(ns or 0) / 1e9 for client, ns in rows}
