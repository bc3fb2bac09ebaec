"""The composition root (``build_server``: config -> database -> tenancy -> cache -> engine ->
heads -> app, started and stopped by one ``AsyncExitStack``) and ``polyray serve``'s bounded
HTTP server around it.

What this module adds to uvicorn, and why:

* **Deadlines on every phase of a connection.** uvicorn times out a kept-alive connection only
  after a response: a connection that never sends a byte, or sends its head one byte at a time
  (slowloris), or stops halfway through its body, is held forever. Here a connection with no
  request in progress closes after ``idle_timeout_s``; a request head must arrive within
  ``head_timeout_s`` of its first byte and a body within ``body_timeout_s`` of the head's end
  (408 and close).
* **Bounded request heads.** httptools (llhttp) buffers any head size and any header count; the
  head is limited to ``max_head_bytes`` and ``max_headers`` (431 and close), counted as bytes
  arrive, so a 64 MB header costs one read buffer, not 64 MB.
* **A connection limit under the descriptor limit.** The soft RLIMIT_NOFILE is raised to the
  hard one at start, and ``max_connections`` is lowered, if need be, to leave descriptors for
  the database, Redis and model files (``connection_budget``). At the limit a new connection
  first displaces one that is doing nothing for anyone (never sent a byte, then the oldest
  unfinished head, then the oldest kept-alive idle one), so ``/healthz`` and real clients are
  served while hundreds of idle sockets are open; if every connection carries a request, the
  new one gets 503 ``too_many_connections`` with Retry-After at once (and beyond a small reserve
  of such answers, a reset). The process never reaches EMFILE, where it would refuse everyone.
* **Draining.** On SIGTERM or SIGINT the server first drains: ``/readyz`` answers 503 with the
  reason and new embedding work gets 503 ``shutting_down`` with Retry-After while the listener
  stays open for ``drain_grace_s`` (load balancers see the 503 and stop sending); every response
  then says ``Connection: close``. Then the listener closes, requests in flight get
  ``shutdown_timeout_s`` to finish, and the lifespan stops the engine and flushes the usage
  ledger. A second signal exits promptly: requests in flight are cancelled and the ledger gets
  ``FORCED_SHUTDOWN_S`` to flush; exit status 1.
* **Announce when ready.** ``on_ready`` runs once the port accepts connections and the models
  are loaded (the CLI prints the bootstrap keys and a curl line then, not before the port opens).

HTTP implementation: httptools, on purpose. Its parser is C (llhttp): per request it costs a
fraction of h11's pure-Python parsing, and on a 2-core machine the event loop shares the cores
with the model, so parsing time is serving time. It is also what uvicorn's "auto" chose for
every figure measured so far. What h11 would have given for free (a 16 KiB bound on the head)
``LimitedHttpProtocol`` adds, together with the header count and the timeouts neither has.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import resource
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from functools import cached_property
from http import HTTPStatus
from types import FrameType
from typing import TYPE_CHECKING, Any

import httptools
import orjson
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from polyray.api.errors import error_response
from polyray.api.routes.system import DRAINING_SCOPE_KEY
from polyray.config import LOOPBACK_HOSTS, ConfigError, ServerConfig, Settings
from polyray.errors import ErrorKind

if TYPE_CHECKING:
    from fastapi import FastAPI

    from polyray.backends.base import Backend
    from polyray.engine.engine import Engine
    from polyray.heads.service import HeadService
    from polyray.observability.metrics import Metrics
    from polyray.tenancy.service import BootstrapKeys, Tenancy
    from polyray.types import ModelRef

log = logging.getLogger("polyray.server")

# Descriptors kept for everything but client connections: database and Redis pools, the ledger
# spool and journal, model and tokenizer files, thread wake-up pipes, the log.
FD_RESERVE = 256
# After a 408/431/503 the server shuts its side and reads (discarding) for up to this long before
# it closes, so the client reads the answer instead of a reset caused by its own unread bytes.
LINGER_S = 2.0
LINGER_MAX_BYTES = 1 << 20
# After a second SIGTERM/SIGINT the lifespan (engine stop, ledger flush) gets this long.
FORCED_SHUTDOWN_S = 5.0
EXIT_FORCED = 1
# How often the connection guard may log what it refused, timed out or displaced.
GUARD_LOG_INTERVAL_S = 10.0
# Requests that start new model work, refused while draining; everything else is still answered.
_WORK_PATHS = ("/v1/embeddings", "/v1/infer", "/v1/heads")  # POST; and POST /v1/heads/<head>/retrain


def is_new_work(method: str, path: str) -> bool:
    """Embeddings, inference and head training: what a draining server refuses (503 shutting_down)."""
    return method == "POST" and (path in _WORK_PATHS or (path.startswith("/v1/heads/") and path.endswith("/retrain")))


# -- descriptors and the connection budget (pure) ------------------------------------------------


def lingering_slots(max_connections: int) -> int:
    """Connections that may linger on a refusal or a 408/431 answer beyond ``max_connections``."""
    return max(16, max_connections // 16)


def connection_budget(configured: int, fd_soft_limit: int) -> int:
    """The most client connections that fit under ``fd_soft_limit``, at most ``configured``.

    The connections and their lingering slots must leave ``FD_RESERVE`` descriptors (half the
    limit when the limit is small) for everything else the process opens; never below 1.
    """
    available = fd_soft_limit - min(FD_RESERVE, fd_soft_limit // 2)
    low, high = 1, max(1, min(configured, available))
    while low < high:  # the largest budget that fits (budget + lingering_slots grows with budget)
        middle = (low + high + 1) // 2
        if middle + lingering_slots(middle) <= available:
            low = middle
        else:
            high = middle - 1
    return low


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit and return the soft limit now in force.

    A 1,024 soft limit is a common default while the hard one is far higher; a server holding a
    socket per connection should use what it is allowed.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # pragma: no cover - a kernel cap below the hard limit
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, target, exc)
    return int(soft)


@dataclass(frozen=True)
class ConnectionLimits:
    idle_timeout_s: float
    head_timeout_s: float
    body_timeout_s: float
    max_head_bytes: int
    max_headers: int
    max_connections: int  # in force: the configured value, lowered to fit the descriptor limit

    @classmethod
    def from_config(cls, server: ServerConfig, fd_soft_limit: int) -> ConnectionLimits:
        return cls(
            idle_timeout_s=server.idle_timeout_s,
            head_timeout_s=server.head_timeout_s,
            body_timeout_s=server.body_timeout_s,
            max_head_bytes=server.max_head_bytes,
            max_headers=server.max_headers,
            max_connections=connection_budget(server.max_connections, fd_soft_limit),
        )


# -- the connection guard -------------------------------------------------------------------------


class Slot(enum.Enum):
    FRESH = "fresh"  # accepted, no byte yet
    HEAD = "head"  # a request head is arriving
    KEPT = "kept"  # kept alive after a response, nothing in progress
    BUSY = "busy"  # a body is arriving or a request is being answered: never displaced
    LINGERING = "lingering"  # answered 408/431/503, draining the client's bytes before close
    GONE = "gone"


class Admission(enum.Enum):
    ACCEPT = "accept"
    REFUSE = "refuse"  # 503 too_many_connections, then linger
    RESET = "reset"  # not even a lingering slot left: abort at once


class ConnectionGuard:
    """Counts the server's connections by slot and chooses whom a new connection displaces.

    One per server, shared by its protocol instances (all on the event loop thread). Displacement
    order: connections that never sent a byte (oldest first), then unfinished heads (oldest head
    first: the slowest), then kept-alive idle connections (longest idle first). A connection
    carrying a request is never displaced.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.max_lingering = lingering_slots(limits.max_connections)
        self._displaceable: dict[Slot, OrderedDict[LimitedHttpProtocol, None]] = {
            Slot.FRESH: OrderedDict(),
            Slot.HEAD: OrderedDict(),
            Slot.KEPT: OrderedDict(),
        }
        self.num_serving = 0  # every slot but LINGERING and GONE
        self.num_lingering = 0
        self.counts: dict[str, int] = {}
        self._counts_logged: dict[str, int] = {}
        self._last_log_at = -math.inf

    def admit(self) -> Admission:
        if self.num_serving < self.limits.max_connections:
            return Admission.ACCEPT
        for slot in (Slot.FRESH, Slot.HEAD, Slot.KEPT):
            waiting = self._displaceable[slot]
            if waiting:
                victim = next(iter(waiting))
                self.note(f"displaced_{slot.value}")
                victim.displace()  # leaves its slot at once: the count drops before we take one
                return Admission.ACCEPT
        self.note("refused")
        return Admission.REFUSE if self.num_lingering < self.max_lingering else Admission.RESET

    def move(self, conn: LimitedHttpProtocol, old: Slot, new: Slot) -> None:
        if old is new:
            if new in self._displaceable and new is not Slot.HEAD:
                self._displaceable[new].move_to_end(conn)
            return
        if old in self._displaceable:
            self._displaceable[old].pop(conn, None)
        if new in self._displaceable:
            self._displaceable[new][conn] = None
        self.num_serving += _serving(new) - _serving(old)
        self.num_lingering += (new is Slot.LINGERING) - (old is Slot.LINGERING)

    def summary(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "nothing refused or timed out"

    def note(self, event: str) -> None:
        """Count an event (a timeout, a refusal ...) and log the counts at most every 10 s."""
        self.counts[event] = self.counts.get(event, 0) + 1
        now = time.monotonic()
        if now - self._last_log_at >= GUARD_LOG_INTERVAL_S:
            self._last_log_at = now
            new = {k: v - self._counts_logged.get(k, 0) for k, v in self.counts.items()}
            self._counts_logged = dict(self.counts)
            log.warning(
                "connections: %s (open %d of %d, lingering %d)",
                ", ".join(f"{k} {v}" for k, v in sorted(new.items()) if v),
                self.num_serving,
                self.limits.max_connections,
                self.num_lingering,
            )


def _serving(slot: Slot) -> int:
    return int(slot not in (Slot.LINGERING, Slot.GONE))


class _Rejected(Exception):
    """Raised inside an httptools callback to stop parsing a head that was just refused."""


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on every phase and a bounded head.

    Parser phase (what the client is sending): ``"idle"`` between requests, ``"head"`` from the
    first byte of a head to its end, ``"body"`` from there to the end of the body. At most one
    timer runs: idle (no request in progress), head, or body; none while the app answers.
    """

    guard: ConnectionGuard  # set on the per-server subclass made by protocol_class()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slot = Slot.GONE
        self._phase = "idle"
        self._timer: asyncio.TimerHandle | None = None
        self._head_raw_bytes = 0  # received since the head's first byte (bounds httptools' buffer)
        self._head_bytes = 0  # url + header names and values, as parsed
        self._num_headers = 0
        self._rejected = False
        self._linger_bytes = 0

    # -- slots and timers ------------------------------------------------------------------
    def _set_slot(self, slot: Slot) -> None:
        old, self._slot = self._slot, slot
        self.guard.move(self, old, slot)

    def _arm(self, delay_s: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay_s, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _busy(self) -> bool:
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def _settle(self) -> None:
        """Between requests with nothing in flight: kept-alive idle, on the idle deadline."""
        if self._rejected or self.transport.is_closing() or self._phase != "idle" or self._busy():
            return
        self._set_slot(Slot.KEPT)
        self._arm(self.guard.limits.idle_timeout_s, self._on_idle_timeout)

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        admission = self.guard.admit()
        if admission is Admission.RESET:
            transport.abort()
            return
        self._set_slot(Slot.FRESH)
        if admission is Admission.REFUSE:
            self._reject(
                HTTPStatus.SERVICE_UNAVAILABLE,
                ErrorKind.OVERLOADED,
                "too_many_connections",
                f"the server holds its maximum of {self.guard.limits.max_connections} connections, "
                "each carrying a request; retry shortly",
                retry_after_s=1,
            )
            return
        self._arm(self.guard.limits.idle_timeout_s, self._on_idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._set_slot(Slot.GONE)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            self._linger_bytes += len(data)
            if self._linger_bytes > LINGER_MAX_BYTES:
                self.transport.abort()
            return
        self._unset_keepalive_if_required()
        was_in_head = self._phase == "head"
        if self._phase == "idle":
            self._begin_head()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(HTTPStatus.BAD_REQUEST, ErrorKind.INVALID_REQUEST, "invalid_request", "upgrade not supported")
            return
        except httptools.HttpParserError:
            if not self._rejected:
                self._reject(
                    HTTPStatus.BAD_REQUEST, ErrorKind.INVALID_REQUEST, "invalid_request", "malformed HTTP request"
                )
            return
        if self._phase == "head":
            # A head spanning reads: count them all. One that began inside this read is bounded
            # by this read's size (at most the transport's 256 KiB buffer) until the next one.
            self._head_raw_bytes = self._head_raw_bytes + len(data) if was_in_head else 0
            if self._head_raw_bytes > self.guard.limits.max_head_bytes:
                self._reject_head_too_large()

    # -- httptools callbacks -------------------------------------------------------------------
    def _begin_head(self) -> None:
        self._phase = "head"
        self._head_raw_bytes = self._head_bytes = self._num_headers = 0
        if not self._busy():
            self._set_slot(Slot.HEAD)
        self._arm(self.guard.limits.head_timeout_s, self._on_head_timeout)

    def on_message_begin(self) -> None:
        if self._phase != "head":  # a pipelined head, begun inside a read that ended another
            self._begin_head()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._head_bytes += len(url)
        if self._head_bytes > self.guard.limits.max_head_bytes:
            self._reject_head_too_large()
            raise _Rejected

    def on_header(self, name: bytes, value: bytes) -> None:
        self._num_headers += 1
        self._head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        limits = self.guard.limits
        if self._num_headers > limits.max_headers or self._head_bytes > limits.max_head_bytes:
            self._reject_head_too_large()
            raise _Rejected
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._phase = "body"
        self._set_slot(Slot.BUSY)
        self._arm(self.guard.limits.body_timeout_s, self._on_body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._phase = "idle"
        self._disarm()
        self._settle()  # nothing in flight: an answer came before the body ended

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._unset_keepalive_if_required()  # uvicorn's whole-second keep-alive timer: ours instead
        self._settle()

    def shutdown(self) -> None:
        if self._rejected:
            self.transport.close()
            return
        super().shutdown()

    # -- deadlines and refusals ------------------------------------------------------------------
    def _on_idle_timeout(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.guard.note("idle_timeout")
            self._set_slot(Slot.GONE)
            self.transport.close()

    def _on_head_timeout(self) -> None:
        self._timer = None
        self.guard.note("head_timeout")
        self._reject(
            HTTPStatus.REQUEST_TIMEOUT,
            ErrorKind.INVALID_REQUEST,
            "head_timeout",
            f"the request head did not arrive within {self.guard.limits.head_timeout_s:g} s",
        )

    def _on_body_timeout(self) -> None:
        self._timer = None
        if self.flow.read_paused:  # the app is not reading (back-pressure): not the client's delay
            self._arm(self.guard.limits.body_timeout_s, self._on_body_timeout)
            return
        self.guard.note("body_timeout")
        if self.cycle is None or self.cycle.response_complete:  # answered already (say, 413): just close
            self._set_slot(Slot.GONE)
            self.transport.close()
            return
        self._reject(
            HTTPStatus.REQUEST_TIMEOUT,
            ErrorKind.INVALID_REQUEST,
            "body_timeout",
            f"the request body did not arrive within {self.guard.limits.body_timeout_s:g} s",
        )

    def _reject_head_too_large(self) -> None:
        limits = self.guard.limits
        self.guard.note("head_too_large")
        self._reject(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorKind.TOO_LARGE,
            "headers_too_large",
            f"request heads are limited to {limits.max_head_bytes} bytes and {limits.max_headers} header fields",
        )

    def displace(self) -> None:
        """Make room for a new connection: close this one, which has no request in progress."""
        self._disarm()
        self._set_slot(Slot.GONE)
        self.transport.close()

    def _reject(
        self, status: HTTPStatus, kind: ErrorKind, code: str, message: str, retry_after_s: int | None = None
    ) -> None:
        """Answer ``status`` with an error body and close, reading the client's bytes meanwhile."""
        if self._rejected or self.transport.is_closing():
            return
        self._rejected = True
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # the app is answering: no room for ours
                self._set_slot(Slot.GONE)
                self.transport.close()
                return
            cycle.disconnected = True  # the app's receive() sees a disconnect; its sends are dropped
            cycle.message_event.set()
        body = orjson.dumps({"error": {"message": message, "type": kind.value, "code": code, "param": None}})
        head = [
            f"HTTP/1.1 {status.value} {status.phrase}",
            f"date: {formatdate(usegmt=True)}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            "connection: close",
        ]
        if retry_after_s is not None:
            head.append(f"retry-after: {retry_after_s}")
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body)
        if self.guard.num_lingering >= self.guard.max_lingering or not self.transport.can_write_eof():
            self._set_slot(Slot.GONE)
            self.transport.close()
            return
        self._set_slot(Slot.LINGERING)
        self.transport.write_eof()
        self.flow.resume_reading()
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)


