"""Connection limits of ``polyray serve`` (``polyray.server``), against a real server process on
loopback with the dummy backend: every phase of a connection has a deadline, request heads are
bounded, and descriptors stay below the process's limit however many sockets a client opens.

Short limits (1 s; 5 s for bodies) keep the tests quick; each waits for a close with a generous margin, and
every socket count is bounded.
"""

from __future__ import annotations

import json
import re
import resource
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_process import (
    DUMMY_MODEL,
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

TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 5.0  # longer: the test of busy connections needs 64 of them in their body phase at once
CLOSE_WITHIN_S = 10.0  # a close expected after a 1 s deadline: generous for a loaded 2-core machine
MAX_CONNECTIONS = 64
MAX_HEAD_BYTES = 4096
MAX_HEADERS = 20

LIMITS = f"""
[server]
idle_timeout_s = {TIMEOUT_S}
head_timeout_s = {TIMEOUT_S}
body_timeout_s = {BODY_TIMEOUT_S}
max_head_bytes = {MAX_HEAD_BYTES}
max_headers = {MAX_HEADERS}
max_connections = {MAX_CONNECTIONS}
drain_grace_s = 0
"""
EMBED = {"model": "minilm", "input": ["hello", "world"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp_path = tmp_path_factory.mktemp("limits")
    served = start_serve(tmp_path, LIMITS + no_auth(tmp_path) + DUMMY_MODEL)
    try:
        yield served
    finally:
        assert served.stop() == 0, served.log()


def wait_for_fds(server: ServeProcess, at_most: int, within_s: float) -> int:
    deadline = time.monotonic() + within_s
    while (count := server.num_fds()) > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def test_an_idle_connection_is_closed(server: ServeProcess) -> None:
    with connect(server.port) as sock:
        data, closed = read_until_closed(sock, CLOSE_WITHIN_S)
    assert closed and data == b""


def test_a_kept_alive_connection_is_closed_when_idle(server: ServeProcess) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        data, closed = read_until_closed(sock, CLOSE_WITHIN_S)
    assert closed
    assert status_of(data) == 200 and data.endswith(b'{"status":"ok"}'), data


def test_a_slowloris_head_gets_408_and_is_closed(server: ServeProcess) -> None:
    """A head sent one byte every 50 ms never ends; the idle timer alone would never fire."""
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n" + b"X-Slow: " + b"a" * 1000
    answer = b""
    with connect(server.port) as sock:
        deadline = time.monotonic() + CLOSE_WITHIN_S
        for byte in head:
            assert time.monotonic() < deadline, "the slow head was never cut off"
            if select.select([sock], [], [], 0.05)[0]:
                answer, closed = read_until_closed(sock, CLOSE_WITHIN_S)
                break
            sock.sendall(bytes([byte]))
        else:
            pytest.fail("the whole slow head was accepted")
    assert closed
    assert status_of(answer) == 408 and b"connection: close" in answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "head_timeout"


def test_a_body_that_stops_gets_408_and_is_closed(server: ServeProcess) -> None:
    with connect(server.port) as sock:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model": "minilm", '
        )
        answer, closed = read_until_closed(sock, CLOSE_WITHIN_S)
    assert closed
    assert status_of(answer) == 408, answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_timeout"
    assert get(server.url, "/healthz")[0] == 200


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(b"X-Big: " + b"a" * (MAX_HEAD_BYTES + 1) + b"\r\n", id="one-large-header"),
        pytest.param(b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 1)), id="too-many-headers"),
        pytest.param(b"X-Big: " + b"a" * 300_000 + b"\r\n", id="head-spanning-reads"),
    ],
)
def test_an_oversized_head_gets_431_and_is_closed(server: ServeProcess, headers: bytes) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n")
        answer, closed = read_until_closed(sock, CLOSE_WITHIN_S)
    assert closed
    assert status_of(answer) == 431 and b"connection: close" in answer, answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "headers_too_large"


