"""A caller that hangs up over real TCP is dropped before its text reaches the model."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import orjson
import pytest
from server_support import serve_in_thread

from polyray.backends.dummy import DummyBackend
from polyray.cache.config import CacheConfig
from polyray.config import ModelConfig, Settings
from polyray.observability.metrics import Metrics
from polyray.policies import AdmissionPolicy, BatchPolicy
from polyray.server import build_server
from polyray.types import ModelRef


class GatedBackend(DummyBackend):
    """Blocks inside ``encode`` until the test opens the gate, so the worker is provably busy."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.seen: list[tuple[int, ...]] = []

    def encode(self, batch):  # type: ignore[no-untyped-def]
        self.seen.extend(tuple(s) for s in batch)
        self.gate.wait(timeout=30)
        return super().encode(batch)


@pytest.fixture
def server() -> Iterator[tuple[str, GatedBackend, Metrics]]:
    backend = GatedBackend()
    day_ms = 86_400_000.0  # time admission off: the worker is held on purpose, nobody is overloaded
    settings = Settings(
        batching=BatchPolicy(max_wait_ms=0),
        models=(ModelConfig(backend="dummy"),),
        cache=CacheConfig(enabled=False),
        admission=AdmissionPolicy(interactive_max_queue_ms=day_ms, batch_max_queue_ms=day_ms),
    )
    built = build_server(settings, tenancy=False, warmup=False, backends={ModelRef("minilm", "1"): backend})
    try:
        with serve_in_thread(built) as url:
            yield url.removeprefix("http://"), backend, built.metrics
    finally:
        backend.gate.set()  # a failed test must not leave the worker blocked for the gate's 30 s


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll ``condition`` until it holds; the bound is generous (a slow machine passes) and a
    failure says what never happened, instead of a fixed sleep that hopes it did."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        await asyncio.sleep(0.01)


def _post(address: str, text: str) -> bytes:
    body = orjson.dumps({"model": "minilm", "input": text})
    return (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _dropped(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("polyray_dropped_entries_total", {"model": "minilm@1", "reason": reason})
    return value or 0.0


def _queued(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("polyray_queue_depth", {"model": "minilm@1"}) or 0.0


def _disconnected(metrics: Metrics) -> float:
    labels = {"route": "/v1/embeddings", "outcome": "disconnected"}
    return metrics.registry.get_sample_value("polyray_requests_total", labels) or 0.0


def test_disconnected_caller_is_dropped_before_compute(server: tuple[str, GatedBackend, Metrics]) -> None:
    address, backend, metrics = server
    host, port = address.split(":")

    async def scenario() -> int:
        # 1. A first request occupies the worker (blocked on the gate).
        first_reader, first_writer = await asyncio.open_connection(host, int(port))
        first_writer.write(_post(address, "occupies the worker"))
        await first_writer.drain()
        await wait_until(lambda: bool(backend.seen), "the first request reaching the backend")
        # 2. A second caller sends its request and hangs up while it waits in the queue.
        _, quitter = await asyncio.open_connection(host, int(port))
        quitter.write(_post(address, "this caller leaves early"))
        await quitter.drain()
        await wait_until(lambda: _queued(metrics) == 1, "the second request waiting in the queue")
        quitter.close()
        # The route counts the hang-up after cancelling the request's engine task; the worker's
        # next look at the queue is scheduled on the same loop only after the gate opens below.
        await wait_until(lambda: _disconnected(metrics) == 1, "the server noticing the hang-up")
        # 3. Release the worker; the first caller is answered.
        backend.gate.set()
        status_line = await asyncio.wait_for(first_reader.readline(), timeout=10)
        first_writer.close()
        return int(status_line.split()[1])

    assert asyncio.run(scenario()) == 200
    leaver_ids = backend.tokenize(["this caller leaves early"])[0].ids
    deadline = time.monotonic() + 5
    while _dropped(metrics, "cancelled") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _dropped(metrics, "cancelled") == 1
    assert leaver_ids not in backend.seen  # never computed
    # The service keeps answering.
    request = urllib.request.Request(
        f"http://{address}/v1/embeddings",
        data=orjson.dumps({"model": "minilm", "input": "still here"}),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
