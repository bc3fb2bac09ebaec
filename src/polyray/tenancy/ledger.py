"""The usage ledger: per-request usage aggregated per (client, model, version, minute), written
to the database in batches, off the request path, without losing a row.

Write path: ``record`` adds a request's usage to the in-memory aggregate (O(1), event loop).
Every ``flush_interval_s`` the aggregate becomes a *usage batch* with a UUID and is written in
one transaction that also inserts the batch id into ``usage_batches``. If the database cannot
be reached, the batch is appended to the spool file (one JSON line, fsynced) and retried with
backoff; a batch whose commit outcome is unknown is simply retried: the id makes the second
apply a no-op, so every row is counted exactly once. On start the spool is replayed first; on
stop the aggregate is flushed, to the database or, if that is down, to the spool.

What can be lost: only the aggregate of the last ``flush_interval_s`` if the process is killed
without a chance to stop (SIGKILL, power loss); SIGTERM/SIGINT flush.
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

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from polyray.tenancy.schema import usage, usage_batches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsageRecord:
    """Usage to add to a client's account: one answered request, or a compute charge alone.

    The engine charges compute where it is measured (per batch, per tokenization) with
    ``num_requests=0`` records, so compute is charged even for a request whose caller left, and
    the charged total equals the measured total exactly.
    """

    client: str
    model: str
    version: str
    at_wall_s: float
    num_requests: int = 0
    num_texts: int = 0
    num_cached: int = 0
    num_tokens: int = 0
    compute_ns: int = 0


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


def apply_batch(engine: Engine, batch: UsageBatch) -> bool:
    """Add the batch's rows to the ledger once; False if this batch id was applied before."""
    insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    with engine.begin() as conn:
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


class Spool:
    """Append-only JSON lines of batches not yet in the database; survives restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, batches: Iterable[UsageBatch]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
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
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("".join(b.to_json() + "\n" for b in batches))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


class UsageLedger:
    """Aggregates usage and writes it to the database in the background (see module docstring)."""

    def __init__(
        self,
        engine: Engine,
        spool_path: Path,
        flush_interval_s: float = 1.0,
        max_backoff_s: float = 30.0,
        on_flush: Callable[[int, bool], None] | None = None,
    ) -> None:
        self.engine = engine
        self.spool = Spool(spool_path)
        self.flush_interval_s = flush_interval_s
        self.max_backoff_s = max_backoff_s
        self.aggregator = UsageAggregator()
        self.on_flush = on_flush  # (rows written, ok) for metrics
        self._pending: list[UsageBatch] = []  # not yet in the database; mirrored in the spool
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self.num_failed_flushes = 0
        self.healthy = True

    def record(self, rec: UsageRecord) -> None:
        self.aggregator.record(rec)

    @property
    def num_pending_batches(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._pending = self.spool.read()
        if self._pending:
            log.info("usage ledger: replaying %d spooled batches", len(self._pending))
        await self.flush()
        self._task = asyncio.create_task(self._run(), name="usage-ledger")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task
        await self.flush()

    async def flush(self) -> bool:
        """Write the aggregate and everything pending; True when nothing is left pending."""
        async with self._lock:
            rows = self.aggregator.take()
            if rows:
                batch = UsageBatch(str(uuid.uuid4()), tuple(rows))
                self._pending.append(batch)
                await asyncio.to_thread(self.spool.append, [batch])
            if not self._pending:
                return True
            written = await asyncio.to_thread(self._write_pending)
            ok = not self._pending
            if self.on_flush is not None:
                self.on_flush(written, ok)
            return ok

    def _write_pending(self) -> int:
        """Apply pending batches in order; stop at the first failure (kept for the next try)."""
        num_rows = 0
        while self._pending:
            batch = self._pending[0]
            try:
                apply_batch(self.engine, batch)
            except Exception as exc:  # noqa: BLE001 - any database failure: keep the batch, retry later
                self.num_failed_flushes += 1
                if self.healthy:
                    log.warning("usage ledger: database unavailable (%s); spooling and retrying", exc)
                self.healthy = False
                break
            num_rows += len(batch.rows)
            self._pending.pop(0)
        if not self._pending:
            if not self.healthy:
                log.info("usage ledger: database back; spool drained")
            self.healthy = True
        self.spool.replace(self._pending)
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


def compute_s_today(engine: Engine, now_wall_s: float | None = None) -> dict[str, float]:
    """Compute-seconds each client has been charged today (UTC), for the daily budget after a restart."""
    now_wall_s = time.time() if now_wall_s is None else now_wall_s
    day_start = _minute(int(now_wall_s // 86_400) * 86_400)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(usage.c.client, sa.func.sum(usage.c.compute_ns))
            .where(usage.c.minute >= day_start, usage.c.minute < day_start + timedelta(days=1))
            .group_by(usage.c.client)
        )
        return {client: int(ns or 0) / 1e9 for client, ns in rows}
