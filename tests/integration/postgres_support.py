"""Where the integration tests find PostgreSQL (127.0.0.1:5432, user postgres with trust auth; README.md, *Tests need Redis and PostgreSQL*), and a
TCP forwarder in front of it that a test can cut (the database goes away: connections reset) or
silence (a partition: sockets stay open, nothing is forwarded, nothing is refused)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from polyray.db.connection import Database
from polyray.db.schema import usage

PG_HOST, PG_PORT = "127.0.0.1", 5432
ADMIN_URL = f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/postgres"


def database_url(name: str) -> str:
    return f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Forwarder:
    """127.0.0.1:<port> → PostgreSQL, on its own event loop thread (so the test's loop and the
    ledger's worker threads never hold it up).

    ``cut()`` closes the listener and resets every connection; ``restore()`` listens again.
    ``silence()`` is a partition as a proxy or a NAT box makes one: new connections are accepted
    and every socket stays open, but no byte goes through in either direction (the kernel's buffers
    take what the peers send, so their writes succeed and their reads wait forever). ``heal()``
    lets the held bytes through, late, as a healed network would (a held COMMIT then commits).
    """

    def __init__(self, target_port: int = PG_PORT) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.up = False
        self.silent = False
        self.num_accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._healed = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-forwarder", daemon=True)
        self._thread.start()
        self.restore()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)  # type: ignore[arg-type]

    def restore(self) -> None:
        self._run(self._listen())

    def cut(self) -> None:
        self._run(self._cut())

    def silence(self) -> None:
        self._run(self._set_silent(True))

    def heal(self) -> None:
        self._run(self._set_silent(False))

    def close(self) -> None:
        if self.silent:
            self.heal()
        if self.up:
            self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _set_silent(self, silent: bool) -> None:
        self.silent = silent
        if silent:
            self._healed.clear()
        else:
            self._healed.set()

    async def _listen(self) -> None:
        if not self.silent:
            self._healed.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        self.up = True

    async def _cut(self) -> None:
        self.up = False
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._healed.wait()  # accepted, but not connected through while silent
            try:
                up_reader, up_writer = await asyncio.open_connection(PG_HOST, self.target_port)
            except OSError:
                writer.transport.abort()
                return
            if not self.up:  # cut while this connection was being opened
                writer.transport.abort()
                up_writer.transport.abort()
                return
            self.num_accepted += 1
            self._writers.add(up_writer)
            try:
                await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
            finally:
                self._writers.discard(up_writer)
        finally:
            self._writers.discard(writer)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self._healed.wait()  # hold the bytes while silent (and stop reading more)
                dst.write(data)
                await dst.drain()
            await self._healed.wait()  # a peer's close is held too
        except (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()


# -- a real `polyray serve` on a PostgreSQL ledger, and a client that keeps what it was told ------


@dataclass
class Received:
    """What the clients were told: answered requests and the usage the responses reported."""

    num_requests: int = 0
    num_texts: int = 0
    num_tokens: int = 0
    compute_ms: float = 0.0
    num_failed: int = 0

    def add(self, other: Received) -> None:
        self.num_requests += other.num_requests
        self.num_texts += other.num_texts
        self.num_tokens += other.num_tokens
        self.compute_ms += other.compute_ms
        self.num_failed += other.num_failed


SERVE_CONFIG = """
[server]
host = "127.0.0.1"

[[models]]
name = "minilm"
version = "1"
backend = "dummy"

[tenancy]
database_url = "{database_url}"
auth = "none"
db_timeout_s = {db_timeout_s}
flush_interval_s = {flush_interval_s}
refresh_interval_s = 0.5
journal = {journal}
"""


class ServeProcess:
    """``polyray serve`` as a subprocess with its own ``POLYRAY_HOME`` (spool and journal live there),
    its log in ``home/serve.log``. Loopback only; every wait is bounded."""

    def __init__(
        self,
        home: Path,
        database_url: str,
        db_timeout_s: float = 1.0,
        flush_interval_s: float = 0.2,
        journal: bool = True,
    ) -> None:
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.config = home / "polyray.toml"
        self.config.write_text(
            SERVE_CONFIG.format(
                database_url=database_url,
                db_timeout_s=db_timeout_s,
                flush_interval_s=flush_interval_s,
                journal="true" if journal else "false",
            )
        )
        self.log_path = home / "serve.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._seq = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def spool(self) -> Path:
        return self.home / "usage-spool.jsonl"

    def start(self, ready_timeout_s: float = 60.0) -> None:
        cmd = [sys.executable, "-m", "polyray.cli", "--log-level", "warning", "serve", "--config", str(self.config)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "POLYRAY_HOME": str(self.home)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*cmd, "--port", str(self.port)], env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"polyray serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"polyray serve was not ready in {ready_timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def embed(self, num_texts: int = 2, timeout_s: float = 10.0) -> Received:
        """One request of unique texts (no cache hits); what the response said it used."""
        self._seq += 1
        texts = [f"request {self._seq} text {i} {uuid.uuid4().hex[:8]}" for i in range(num_texts)]
        body = json.dumps({"model": "minilm", "input": texts}).encode()
        req = urllib.request.Request(
            f"{self.base_url}/v1/embeddings", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                payload = json.loads(resp.read())
                compute_ms = float(resp.headers["X-Polyray-Compute-Ms"])
        except (OSError, ValueError, http.client.HTTPException):  # refused, reset, cut mid-answer
            return Received(num_failed=1)
        return Received(1, len(payload["data"]), int(payload["usage"]["prompt_tokens"]), compute_ms)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"{self.base_url}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "_total "):
                    return float(line.split()[-1])
        raise AssertionError(f"no metric {name}")

    def terminate(self, timeout_s: float = 60.0) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds until exit). SIGKILL and AssertionError past ``timeout_s``."""
        assert self.proc is not None
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"polyray serve did not exit within {timeout_s} s of SIGTERM:\n{self.log()}") from None
        return code, time.monotonic() - began

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def usage_sums(db: Database) -> Received:
    """The ledger's totals, read from PostgreSQL directly."""
    cols = (usage.c.num_requests, usage.c.num_texts, usage.c.num_tokens, usage.c.compute_ns)
    with db.connect() as conn:
        row = conn.execute(sa.select(*(sa.func.coalesce(sa.func.sum(c), 0) for c in cols))).one()
    return Received(int(row[0]), int(row[1]), int(row[2]), int(row[3]) / 1e6)
