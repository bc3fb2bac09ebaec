"""``bench/fairness``: does a flooding client hurt a well-behaved one?

One ``polyray serve`` (the packaged MiniLM, real torch, real client database) with two clients:

- **B**, interactive, sends a steady open-loop load: one request of ``b_texts`` texts every
  ``1 / b_rate`` seconds (about 40 % of the server's capacity by default);
- **A**, batch class, floods at ``flood_factor`` × its fair share of the measured capacity
  (open loop: requests go out on schedule whatever the answers, as a runaway job would).

Phases, in one run: (1) measure capacity (A alone, closed loop); (2) B alone; (3) B while A
floods. It prints B's p50/p99 in both phases and the ratio p99(flood) / p99(alone), plus what A
got. All texts are distinct so no cache could help either side.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from polyray.benchmarks.corpus import make_corpus
from polyray.benchmarks.loadgen import _read_response, percentile
from polyray.benchmarks.server import free_port, start_server, stop_server
from polyray.config import default_threads
from polyray.db.connection import open_database
from polyray.tenancy.model import CLASS_WEIGHT, PriorityClass
from polyray.tenancy.store import ClientStore


@dataclass(frozen=True)
class FairnessOptions:
    b_texts: int = 32
    b_load_fraction: float = 0.4  # B's steady load as a fraction of the measured capacity
    phase_s: float = 40.0
    flood_factor: float = 10.0
    a_texts: int = 16
    calibrate_s: float = 10.0
    threads: int | None = None
    json_out: str | None = None


@dataclass
class PhaseResult:
    latencies_ms: list[float] = field(default_factory=list)
    sent_at_s: list[float] = field(default_factory=list)  # when each answered request was sent, from the phase start
    statuses: dict[int, int] = field(default_factory=dict)

    def add(self, status: int, latency_s: float, sent_at_s: float = 0.0) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.latencies_ms.append(latency_s * 1000)
            self.sent_at_s.append(sent_at_s)

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


@dataclass
class FairnessReport:
    options: FairnessOptions
    capacity_texts_per_s: float = 0.0
    b_rate_per_s: float = 0.0
    a_share: float = 0.0
    a_offered_texts_per_s: float = 0.0
    a_served_texts_per_s: float = 0.0
    b_alone: PhaseResult = field(default_factory=PhaseResult)
    b_flood: PhaseResult = field(default_factory=PhaseResult)
    a_flood: PhaseResult = field(default_factory=PhaseResult)

    @property
    def ratio(self) -> float:
        return self.b_flood.p(99) / self.b_alone.p(99)

    def __str__(self) -> str:
        o = self.options
        b_load = o.b_texts * self.b_rate_per_s
        lines = [
            f"fairness bench: capacity {self.capacity_texts_per_s:.1f} texts/s (A alone, closed loop)",
            f"B (interactive, share 1): {self.b_rate_per_s:.2f} req/s x {o.b_texts} texts = {b_load:.0f} texts/s "
            f"({b_load / self.capacity_texts_per_s:.0%} of capacity), open loop, {o.phase_s:g} s per phase",
            f"A (batch, share 1): fair share {self.a_share:.0%} of capacity; floods at {o.flood_factor:g}x it = "
            f"{self.a_offered_texts_per_s:.0f} texts/s offered, {self.a_served_texts_per_s:.1f} texts/s served; "
            f"A statuses {dict(sorted(self.a_flood.statuses.items()))}",
            f"{'phase':<14} {'B requests':>10} {'B p50 ms':>9} {'B p99 ms':>9} {'B max ms':>9}  statuses",
        ]
        for name, phase in (("B alone", self.b_alone), ("B + A flood", self.b_flood)):
            lines.append(
                f"{name:<14} {len(phase.latencies_ms):>10} {phase.p(50):>9.1f} {phase.p(99):>9.1f} "
                f"{max(phase.latencies_ms, default=float('nan')):>9.1f}  {dict(sorted(phase.statuses.items()))}"
            )
        lines.append(f"B p99 with A flooding / B p99 alone = {self.ratio:.2f}  (goal <= 1.5)")
        return "\n".join(lines)


class Pool:
    """Keep-alive HTTP/1.1 connections to the server, opened on demand (open-loop senders need many)."""

    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.key = key
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, body: bytes) -> tuple[int, float]:
        """(status, latency_s); status 0 when the connection failed. A pooled connection the server
        closed while idle (keep-alive timeout) is replaced and the request sent again."""
        request = (
            f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {self.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        started = time.perf_counter()
        for attempt in range(2):
            reused = bool(self._idle) and attempt == 0
            conn = self._idle.pop() if reused else await asyncio.open_connection("127.0.0.1", self.port)
            try:
                conn[1].write(request)
                status, _, _ = await _read_response(conn[0])
            except (ConnectionError, asyncio.IncompleteReadError):
                conn[1].close()
                if reused:
                    continue
                return 0, time.perf_counter() - started
            self._idle.append(conn)
            return status, time.perf_counter() - started
        return 0, time.perf_counter() - started

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


def _bodies(num_requests: int, texts_per_request: int, seed: int) -> list[bytes]:
    corpus = make_corpus(num_requests * texts_per_request, seed=seed)
    return [
        orjson.dumps({"model": "minilm", "input": corpus[i * texts_per_request : (i + 1) * texts_per_request]})
        for i in range(num_requests)
    ]


async def _open_loop(pool: Pool, bodies: list[bytes], rate_per_s: float, duration_s: float, out: PhaseResult) -> None:
    """Send ``bodies`` in order at ``rate_per_s`` for ``duration_s``, not waiting for answers."""
    tasks: list[asyncio.Task[None]] = []

    started = time.perf_counter()

    async def one(body: bytes) -> None:
        sent_at_s = time.perf_counter() - started
        status, latency_s = await pool.post(body)
        out.add(status, latency_s, sent_at_s)

    for i, body in enumerate(bodies):
        due = started + i / rate_per_s
        if due - started >= duration_s:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(one(body)))
    await asyncio.gather(*tasks)


async def _closed_loop(pool: Pool, bodies: list[bytes], concurrency: int, duration_s: float) -> int:
    """Texts answered by ``concurrency`` back-to-back senders in ``duration_s``."""
    it = iter(bodies)
    num_texts = 0
    end = time.perf_counter() + duration_s

    async def sender() -> None:
        nonlocal num_texts
        for body in it:
            if time.perf_counter() >= end:
                return
            status, _ = await pool.post(body)
            if status == 200:
                num_texts += len(orjson.loads(body)["input"])

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return num_texts


def _start_server(home: Path, threads: int, port: int) -> subprocess.Popen[bytes]:
    return start_server(
        home,
        f'[server]\nmax_queue_items = 2048\n\n[tenancy]\ndatabase_url = "sqlite:///{home}/polyray.db"\n'
        f'bootstrap = false\n\n[[models]]\nname = "minilm"\nversion = "1"\nthreads = {threads}\n',
        port,
    )


async def _run(opts: FairnessOptions, port: int, key_a: str, key_b: str, report: FairnessReport) -> None:
    pool_a, pool_b = Pool(port, key_a), Pool(port, key_b)
    await _closed_loop(pool_b, _bodies(4, opts.b_texts, seed=4), 1, 60.0)  # warm-up
    # (1) capacity: A alone, enough concurrency to keep batches full.
    cal_bodies = _bodies(int(opts.calibrate_s * 400 / opts.a_texts) + 64, opts.a_texts, seed=2)
    started = time.perf_counter()
    num_texts = await _closed_loop(pool_a, cal_bodies, 8, opts.calibrate_s)
    report.capacity_texts_per_s = num_texts / (time.perf_counter() - started)
    report.b_rate_per_s = opts.b_load_fraction * report.capacity_texts_per_s / opts.b_texts
    num_b = int(opts.phase_s * report.b_rate_per_s) + 1
    b_bodies = _bodies(2 * num_b, opts.b_texts, seed=1)
    # (2) B alone.
    await _open_loop(pool_b, b_bodies[:num_b], report.b_rate_per_s, opts.phase_s, report.b_alone)
    # (3) B while A floods at flood_factor x its fair share.
    weights = {"a": CLASS_WEIGHT[PriorityClass.BATCH], "b": CLASS_WEIGHT[PriorityClass.INTERACTIVE]}
    report.a_share = weights["a"] / sum(weights.values())
    report.a_offered_texts_per_s = opts.flood_factor * report.a_share * report.capacity_texts_per_s
    a_rate = report.a_offered_texts_per_s / opts.a_texts
    flood_s = opts.phase_s + 10.0
    a_bodies = _bodies(int(flood_s * a_rate) + 1, opts.a_texts, seed=3)
    flood = asyncio.create_task(_open_loop(pool_a, a_bodies, a_rate, flood_s, report.a_flood))
    await asyncio.sleep(5.0)  # let A's backlog build up first
    a_before = report.a_flood.statuses.get(200, 0)
    started = time.perf_counter()
    await _open_loop(pool_b, b_bodies[num_b:], report.b_rate_per_s, opts.phase_s, report.b_flood)
    a_served = report.a_flood.statuses.get(200, 0) - a_before
    report.a_served_texts_per_s = a_served * opts.a_texts / (time.perf_counter() - started)
    await flood
    pool_a.close()
    pool_b.close()


def run_fairness_bench(opts: FairnessOptions) -> FairnessReport:
    threads = opts.threads or default_threads()
    home = Path(tempfile.mkdtemp(prefix="polyray-fairness-"))
    store = ClientStore(open_database(f"sqlite:///{home}/polyray.db"))
    _, key_a = store.create_client("flooder-a", PriorityClass.BATCH, 1.0)
    _, key_b = store.create_client("steady-b", PriorityClass.INTERACTIVE, 1.0)
    store.db.dispose()
    port = free_port()
    server = _start_server(home, threads, port)
    report = FairnessReport(opts)
    try:
        asyncio.run(_run(opts, port, key_a, key_b, report))
    finally:
        stop_server(server)
    if opts.json_out:
        Path(opts.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json_out).write_text(json.dumps({**asdict(report), "ratio": report.ratio}, indent=2))
    return report
