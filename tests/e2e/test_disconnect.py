"""A caller that hangs up over real TCP is dropped before its text reaches the model."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import orjson
import pytest
import uvicorn

from polyray.api.app import create_app
from polyray.backends.dummy import DummyBackend
from polyray.config import ServerConfig, Settings
from polyray.engine.batcher import BatchPolicy
from polyray.engine.engine import Engine
from polyray.observability.metrics import Metrics
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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = GatedBackend()
    settings = Settings()
    metrics = Metrics()
    engine = Engine({ModelRef("minilm", "1"): backend}, BatchPolicy(max_wait_ms=0), ServerConfig(), metrics)
    app = create_app(engine, settings, metrics, warmup=False)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    yield f"127.0.0.1:{port}", backend, metrics
    backend.gate.set()
    srv.should_exit = True
    thread.join(timeout=30)


def _post(address: str, text: str) -> bytes:
    body = orjson.dumps({"model": "minilm", "input": text})
    return (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _dropped(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("polyray_dropped_entries_total", {"model": "minilm@1", "reason": reason})
    return value or 0.0


def test_disconnected_caller_is_dropped_before_compute(server: tuple[str, GatedBackend, Metrics]) -> None:
    address, backend, metrics = server
    host, port = address.split(":")

    async def scenario() -> int:
        # 1. A first request occupies the worker (blocked on the gate).
        first_reader, first_writer = await asyncio.open_connection(host, int(port))
        first_writer.write(_post(address, "occupies the worker"))
        await first_writer.drain()
        for _ in range(200):
            if backend.seen:
                break
            await asyncio.sleep(0.01)
        assert backend.seen, "the first request never reached the backend"
        # 2. A second caller sends its request and hangs up while it waits in the queue.
        _, quitter = await asyncio.open_connection(host, int(port))
        quitter.write(_post(address, "this caller leaves early"))
        await quitter.drain()
        await asyncio.sleep(0.3)
        quitter.close()
        await asyncio.sleep(0.3)
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
