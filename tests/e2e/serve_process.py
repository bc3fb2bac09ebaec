"""``polyray serve`` as a real subprocess on a free loopback port: for tests of what only a real
process shows (signals, exit status, descriptors in /proc, what it prints and when)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server_support import free_port

COMMAND = (sys.executable, "-m", "polyray.cli")
READY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 60.0

DUMMY_MODEL = '\n[[models]]\nname = "minilm"\nversion = "1"\nbackend = "dummy"\n'


def no_auth(tmp_path: Path) -> str:
    """A [tenancy] table without keys (loopback only) and with its files in ``tmp_path``."""
    return (
        f'\n[tenancy]\nauth = "none"\ndatabase_url = "sqlite:///{tmp_path}/polyray.db"\n'
        f'spool_path = "{tmp_path}/usage-spool.jsonl"\n'
    )


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def num_fds(self) -> int:
        """Descriptors the server process holds now."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def start_serve(
    tmp_path: Path,
    config_toml: str,
    *,
    wait_ready: bool = True,
    preexec_fn: Callable[[], None] | None = None,
    log_level: str = "info",
) -> ServeProcess:
    config = tmp_path / "polyray.toml"
    config.write_text(config_toml, encoding="utf-8")
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*COMMAND, "--log-level", log_level, "serve", "--config", str(config), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "POLYRAY_HOME": str(tmp_path)},
            preexec_fn=preexec_fn,
        )
    server = ServeProcess(proc, port, log_path)
    if wait_ready:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while get(server.url, "/readyz")[0] != 200:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode}: {server.log()}")
            assert time.monotonic() < deadline, f"serve was not ready in time: {server.log()}"
            time.sleep(0.05)
    return server


def get(base_url: str, path: str, timeout_s: float = 10.0) -> tuple[int, dict[str, Any]]:
    """Status and JSON body; (0, {}) when the server cannot be reached."""
    return request(base_url, path, None, timeout_s)


def request(base_url: str, path: str, body: object, timeout_s: float = 10.0) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"{base_url}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
        method="POST" if body is not None else "GET",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {**json.loads(exc.read() or b"{}"), "headers": dict(exc.headers)}
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, {}


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or ``timeout_s`` passes (False)."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, False
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP/1.1 response (0 if there is none)."""
    if not response.startswith(b"HTTP/1.1 "):
        return 0
    return int(response.split(b" ", 2)[1])


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def await_continue(sock: socket.socket, within_s: float) -> None:
    """Wait for the ``100 Continue`` that a request sent with ``Expect: 100-continue`` gets.

    uvicorn writes it when the app first reads the body, so once it arrives the head has been
    parsed and the request is the app's: an event to wait for, where a fixed sleep would race the
    server on a loaded machine. Reads exactly the interim response, so what follows on the socket
    is the final one.
    """
    data = b""
    deadline = time.monotonic() + within_s
    while len(data) < len(CONTINUE):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no 100 Continue within {within_s} s (got {data!r})"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(len(CONTINUE) - len(data))
        except TimeoutError:
            continue  # the deadline check above fails with what arrived
        assert chunk, f"closed before 100 Continue (got {data!r})"
        data += chunk
    assert data == CONTINUE, data
