"""A minimal HTTP/1.1 keep-alive load generator for loopback benchmarks.

It shares the machine's two cores with the server it measures, so it is written to cost as little
as possible per request: bodies are pre-encoded, each client keeps one connection, and responses
are stored raw and parsed only after the clock stops. It speaks just enough HTTP for polyray's
responses (Content-Length framing).
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

    @property
    def num_ok(self) -> int:
        return sum(1 for s in self.statuses if s == 200)


def _request(path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    status = int(status_line.split(b" ", 2)[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length)


async def run_load(host: str, port: int, path: str, bodies: list[bytes], concurrency: int) -> LoadResult:
    """Send every body once, ``concurrency`` requests in flight on as many connections."""
    requests = [_request(path, b) for b in bodies]
    latencies = [0.0] * len(bodies)
    statuses = [0] * len(bodies)
    responses = [b""] * len(bodies)
    next_index = iter(range(len(bodies)))

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for i in next_index:
                started = time.perf_counter()
                writer.write(requests[i])
                statuses[i], responses[i] = await _read_response(reader)
                latencies[i] = time.perf_counter() - started
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return LoadResult(time.perf_counter() - started, latencies, statuses, responses)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
