"""Hard-kill bench: how much usage a SIGKILL loses with and without the usage journal, and what
the journal costs per request (issue 11, item 7).

.venv/bin/python bench/reliability/hard_kill.py [--rounds 3] [--kill-after-s 4] [--cost-phase-s 8]

1. Loss: a real ``polyray serve`` (dummy backend, SQLite ledger in a throw-away home, flush every
   1 s) gets closed-loop load from ``--concurrency`` clients; SIGKILL after ``--kill-after-s``;
   the server is started again on the same home (replays spool and journal) and stopped with
   SIGTERM; the ledger's totals are compared with what the clients received. Journal on and off
   take turns, ``--rounds`` each.
2. Cost over HTTP: two servers (journal on, journal off) side by side, loaded in turns for
   ``--cost-phase-s`` each, ``--rounds`` times; answered requests/s and p50 latency, and their ratio.
3. Cost in process: ``UsageLedger.record`` with and without the journal (microseconds per record).

"lost" is usage the clients received that the ledger does not have; "extra" is usage charged for
requests whose answers the kill cut off (at most one per client).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import time
from pathlib import Path

from _common import percentile
from common import Load
from postgres_support import Received, ServeProcess, usage_sums

from polyray.db.connection import open_database
from polyray.tenancy.journal import UsageJournal
from polyray.tenancy.ledger import UsageLedger, UsageRecord


def sqlite_url(home: Path) -> str:
    return f"sqlite:///{home}/polyray.db"


def kill_round(tmp: Path, journal: bool, args: argparse.Namespace) -> tuple[Received, Received]:
    home = tmp / f"kill-{'on' if journal else 'off'}-{time.monotonic_ns()}"
    server = ServeProcess(home, sqlite_url(home), flush_interval_s=1.0, journal=journal)
    server.start()
    load = Load(server, args.concurrency)
    load.start()
    try:
        time.sleep(args.kill_after_s)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=30)
        time.sleep(0.3)
    finally:
        told = load.stop()
        server.kill()
    again = ServeProcess(home, sqlite_url(home), flush_interval_s=1.0, journal=journal)
    again.start()
    again.terminate()
    db = open_database(sqlite_url(home))
    try:
        return told, usage_sums(db)
    finally:
        db.dispose()


def cost_phase(server: ServeProcess, args: argparse.Namespace) -> tuple[float, float]:
    load = Load(server, args.concurrency)
    load.start()
    time.sleep(1.0)  # warm
    start = load.snapshot().num_requests
    began = time.monotonic()
    n0 = len(load.latencies_s)
    time.sleep(args.cost_phase_s)
    done = load.snapshot().num_requests - start
    took_s = time.monotonic() - began
    latencies = load.latencies_s[n0:]
    load.stop()
    return done / took_s, percentile(latencies, 50) * 1000


def record_cost_us(journal_dir: Path | None, num_records: int) -> float:
    db = open_database("sqlite:///:memory:")
    journal = UsageJournal(journal_dir) if journal_dir is not None else None
    if journal is not None:
        journal.open()
    ledger = UsageLedger(db, Path("unused-spool.jsonl"), journal=journal)  # record() never touches the spool
    recs = [UsageRecord(f"client{i % 7}", "minilm", "1", 1.767e9 + i * 0.001, 1, 2, 0, 30, 123456) for i in range(1000)]
    began = time.perf_counter()
    for i in range(num_records):
        ledger.record(recs[i % 1000])
        if i % 20_000 == 19_999:
            ledger.aggregator.take()
            if journal is not None:
                journal.discard(journal.rotate()[1])
    took_s = time.perf_counter() - began
    if journal is not None:
        journal.discard(journal.rotate()[1])
        journal.close()
    db.dispose()
    return took_s / num_records * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--kill-after-s", type=float, default=4.0)
    parser.add_argument("--cost-phase-s", type=float, default=8.0)
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="polyray-hardkill-") as tmp_name:
        tmp = Path(tmp_name)
        print(f"1. SIGKILL after {args.kill_after_s} s of load ({args.concurrency} clients), restart, compare")
        for r in range(args.rounds):
            for journal in (True, False):
                told, ledger = kill_round(tmp, journal, args)
                lost = max(0, told.num_requests - ledger.num_requests)
                extra = max(0, ledger.num_requests - told.num_requests)
                print(
                    f"   round {r + 1} journal {'on ' if journal else 'off'}: clients got {told.num_requests}, "
                    f"ledger has {ledger.num_requests}: lost {lost}, extra {extra}"
                )

        print(f"2. cost over HTTP: journal on vs off, {args.cost_phase_s} s phases in turns")
        servers = {
            on: ServeProcess(tmp / f"cost-{on}", sqlite_url(tmp / f"cost-{on}"), flush_interval_s=1.0, journal=on)
            for on in (True, False)
        }
        for server in servers.values():
            server.start()
        rates: dict[bool, list[float]] = {True: [], False: []}
        p50s: dict[bool, list[float]] = {True: [], False: []}
        try:
            for r in range(args.rounds):
                for on in (False, True) if r % 2 else (True, False):
                    rate, p50 = cost_phase(servers[on], args)
                    rates[on].append(rate)
                    p50s[on].append(p50)
                    print(f"   round {r + 1} journal {'on ' if on else 'off'}: {rate:.0f} requests/s, p50 {p50:.2f} ms")
        finally:
            for server in servers.values():
                server.terminate()
        on_rate, off_rate = sum(rates[True]), sum(rates[False])
        print(
            f"   all: on {on_rate / args.rounds:.0f} requests/s vs off {off_rate / args.rounds:.0f}: "
            f"ratio {on_rate / off_rate:.3f}; p50 ratio {statistics.median(p50s[True]) / statistics.median(p50s[False]):.3f}"
        )

        print(f"3. cost in process: UsageLedger.record x {args.records}, in turns")
        costs: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.rounds):
            costs[False].append(record_cost_us(None, args.records))
            costs[True].append(record_cost_us(tmp / f"journal-{r}" / "j", args.records))
        on_us, off_us = min(costs[True]), min(costs[False])
        print(
            f"   record(): {off_us:.2f} us without the journal, {on_us:.2f} us with it "
            f"(+{on_us - off_us:.2f} us per record; best of {args.rounds})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