def protocol_class(guard: ConnectionGuard) -> type[LimitedHttpProtocol]:
    """A protocol class bound to one server's guard (uvicorn instantiates it per connection)."""
    return type("PolyrayHttpProtocol", (LimitedHttpProtocol,), {"guard": guard})


# -- draining ----------------------------------------------------------------------------------------


@dataclass
class DrainState:
    """Set by the first SIGTERM/SIGINT; read by ``DrainGate`` on every request (one thread)."""

    grace_s: float
    reason: str | None = None
    deadline: float = field(default=math.inf)  # time.monotonic() when the listener closes

    def begin(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.deadline = time.monotonic() + self.grace_s


class DrainGate:
    """ASGI wrapper: while draining, new model work gets 503 ``shutting_down`` and every
    response carries ``Connection: close`` (clients reconnect, to another instance once the load
    balancer has seen ``/readyz`` fail); the reason reaches ``/readyz`` in the request scope."""

    def __init__(self, app: ASGIApp, drain: DrainState) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reason = self.drain.reason
        if scope["type"] != "http" or reason is None:
            await self.app(scope, receive, send)
            return
        scope[DRAINING_SCOPE_KEY] = reason
        if is_new_work(scope["method"], scope["path"]):
            response = error_response(
                ErrorKind.OVERLOADED,
                f"the server is shutting down ({reason}); retry: another instance will answer",
                code="shutting_down",
                retry_after_s=1.0,
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)


class PolyrayServer(uvicorn.Server):
    """uvicorn's server with the drain sequence above and an ``on_ready`` hook.

    Signals: the first drains (or, during start-up, exits once start-up ends: nothing to
    drain); the second exits promptly. Nothing is re-raised after serving: ``exit_code`` says
    how it ended.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        drain: DrainState,
        shutdown_timeout_s: float,
        on_ready: Callable[[], None],
        on_abort: Callable[[], None],
        guard: ConnectionGuard | None = None,
    ) -> None:
        super().__init__(config)
        self.drain = drain
        self.guard = guard
        self.shutdown_timeout_s = shutdown_timeout_s
        self.on_ready = on_ready
        self.on_abort = on_abort
        self.num_signals = 0
        self.exit_code = 0
        self._drain_logged = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            self.on_ready()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.num_signals += 1
        name = signal.Signals(sig).name
        if self.num_signals == 1 and self.started:
            self.drain.begin(f"{name} received")
        elif self.num_signals == 1:
            self.should_exit = True  # start-up in progress: uvicorn stops once it ends
        else:
            self.force_exit = self.should_exit = True
            self.exit_code = EXIT_FORCED
            if not self.started:  # a model may be loading or fitting for tens of seconds
                self.on_abort()
                os._exit(EXIT_FORCED)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.reason is not None and not self.should_exit:
            if not self._drain_logged:
                self._drain_logged = True
                log.info(
                    "draining (%s): /readyz answers 503 for %.1f s, then the listener closes (signal again to exit now)",
                    self.drain.reason,
                    self.drain.grace_s,
                )
            if time.monotonic() >= self.drain.deadline:
                self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = self.server_state
        for server in self.servers:
            server.close()
        for connection in list(state.connections):
            connection.shutdown()  # idle ones close now; busy ones after their response
        log.info("listener closed; %d requests in flight get up to %.0f s", len(state.tasks), self.shutdown_timeout_s)
        deadline = time.monotonic() + self.shutdown_timeout_s
        while (state.connections or state.tasks) and not self.force_exit and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.tasks:
            why = "a second signal" if self.force_exit else f"shutdown_timeout_s = {self.shutdown_timeout_s:g} s"
            log.warning("cancelling %d requests in flight (%s)", len(state.tasks), why)
            for connection in list(state.connections):
                connection.transport.abort()
            for task in list(state.tasks):
                task.cancel()
        await self._stop_lifespan()
        if self.guard is not None:
            log.info("connections over this run: %s", self.guard.summary())

    async def _stop_lifespan(self) -> None:
        """Stop the engine and flush the ledger; after a second signal, for FORCED_SHUTDOWN_S at most."""
        stopping = asyncio.ensure_future(self.lifespan.shutdown())
        forced_deadline: float | None = None
        while not stopping.done():
            if self.force_exit and forced_deadline is None:
                forced_deadline = time.monotonic() + FORCED_SHUTDOWN_S
            if forced_deadline is not None and time.monotonic() >= forced_deadline:
                log.error("the application did not stop within %.0f s of the second signal; exiting", FORCED_SHUTDOWN_S)
                stopping.cancel()
                return
            await asyncio.wait({stopping}, timeout=0.05)
        stopping.result()


# -- composition ---------------------------------------------------------------------------------------


@dataclass
class Server:
    """The whole server, built and not yet started: what ``build_server`` returns.

    ``running()`` starts the parts in dependency order and stops them in reverse through one
    ``AsyncExitStack``: tenancy (directory refresh, ledger flush) first, then the engine (load,
    warm, fit), then heads (training jobs embed through the engine). On the way down heads stop,
    the engine finishes what it accepted, and tenancy stops last, so the ledger's last flush
    holds the compute of every drained request. A part that fails to start stops the ones
    started before it. The app's lifespan enters ``running()``; ``polyray embed`` enters it
    without an app.
    """

    settings: Settings
    metrics: Metrics
    engine: Engine
    tenancy: Tenancy | None = None  # None: no auth, no ledger, no heads
    heads: HeadService | None = None  # with tenancy: heads live in the client database
    warmup: bool = True

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if self.tenancy is not None:
                await self.tenancy.start()
                stack.push_async_callback(self.tenancy.stop)
            await self.engine.start(warmup=self.warmup)
            stack.push_async_callback(self.engine.stop)
            if self.heads is not None:
                await self.heads.start()
                stack.push_async_callback(self.heads.stop)
            yield

    @cached_property
    def app(self) -> FastAPI:
        """The HTTP API over these parts; its lifespan is ``running()``. Built on first use:
        ``polyray embed`` needs none."""
        from polyray.api.app import create_app
        from polyray.api.state import AppState

        return create_app(AppState(self.engine, self.settings, self.metrics, self.tenancy, self.heads), self.running)


def build_server(
    settings: Settings,
    *,
    tenancy: bool = True,
    metrics: Metrics | None = None,
    warmup: bool = True,
    backends: Mapping[ModelRef, Backend] | None = None,
    on_keys: Callable[[BootstrapKeys], None] | None = None,
) -> Server:
    """The one composition root: config -> database -> tenancy -> cache -> engine -> heads -> app.

    ``polyray serve``, ``polyray embed`` (``tenancy=False``, its models unfitted), the benchmark
    server (a ``polyray serve`` process) and the tests build through here, so each runs the
    parts wired as production wires them. ``tenancy=False``: no client database, so no auth, no
    ledger and no heads. ``backends``: a test's own backends instead of ``settings.models``'.
    ``on_keys`` gets the keys an empty database was given before anything that can fail is
    built: they are stored hashed, so the caller must be able to show them however the start ends.
    Building loads the models (a broken one fails here); nothing runs until ``running()``.
    """
    from polyray.engine.build import build_engine
    from polyray.heads.service import HeadService
    from polyray.heads.store import HeadStore
    from polyray.observability.metrics import Metrics
    from polyray.tenancy.service import Tenancy

    metrics = metrics if metrics is not None else Metrics()
    opened = Tenancy.open(settings.tenancy, on_record=metrics.on_usage) if tenancy else None
    if opened is not None and opened.bootstrap_keys is not None and on_keys is not None:
        on_keys(opened.bootstrap_keys)
    engine = build_engine(
        settings, observer=metrics, accounts=opened.accounts if opened is not None else None, backends=backends
    )
    metrics.watch_cache(engine.cache_report)
    heads = None
    if opened is not None:
        metrics.watch_tenancy(opened.health_report)
        dims = {info.ref: info.dim for info in engine.models()}
        heads = HeadService(HeadStore(opened.db), engine, opened.accounts, dims=dims)
    return Server(settings, metrics, engine, opened, heads, warmup)


@dataclass(frozen=True)
class Ready:
    """What ``on_ready`` is told: where the server answers and the keys made on this first start."""

    url: str
    model: str  # the first served model's name, for an example request
    bootstrap_keys: BootstrapKeys | None


def display_url(host: str, port: int) -> str:
    """A URL a local client can use: a wildcard bind address is reached through loopback."""
    shown = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def serve(
    settings: Settings,
    *,
    host: str,
    port: int,
    log_level: str,
    on_ready: Callable[[Ready], None],
    on_not_started: Callable[[BootstrapKeys], None],
) -> int:
    """Build everything, serve until a signal, drain, and return the exit status (0: drained).

    ``on_not_started`` gets keys that were created on this start when the server then failed or
    was stopped before it was ready: they are stored hashed, so this is the one chance to show them.
    """
    # Before torch loads OpenMP: idle OpenMP threads yield the core instead of spinning. In a
    # server the event loop and the model share the cores; measured on 2 cores, spinning threads
    # slowed the HTTP work that overlaps compute, and an idle server's spinning cut another
    # process's throughput by 2-3x. Set OMP_WAIT_POLICY yourself to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if settings.tenancy.auth == "none" and host not in LOOPBACK_HOSTS:
        raise ConfigError(f"[tenancy] auth = 'none' is allowed only on loopback, not --host {host}")
    fd_limit = raise_fd_limit()
    limits = ConnectionLimits.from_config(settings.server, fd_limit)
    if limits.max_connections < settings.server.max_connections:
        log.warning(
            "max_connections lowered from %d to %d to fit the descriptor limit of %d",
            settings.server.max_connections,
            limits.max_connections,
            fd_limit,
        )
    keys: BootstrapKeys | None = None
    announced = False

    def made_keys(made: BootstrapKeys) -> None:
        nonlocal keys
        keys = made

    def ready() -> None:
        nonlocal announced
        announced = True
        on_ready(Ready(display_url(host, port), settings.models[0].name, keys))

    def abort() -> None:
        if keys is not None and not announced:
            on_not_started(keys)

    try:
        parts = build_server(settings, on_keys=made_keys)  # a broken model fails here
        drain = DrainState(settings.server.drain_grace_s)
        app = DrainGate(parts.app, drain)
        log.info(
            "connections: at most %d (descriptor limit %d); idle %gs, head %gs, body %gs; heads <= %d bytes, %d fields",
            limits.max_connections,
            fd_limit,
            limits.idle_timeout_s,
            limits.head_timeout_s,
            limits.body_timeout_s,
            limits.max_head_bytes,
            limits.max_headers,
        )
        guard = ConnectionGuard(limits)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,
            http=protocol_class(guard),
            ws="none",
            lifespan="on",
            timeout_keep_alive=max(1, math.ceil(limits.idle_timeout_s)),  # unused: the protocol times out
        )
        server = PolyrayServer(config, drain, settings.server.shutdown_timeout_s, ready, abort, guard)
        log.info("starting %s on %s", ", ".join(str(m.ref) for m in parts.engine.models()), display_url(host, port))
        server.run()
    finally:
        abort()
    if server.exit_code == EXIT_FORCED:
        # A second signal asked for an exit now: worker threads still busy (a batch computing, a
        # database call waiting on its timeout) would hold the interpreter's exit, so skip it.
        logging.shutdown()
        os._exit(EXIT_FORCED)
    return server.exit_code
