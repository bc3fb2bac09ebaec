"""Start a real ``polyray serve`` subprocess for a benchmark: its own config, data directory and port.

Benchmarks measure the server as users run it (a separate process, loopback HTTP), so every
bench starts one the same way (so it is built by ``polyray.server.build_server``, the one
composition root, as in production): write ``config_toml`` into a fresh ``home`` (also its
``POLYRAY_HOME``, so the ledger and spool are throw-away), pick a free port, and wait for
``/readyz``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

READY_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    home: Path, config_toml: str, port: int, ready_timeout_s: float = READY_TIMEOUT_S
) -> subprocess.Popen[bytes]:
    """The server process, ready to serve; ``SystemExit`` if it exits or is not ready in time.

    ``ready_timeout_s``: a first start of an ONNX model exports (and for int8 calibrates) its build.
    """
    config = home / "polyray.toml"
    config.write_text(config_toml)
    cmd = [sys.executable, "-m", "polyray.cli", "--log-level", "warning", "serve", "--config", str(config)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], env={**os.environ, "HF_HUB_OFFLINE": "1", "POLYRAY_HOME": str(home)}
    )
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"bench: the server did not become ready in {ready_timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains and flushes its ledger), then wait."""
    proc.terminate()
    proc.wait(timeout=60)
