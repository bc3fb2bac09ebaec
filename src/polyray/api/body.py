"""Reading a request body: bounded while it streams, strict JSON, and a caller who hangs up dropped quietly.

Every route with a body reads it here, so the size limit, the JSON rules and the hang-up rule are
one rule: a caller that closes the connection mid-body gets no answer (nobody would read it), no
traceback is logged (it is not a server fault; a flood of them would bury real errors), one debug
line is, and ``polyray_requests_total{outcome="disconnected"}`` counts it.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from polyray.api.protocol import check_body_size
from polyray.api.state import AppState
from polyray.errors import InvalidRequest

log = logging.getLogger(__name__)

# Status for a caller that left before its answer: nginx's convention; nobody reads it.
CLIENT_CLOSED_REQUEST = 499


async def read_body(request: Request, limit_bytes: int | None = None) -> bytes:
    """The body, refusing (413) as soon as it is known to exceed the limit (the server's by default)."""
    if limit_bytes is None:
        state: AppState = request.app.state.polyray
        limit_bytes = state.settings.server.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit():
        check_body_size(int(declared), limit_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        check_body_size(size, limit_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit_bytes: int | None = None) -> Any:
    """The body as JSON (any value; the caller's model checks its shape)."""
    raw = await read_body(request, limit_bytes)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


def strict_query(request: Request) -> None:
    """Every route's query string: only the parameters it declares, each at most once (400 otherwise).

    The same rule as unknown body fields: ``?sincee=-7d`` silently answering the default window, or
    ``?model=a&model=b`` silently picking one, would hide a caller's mistake."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    known = {param.alias for param in getattr(dependant, "query_params", ())}
    seen: set[str] = set()
    for key, _ in request.query_params.multi_items():
        if key not in known:
            accepted = f"; this route takes {', '.join(sorted(known))}" if known else "; this route takes none"
            raise InvalidRequest(f"unknown query parameter {key!r}{accepted}", param=key)
        if key in seen:
            raise InvalidRequest(f"query parameter {key!r} is given more than once; send it once", param=key)
        seen.add(key)


def route_label(request: Request) -> str:
    """The route's path template (``/v1/heads/{head}``), never the raw path: bounded label values."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def on_client_gone(request: Request) -> Response:
    """A caller hung up mid-body (``ClientDisconnect``): count it, log one debug line, answer nobody."""
    state: AppState = request.app.state.polyray
    label = route_label(request)
    state.metrics.requests.labels(label, "disconnected").inc()
    client = request.client
    log.debug("%s %s: the caller closed the connection mid-body (%s)", request.method, label, client and client.host)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


__all__ = [
    "CLIENT_CLOSED_REQUEST",
    "ClientDisconnect",
    "on_client_gone",
    "read_body",
    "read_json",
    "route_label",
    "strict_query",
]
