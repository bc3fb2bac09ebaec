"""PostgreSQL partition bench: a real ``polyray serve`` whose ledger database goes silent (sockets
open, nothing forwarded: the partition of issue 11) while clients keep sending.

.venv/bin/python bench/reliability/partition.py [--phase-s 5] [--concurrency 8] [--db-timeout-s 5]

Three scenarios, each against a fresh PostgreSQL database (127.0.0.1:5432) behind the bench's
forwarder, dummy backend, loopback only, bounded in time:

1. recovery: load, partition, load, heal, load; then the ledger's totals against what the clients
   were told (answered requests, texts, tokens), how long the ledger took to notice and to drain;
2. SIGTERM in the partition: the exit time and code, then a restart with the database back;
3. SIGKILL in the partition (journal on): a restart with the database back.

"lost" is usage the clients received that is not in the ledger; "extra" is usage the server
charged for requests whose answers the kill cut off (at most one per client).
"""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
from common import Load
from postgres_support import ADMIN_URL, Forwarder, Received, ServeProcess, database_url, usage_sums

from polyray.db.connection import open_database


def wait_until(cond: object, timeout_s: float) -> float | None:
    began = time.monotonic()
    while not cond():  # type: ignore[operator]
        if time.monotonic() - began > timeout_s:
            return None
        time.sleep(0.05)
    return time.monotonic() - began


def compare(name: str, ledger: Received, told: Received) -> str:
    lost = max(0, told.num_requests - ledger.num_requests)
    extra = max(0, ledger.num_requests - told.num_requests)
    same = (ledger.num_texts, ledger.num_tokens) == (told.num_texts, told.num_tokens)
    return (
        f"{name}: clients got {told.num_requests} answers ({told.num_failed} failed); ledger has "
        f"{ledger.num_requests} requests -> lost {lost}, extra {extra}; texts/tokens equal: {same}"
    )


def scenario_recovery(args: argparse.Namespace, fwd: Forwarder, url: str, direct: sa.Engine, home: Path) -> None:
    server = ServeProcess(home, url, args.db_timeout_s, flush_interval_s=1.0)
    server.start()
    load = Load(server, args.concurrency)
    load.start()
    try:
        time.sleep(args.phase_s)
        before = load.snapshot()
        fwd.silence()
        began = time.monotonic()
        noticed_s = wait_until(lambda: server.metric("polyray_ledger_up") == 0.0, 60)
        time.sleep(max(0.0, args.phase_s - (time.monotonic() - began)))
        during = load.snapshot()
        fwd.heal()
        time.sleep(args.phase_s)
        told = load.stop()
        drained_s = wait_until(lambda: usage_sums(direct).num_requests >= told.num_requests, 120)
        metrics = {
            m: server.metric(m)
            for m in (
                "polyray_ledger_write_failures",
                "polyray_ledger_spooled_batches",
                "polyray_ledger_replayed_batches",
                "polyray_db_call_timeouts",
            )
        }
        code, exit_s = server.terminate()
    finally:
        load.stop()
        server.kill()
    print("1. partition, then recovery")
    print(
        f"   answered: {before.num_requests} before, {during.num_requests - before.num_requests} during the "
        f"partition ({during.num_failed} failed), {told.num_requests - during.num_requests} after"
    )
    print(
        f"   the ledger noticed the partition after {noticed_s or float('nan'):.1f} s (db_timeout_s {args.db_timeout_s})"
    )
    print(f"   spool drained {drained_s:.1f} s after the load stopped; {metrics}")
    print(f"   SIGTERM: exit {code} in {exit_s:.1f} s")
    print("   " + compare("usage", usage_sums(direct), told))


def restart_and_replay(
    args: argparse.Namespace, fwd: Forwarder, url: str, direct: sa.Engine, home: Path, num_told: int
) -> tuple[int, float | None]:
    """After the server died in the partition: (requests the ledger held then, seconds after the
    restart, with the database back, until every told request is in it; None if never)."""
    in_db = usage_sums(direct).num_requests
    fwd.heal()
    again = ServeProcess(home, url, args.db_timeout_s)
    again.start()
    replay_s = wait_until(lambda: usage_sums(direct).num_requests >= num_told, 120)
    again.terminate()
    return in_db, replay_s


def scenario_sigterm(args: argparse.Namespace, fwd: Forwarder, url: str, direct: sa.Engine, home: Path) -> None:
    server = ServeProcess(home, url, args.db_timeout_s, flush_interval_s=1.0)
    server.start()
    load = Load(server, args.concurrency)
    load.start()
    try:
        time.sleep(args.phase_s)
        fwd.silence()
        time.sleep(args.phase_s)
        told = load.stop()
        code, exit_s = server.terminate(timeout_s=120)
    finally:
        load.stop()
        server.kill()
    in_db, replay_s = restart_and_replay(args, fwd, url, direct, home, told.num_requests)
    print("2. SIGTERM in the partition, restart with the database back")
    print(f"   SIGTERM: exit {code} in {exit_s:.1f} s; the ledger had {in_db} of {told.num_requests} requests")
    print(f"   after the restart: replayed {replay_s or float('nan'):.1f} s after ready")
    print("   " + compare("usage", usage_sums(direct), told))


def scenario_sigkill(args: argparse.Namespace, fwd: Forwarder, url: str, direct: sa.Engine, home: Path) -> None:
    server = ServeProcess(home, url, args.db_timeout_s, flush_interval_s=1.0, journal=True)
    server.start()
    load = Load(server, args.concurrency)
    load.start()
    try:
        time.sleep(args.phase_s)
        fwd.silence()
        time.sleep(args.phase_s)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=30)
        time.sleep(0.5)
        told = load.stop()
    finally:
        load.stop()
        server.kill()
    in_db, replay_s = restart_and_replay(args, fwd, url, direct, home, told.num_requests)
    print("3. SIGKILL in the partition (journal on), restart with the database back")
    print(
        f"   the ledger had {in_db} of {told.num_requests} requests at the kill; replayed {replay_s or float('nan'):.1f} s after ready"
    )
    print("   " + compare("usage", usage_sums(direct), told))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase-s", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--db-timeout-s", type=float, default=5.0)
    args = parser.parse_args()
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    for scenario in (scenario_recovery, scenario_sigterm, scenario_sigkill):
        name = f"polyray_bench_{secrets.token_hex(6)}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        fwd = Forwarder()
        direct = open_database(database_url(name))
        try:
            with tempfile.TemporaryDirectory(prefix="polyray-partition-") as tmp:
                scenario(args, fwd, f"postgresql://postgres@{fwd.url}/{name}", direct, Path(tmp) / "home")
        finally:
            direct.dispose()
            fwd.close()
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        sys.stdout.flush()
    admin.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