def test_a_64mb_header_is_refused_before_it_is_buffered(server: ServeProcess) -> None:
    """The server answers 431 after about one read buffer and stops reading; its memory does not grow by the header."""
    rss_before = server.rss_bytes()
    sent = 0
    with connect(server.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Huge: ")
        chunk = b"a" * 65536
        try:
            while sent < 64 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server shut the connection: expected long before 64 MB
        answer, _ = read_until_closed(sock, CLOSE_WITHIN_S)
    assert sent < 16 * 1024 * 1024, "the server kept reading the header"
    assert status_of(answer) in (431, 0), answer[:200]  # 0: a reset took the answer with it
    assert server.rss_bytes() - rss_before < 16 * 1024 * 1024
    assert get(server.url, "/healthz")[0] == 200


def test_many_idle_connections_neither_starve_clients_nor_keep_descriptors(server: ServeProcess) -> None:
    """300 idle sockets against a limit of 64: new ones displace idle ones, so /healthz and an
    embedding still answer; the server's descriptors stay bounded and are reclaimed after the idle timeout."""
    baseline = server.num_fds()  # whatever it holds between tests
    sockets: list[socket.socket] = []
    try:
        for _ in range(300):
            sockets.append(connect(server.port))
        assert get(server.url, "/healthz")[0] == 200
        status, body = request(server.url, "/v1/embeddings", EMBED)
        assert status == 200 and len(body["data"]) == 2, body
        # Connections plus those lingering on a refusal, and a few in passing.
        assert server.num_fds() <= baseline + MAX_CONNECTIONS + 16 + 8
        # Idle sockets the client still holds: the server closes its ends after the idle timeout.
        assert wait_for_fds(server, baseline + 2, CLOSE_WITHIN_S) <= baseline + 2
        closed_by_server = sum(1 for sock in sockets if read_until_closed(sock, 0.05)[1])
        assert closed_by_server == len(sockets)
    finally:
        for sock in sockets:
            sock.close()


def test_when_every_connection_carries_a_request_a_new_one_gets_503_at_once(server: ServeProcess) -> None:
    """Connections still sending their bodies are never displaced: the next one is refused with
    503 too_many_connections and Retry-After, and the body timeout frees the slots."""
    busy: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = connect(server.port)
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 50\r\n\r\n{"
            )
            busy.append(sock)
        for sock in busy:  # every head parsed and its body being read: none displaceable
            await_continue(sock, CLOSE_WITHIN_S)
        with connect(server.port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            answer, closed = read_until_closed(sock, CLOSE_WITHIN_S)
        assert closed and status_of(answer) == 503, answer
        assert re.search(rb"\r\nretry-after: \d+\r\n", answer)
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
        # The stalled bodies time out (408), and the server answers again.
        assert all(status_of(read_until_closed(sock, CLOSE_WITHIN_S)[0]) == 408 for sock in busy)
        assert get(server.url, "/healthz")[0] == 200
    finally:
        for sock in busy:
            sock.close()


def test_the_descriptor_limit_is_raised_and_never_exhausted(tmp_path: Path) -> None:
    """The issue's case: 1,100 idle sockets from one client against a 1,024-descriptor limit.

    The server starts with a soft limit of 512 under a hard one of 1,024, raises it to 1,024
    and fits its connections (default 2,048) below it, so the sockets cannot exhaust it:
    /healthz and an embedding answer while all 1,100 are open.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1400:
        pytest.skip(f"this test opens 1,100 sockets; the hard descriptor limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))

    def limit_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 1024))

    served = start_serve(
        tmp_path, "[server]\nidle_timeout_s = 30.0\n" + no_auth(tmp_path) + DUMMY_MODEL, preexec_fn=limit_descriptors
    )
    sockets: list[socket.socket] = []
    try:
        limits = Path(f"/proc/{served.proc.pid}/limits").read_text()
        assert re.search(r"Max open files\s+1024\s+1024", limits), limits
        assert "max_connections lowered from 2048 to 723" in served.log()
        for _ in range(1100):
            sockets.append(connect(served.port))
        assert get(served.url, "/healthz")[0] == 200
        status, body = request(served.url, "/v1/embeddings", EMBED)
        assert status == 200 and len(body["data"]) == 2, body
        assert served.num_fds() < 1024
        assert "Too many open files" not in served.log()
    finally:
        for sock in sockets:
            sock.close()
        assert served.stop() == 0, served.log()
