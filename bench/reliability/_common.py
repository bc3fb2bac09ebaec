"""Shared by large_text.py, overload.py and flood.py: a real ``polyray serve``, clients, raw HTTP.

Each bench starts one server subprocess on 127.0.0.1 (``polyray.benchmarks.server``) with the
packaged MiniLM (torch), a throw-away SQLite client database holding the clients it needs, and
talks to it over keep-alive HTTP/1.1 connections from asyncio, recording for every request its
status, latency, Retry-After and body. The load generator shares the machine's cores with the
server, so it is kept cheap: bodies are encoded before the clock starts.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from polyray.benchmarks.corpus import make_corpus
from polyray.benchmarks.loadgen import percentile
from polyray.benchmarks.server import free_port, start_server, stop_server
from polyray.db.connection import open_database
from polyray.tenancy.model import PriorityClass
from polyray.tenancy.store import ClientStore


@dataclass(frozen=True)
class Answer:
    status: int  # 0: the connection failed
    latency_s: float
    sent_at_s: float  # from the start of the phase
    retry_after: str | None = None
    body: bytes = b""
    queue_ms: float = float("nan")  # the server's own account (X-Polyray-Queue-Ms), when it computed
    inference_ms: float = float("nan")


@dataclass
class Server:
    port: int
    pid: int
    keys: dict[str, str]
    home: Path

    def rss_bytes(self) -> int:
        """Resident memory of the server process (``/proc``), for the no-growth check."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


def server_config(home: Path, extra: str = "", threads: int | None = None) -> str:
    model_threads = f"threads = {threads}\n" if threads else ""
    return (
        f'[tenancy]\ndatabase_url = "sqlite:///{home}/polyray.db"\nbootstrap = false\n\n'
        f"[cache]\nenabled = false\n\n{extra}\n"
        f'[[models]]\nname = "minilm"\nversion = "1"\n{model_threads}'
    )


@contextmanager
def running_server(
    clients: dict[str, PriorityClass], extra_config: str = "", threads: int | None = None
) -> Iterator[Server]:
    """A ``polyray serve`` with ``clients`` (name -> class, share 1), stopped (SIGTERM) on exit."""
    home = Path(tempfile.mkdtemp(prefix="polyray-reliability-"))
    store = ClientStore(open_database(f"sqlite:///{home}/polyray.db"))
    keys = {name: store.create_client(name, priority, 1.0)[1] for name, priority in clients.items()}
    store.db.dispose()
    port = free_port()
    proc: subprocess.Popen[bytes] = start_server(home, server_config(home, extra_config, threads), port)
    try:
        yield Server(port, proc.pid, keys, home)
    finally:
        stop_server(proc)


def bodies(num_requests: int, texts_per_request: int, seed: int) -> list[bytes]:
    """Distinct generated English sentences (no cache could help), pre-encoded request bodies."""
    corpus = make_corpus(num_requests * texts_per_request, seed=seed)
    return [
        orjson.dumps({"model": "minilm", "input": corpus[i * texts_per_request : (i + 1) * texts_per_request]})
        for i in range(num_requests)
    ]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    status = int(status_line.split(b" ", 2)[1])
    headers: dict[bytes, bytes] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"0"))
    return status, headers, await reader.readexactly(length)


class Connections:
    """Keep-alive connections to the server for one client key, opened on demand."""

    def __init__(self, port: int, key: str | None) -> None:
        self.port = port
        self.key = key
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def _head(self, method: str, path: str, body: bytes) -> bytes:
        auth = f"Authorization: Bearer {self.key}\r\n" if self.key else ""
        return (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def request(self, body: bytes, phase_start_s: float, path: str = "/v1/embeddings") -> Answer:
        method = "POST" if body else "GET"
        request = self._head(method, path, body)
        started = time.perf_counter()
        for attempt in range(2):
            reused = bool(self._idle) and attempt == 0
            conn = self._idle.pop() if reused else await asyncio.open_connection("127.0.0.1", self.port)
            try:
                conn[1].write(request)
                status, headers, payload = await _read_response(conn[0])
            except (ConnectionError, asyncio.IncompleteReadError):
                conn[1].close()
                if reused:
                    started = time.perf_counter()
                    continue  # the server closed an idle keep-alive connection: not this request's fault
                return Answer(0, time.perf_counter() - started, started - phase_start_s)
            took_s = time.perf_counter() - started
            if headers.get(b"connection", b"").lower() == b"close":
                conn[1].close()
            else:
                self._idle.append(conn)
            retry = headers.get(b"retry-after")
            return Answer(
                status,
                took_s,
                started - phase_start_s,
                retry.decode() if retry is not None else None,
                payload,
                float(headers.get(b"x-polyray-queue-ms", b"nan")),
                float(headers.get(b"x-polyray-inference-ms", b"nan")),
            )
        return Answer(0, time.perf_counter() - started, started - phase_start_s)

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


@dataclass
class Record:
    answers: list[Answer] = field(default_factory=list)

    def ok_ms(self) -> list[float]:
        return [a.latency_s * 1000 for a in self.answers if a.status == 200]

    def server_ms(self) -> str:
        """The server's account of the answered requests: where their time went (p50 / p99)."""
        ok = [a for a in self.answers if a.status == 200]
        queue = [a.queue_ms for a in ok]
        inference = [a.inference_ms for a in ok]
        rest = [a.latency_s * 1000 - a.queue_ms - a.inference_ms for a in ok]
        return (
            f"queue {percentile(queue, 50):.1f}/{percentile(queue, 99):.1f} ms, "
            f"inference {percentile(inference, 50):.1f}/{percentile(inference, 99):.1f} ms, "
            f"rest (HTTP, tokenizing) {percentile(rest, 50):.1f}/{percentile(rest, 99):.1f} ms"
        )

    def refused(self) -> list[Answer]:
        return [a for a in self.answers if a.status in (429, 503)]

    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for a in self.answers:
            out[a.status] = out.get(a.status, 0) + 1
        return dict(sorted(out.items()))


async def closed_loop(
    conns: Connections, payloads: list[bytes], duration_s: float, out: Record, pause_s: float = 0.0
) -> None:
    """One sender, one request after another (``pause_s`` between), until ``duration_s``."""
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < duration_s:
        out.answers.append(await conns.request(payloads[i % len(payloads)], start))
        i += 1
        if pause_s:
            await asyncio.sleep(pause_s)


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def python_env_note() -> str:
    return f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
