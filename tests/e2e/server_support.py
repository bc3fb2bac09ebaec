"""A real uvicorn server on a free loopback port, in a thread: for tests that need real HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from polyray.benchmarks.server import free_port
from polyray.server import Server

__all__ = ["free_port", "serve_in_thread"]


@contextmanager
def serve_in_thread(server: Server, start_timeout_s: float = 120.0) -> Iterator[str]:
    """Serve ``server.app`` and yield its base URL. Its lifespan runs ``server.running()``, the
    start and stop ``polyray serve`` runs (tenancy, then the engine loading and warming, then heads)."""
    port = free_port()
    http = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not http.started:
        assert time.monotonic() < deadline, "server did not start"
        assert thread.is_alive(), "server thread died"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        http.should_exit = True
        thread.join(timeout=30)


async def post_as_an_sdk_would(client: httpx.AsyncClient, body: dict[str, object]) -> httpx.Response:
    """POST, and on an admission refusal (429/503) wait its Retry-After-Ms and send again, as
    OpenAI's SDK does: a burst larger than the queue's bound is partly refused at once by design
    (README, *Overload*), and every request must still end in a correct answer."""
    for _ in range(50):
        response = await client.post("/v1/embeddings", json=body)
        if response.status_code not in (429, 503):
            return response
        await asyncio.sleep(int(response.headers["Retry-After-Ms"]) / 1000)
    return response
