"""A minimal HTTP/1.1 keep-alive load generator for loopback benchmarks.

It shares the machine's two cores with the server it measures, so it is written to cost as little
as possible per request: bodies are pre-encoded, each client keeps one connection, and responses
are stored raw and parsed only after the clock stops. It speaks just enough HTTP for polyray's
responses (Content-Length framing).

A refusal (429/503) that carries ``Retry-After-Ms`` is sent again after that wait, as OpenAI's SDK
and ``polyray.Client`` do: the server refuses what it cannot serve within its queueing bound
(README, *Overload*), and a client that retries when told is what a benchmark should model. The
latency is from the first send to the final answer; ``num_retries`` counts the refusals.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass


@dataclass
class LoadResult:
    elapsed_s: float
    latencies_s: list[float]
    statuses: list[int]
    bodies: list[bytes]  # index i answers request i
    num_retries: int = 0  # refusals waited out and sent again

    @property
    def num_ok(self) -> int:
        return sum(1 for s in self.statuses if s == 200)


def _request(path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


MAX_RETRIES = 50  # per request: a refusal loop that never ends is a failure, not a wait


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, float | None]:
    """(status, body, Retry-After-Ms in seconds or None)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    status = int(status_line.split(b" ", 2)[1])
    length = 0
    retry_after_s: float | None = None
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value.strip())
        elif key == b"retry-after-ms":
            retry_after_s = int(value.strip()) / 1000.0
    return status, await reader.readexactly(length), retry_after_s


async def run_load(host: str, port: int, path: str, bodies: list[bytes], concurrency: int) -> LoadResult:
    """Send every body once, ``concurrency`` requests in flight on as many connections."""
    requests = [_request(path, b) for b in bodies]
    latencies = [0.0] * len(bodies)
    statuses = [0] * len(bodies)
    responses = [b""] * len(bodies)
    next_index = iter(range(len(bodies)))
    num_retries = 0

    async def client() -> None:
        nonlocal num_retries
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for i in next_index:
                started = time.perf_counter()
                for attempt in range(MAX_RETRIES + 1):
                    writer.write(requests[i])
                    statuses[i], responses[i], retry_after_s = await _read_response(reader)
                    if statuses[i] not in (429, 503) or retry_after_s is None or attempt == MAX_RETRIES:
                        break
                    num_retries += 1
                    await asyncio.sleep(retry_after_s)
                latencies[i] = time.perf_counter() - started
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return LoadResult(time.perf_counter() - started, latencies, statuses, responses, num_retries)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
