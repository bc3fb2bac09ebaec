"""A network partition between ``polyray serve`` and its PostgreSQL ledger (issue 11, item 2).

A real server subprocess (dummy backend) reaches a real PostgreSQL only through the test's
forwarder (``postgres_support.Forwarder``). ``silence()`` makes the partition the issue found:
sockets stay open, the kernel acknowledges what the server sends, nothing comes back, so neither
TCP keepalive nor ``statement_timeout`` ever fires. The totals are then read from PostgreSQL
directly and compared with what the responses reported: every answered request's usage must be
in the ledger exactly once, after the database comes back or after a restart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres_support import Forwarder, Received, ServeProcess, usage_sums

from polyray.db.connection import Database

pytestmark = pytest.mark.integration

DB_TIMEOUT_S = 1.0
# SIGTERM: /readyz turns 503 for the drain grace, in-flight requests finish, then the ledger stops
# (at most about one db_timeout_s more in a partition). The server's drain limit is 30 s; the
# test allows that, with margin, though this takes a few seconds.
EXIT_LIMIT_S = 40.0


@pytest.fixture
def forwarder() -> Iterator[Forwarder]:
    fwd = Forwarder()
    yield fwd
    fwd.close()


def send(server: ServeProcess, num_requests: int, pause_s: float = 0.0) -> Received:
    got = Received()
    for i in range(num_requests):
        got.add(server.embed(num_texts=1 + i % 3))
        if pause_s:
            time.sleep(pause_s)
    return got


def wait_until(cond: object, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.1)


def assert_same_usage(ledger: Received, told: Received) -> None:
    assert (ledger.num_requests, ledger.num_texts, ledger.num_tokens) == (
        told.num_requests,
        told.num_texts,
        told.num_tokens,
    )
    # Compute is charged in ns; each response reports its share rounded to a microsecond.
    assert abs(ledger.compute_ms - told.compute_ms) <= 0.001 * told.num_requests + 0.01


def test_partition_then_recovery_loses_no_usage(
    db: Database, database: str, forwarder: Forwarder, tmp_path: Path
) -> None:
    server = ServeProcess(tmp_path / "home", f"postgresql://postgres@{forwarder.url}/{database}", DB_TIMEOUT_S)
    server.start()
    try:
        told = send(server, 30)
        wait_until(lambda: usage_sums(db).num_requests == told.num_requests, "the first usage to reach PostgreSQL")

        forwarder.silence()
        during = send(server, 60, pause_s=0.03)  # about 3 s of traffic into the partition
        assert during.num_failed == 0  # serving needs no database round trip
        told.add(during)
        wait_until(lambda: server.metric("polyray_ledger_up") == 0.0, "the ledger to notice the partition")
        assert server.metric("polyray_ledger_write_failures") >= 1
        assert server.metric("polyray_ledger_spool_batches") >= 1
        assert server.metric("polyray_db_call_timeouts") >= 1  # the silent calls were cut, not left hanging
        wait_until(lambda: server.metric("polyray_directory_refresh_failures") >= 1, "a failed client refresh")
        assert server.spool.exists()
        assert usage_sums(db).num_requests < told.num_requests  # the partition's usage is not there yet

        forwarder.heal()
        told.add(send(server, 30))
        wait_until(lambda: usage_sums(db).num_requests == told.num_requests, "the spool to drain after the partition")
        assert server.metric("polyray_ledger_up") == 1.0
        assert server.metric("polyray_ledger_replayed_batches") >= 1
        code, _ = server.terminate()
        assert code == 0
    finally:
        server.kill()
    assert_same_usage(usage_sums(db), told)
    assert not server.spool.exists()
    log = server.log()
    assert "Traceback" not in log, log  # an outage is a few warning lines, not a traceback a second
    assert log.count("usage ledger: database unavailable") == 1, log
    assert "usage ledger: database back" in log and "client directory: refresh works again" in log, log


def test_sigterm_in_a_partition_exits_and_a_restart_replays(
    db: Database, database: str, forwarder: Forwarder, tmp_path: Path
) -> None:
    url = f"postgresql://postgres@{forwarder.url}/{database}"
    server = ServeProcess(tmp_path / "home", url, DB_TIMEOUT_S)
    server.start()
    try:
        told = send(server, 20)
        wait_until(lambda: usage_sums(db).num_requests == told.num_requests, "the first usage to reach PostgreSQL")
        forwarder.silence()
        told.add(send(server, 40, pause_s=0.02))
        assert told.num_failed == 0
        # SIGTERM in the partition: a flush in progress may be stuck on a silent socket, and only
        # the deadline lets the process exit; the aggregate goes to the spool.
        code, exit_s = server.terminate(timeout_s=EXIT_LIMIT_S)
        assert code == 0, server.log()
        assert exit_s < EXIT_LIMIT_S
    finally:
        server.kill()
    assert usage_sums(db).num_requests < told.num_requests
    assert server.spool.exists()  # the partition's usage: fsynced in the spool

    forwarder.heal()
    again = ServeProcess(tmp_path / "home", url, DB_TIMEOUT_S)  # same home: same spool and journal
    again.start()
    try:
        wait_until(lambda: usage_sums(db).num_requests == told.num_requests, "the restart to replay the spool")
        code, _ = again.terminate()
        assert code == 0
    finally:
        again.kill()
    assert_same_usage(usage_sums(db), told)
    assert not again.spool.exists()
