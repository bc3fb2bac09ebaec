"""``polyray serve``'s lifecycle as an operator sees it, on a real process: the banner comes once
the port answers, SIGTERM drains (``/readyz`` 503 while the listener stays open, the request in
flight completes, exit 0), and a second signal exits at once."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from serve_process import (
    DUMMY_MODEL,
    EXIT_TIMEOUT_S,
    ServeProcess,
    await_continue,
    connect,
    get,
    no_auth,
    read_until_closed,
    request,
    start_serve,
    status_of,
)

GRACE_S = 2.0
EMBED = {"model": "minilm", "input": ["in flight", "while draining"]}


def start_request_in_flight(server: ServeProcess) -> tuple[socket.socket, bytes]:
    """An embedding request whose head has arrived and whose body is half sent: in flight for
    the server until the test sends the rest."""
    body = json.dumps(EMBED).encode()
    sock = connect(server.port)
    sock.sendall(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body[:10]
    )
    await_continue(sock, within_s=30)  # the head is parsed and the app reads the body: in flight
    return sock, body[10:]


def wait_for(predicate_status: int, server: ServeProcess, path: str, within_s: float) -> dict[str, object]:
    deadline = time.monotonic() + within_s
    while True:
        status, body = get(server.url, path)
        if status == predicate_status:
            return body
        assert time.monotonic() < deadline, f"{path} never answered {predicate_status} (last {status} {body})"
        time.sleep(0.05)


def test_sigterm_drains_then_exits_0(tmp_path: Path) -> None:
    config = f"[server]\ndrain_grace_s = {GRACE_S}\nbody_timeout_s = 60.0\nshutdown_timeout_s = 30.0\n"
    server = start_serve(tmp_path, config + no_auth(tmp_path) + DUMMY_MODEL)
    sock, rest = start_request_in_flight(server)
    try:
        server.proc.send_signal(signal.SIGTERM)

        # Draining: readiness fails with a reason while the listener still answers.
        body = wait_for(503, server, "/readyz", within_s=GRACE_S)
        assert body["status"] == "draining" and "SIGTERM" in str(body["reason"]), body
        status, refused = request(server.url, "/v1/embeddings", {"model": "minilm", "input": "new work"})
        assert status == 503 and refused["error"]["code"] == "shutting_down", refused
        assert int(refused["headers"]["retry-after"]) >= 1
        assert refused["headers"]["connection"] == "close"
        assert get(server.url, "/healthz")[0] == 200  # alive, only leaving

        # After the grace period the listener closes ...
        deadline = time.monotonic() + GRACE_S + 10
        while get(server.url, "/healthz", timeout_s=1)[0] != 0:
            assert time.monotonic() < deadline, "the listener stayed open after the grace period"
            time.sleep(0.1)
        assert server.proc.poll() is None, "exited with a request in flight"

        # ... and the request in flight still completes.
        sock.sendall(rest)
        answer, closed = read_until_closed(sock, 10)
        assert closed and status_of(answer) == 200, answer[:300]
        payload = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert len(payload["data"]) == 2
    finally:
        sock.close()
    assert server.proc.wait(timeout=EXIT_TIMEOUT_S) == 0, server.log()
    log = server.log()
    assert "Application shutdown complete" in log and "Traceback" not in log, log


def test_a_second_signal_exits_promptly(tmp_path: Path) -> None:
    config = "[server]\ndrain_grace_s = 60.0\nbody_timeout_s = 60.0\nshutdown_timeout_s = 60.0\n"
    server = start_serve(tmp_path, config + no_auth(tmp_path) + DUMMY_MODEL)
    sock, _ = start_request_in_flight(server)
    try:
        server.proc.send_signal(signal.SIGINT)
        wait_for(503, server, "/readyz", within_s=5)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        code = server.proc.wait(timeout=EXIT_TIMEOUT_S)
        # Well inside the 60 s grace and 60 s shutdown timeout it would otherwise wait.
        assert time.monotonic() - started < 20, server.log()
        assert code == 1, server.log()
        assert "Application shutdown complete" in server.log()  # the ledger was still flushed
    finally:
        sock.close()


def test_the_banner_is_printed_once_the_port_answers_and_its_lines_work(tmp_path: Path) -> None:
    """The first start (empty database) prints keys and a curl line: only when the port accepts
    connections, and pasted into a shell as printed, the curl line embeds."""
    server = start_serve(tmp_path, "[server]\ndrain_grace_s = 0\n" + DUMMY_MODEL, wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        while "polyray: ready on" not in (log := server.log()):
            assert server.proc.poll() is None, log
            assert time.monotonic() < deadline, log
            assert "client key" not in log, "keys printed before the ready line"
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", server.port), timeout=2):
            pass  # the port accepts connections the moment the banner appears
        assert log.index("polyray: loading") < log.index("polyray: ready on")
        # The whole banner is written at once.
        assert re.search(r"export POLYRAY_API_KEY=pk-c\w+", log), log
        export = next(line for line in log.splitlines() if "export POLYRAY_API_KEY=" in line).strip()
        curl = log[log.index("  curl -sS") :].split("\n\n", 1)[0]
        assert '"$POLYRAY_API_KEY"' in curl or "Bearer $POLYRAY_API_KEY" in curl
        result = subprocess.run(
            ["bash", "-c", f"{export}\n{curl}"], capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, result.stderr
        assert len(json.loads(result.stdout)["data"][0]["embedding"]) == 384
        # The rotate-key hint names a command that runs here.
        hint = re.search(r"new ones: (.+) clients rotate-key default\)", log)
        assert hint, log
        help_run = subprocess.run(
            ["bash", "-c", f"{hint.group(1)} clients --help"], capture_output=True, text=True, timeout=60, check=False
        )
        assert help_run.returncode == 0, help_run.stderr
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_drained_stop_exits_0(tmp_path: Path, sig: signal.Signals) -> None:
    server = start_serve(tmp_path, "[server]\ndrain_grace_s = 0.2\n" + no_auth(tmp_path) + DUMMY_MODEL)
    assert request(server.url, "/v1/embeddings", EMBED)[0] == 200
    server.proc.send_signal(sig)
    assert server.proc.wait(timeout=EXIT_TIMEOUT_S) == 0, server.log()
