"""The OpenAI-shaped error body, with the status of ``polyray.errors.STATUS_BY_KIND``.

The kind→status table itself lives in ``polyray.errors`` (the SDK reads statuses back with the
same table); this module adds the HTTP-only parts: headers, the body, and Starlette's own errors
(unknown route 404, wrong method 405, validation 422), named by the table read backwards.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match

from polyray.api.body import on_client_gone
from polyray.errors import KIND_BY_STATUS, RETRY_AFTER_KINDS, STATUS_BY_KIND, ErrorKind, PolyrayError

log = logging.getLogger(__name__)


def error_response(
    kind: ErrorKind,
    message: str,
    *,
    status: int | None = None,
    param: str | None = None,
    code: str | None = None,
    retry_after_s: float | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": {"message": message, "type": kind.value, "code": code or kind.value, "param": param}}
    headers = dict(headers or {})
    if retry_after_s is not None or kind in RETRY_AFTER_KINDS:
        # Retry-After is whole seconds by RFC 9110; an admission refusal's estimate is often tens of
        # ms, so it is also sent exactly as Retry-After-Ms, which OpenAI's Python SDK (and
        # polyray.Client) prefer: a refused burst comes back when the queue has drained, not a second later.
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s or 1.0)))
        if retry_after_s is not None:
            headers["Retry-After-Ms"] = str(max(1, math.ceil(retry_after_s * 1000.0)))
    if kind is ErrorKind.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = 'Bearer realm="polyray"'
    return Response(
        orjson.dumps(body), status_code=status or STATUS_BY_KIND[kind], headers=headers, media_type="application/json"
    )


def polyray_error_response(exc: PolyrayError) -> Response:
    return error_response(exc.kind, exc.message, param=exc.param, code=exc.code, retry_after_s=exc.retry_after_s)


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at this URL (Starlette's 405 names only the first route's)."""
    methods: set[str] = set()
    scope = {**request.scope, "type": "http", "method": "GET"}
    for route in _leaf_routes(app.router.routes):
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _leaf_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes themselves: FastAPI (0.165) keeps an included router as one wrapper route
    holding ``original_router``; our routers carry their prefixes, so their paths are complete."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaf_routes(inner.routes)
        else:
            yield route


def install_error_handlers(app: FastAPI) -> None:
    async def on_polyray_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, PolyrayError)
        return polyray_error_response(exc)

    async def on_validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        return error_response(
            ErrorKind.INVALID_REQUEST, f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param or None
        )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        # A status outside the table (405, 422) is still the request's fault: invalid_request.
        kind = KIND_BY_STATUS.get(exc.status_code, ErrorKind.INVALID_REQUEST)
        message = f"{exc.detail} ({request.method} {request.url.path})"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(app, request))
        return error_response(kind, message, status=exc.status_code, headers=headers)

    async def on_client_disconnect(request: Request, _: Exception) -> Response:
        return on_client_gone(request)

    async def on_unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(ErrorKind.BACKEND_ERROR, "internal error; it has been logged")

    app.add_exception_handler(PolyrayError, on_polyray_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    # Handled by ExceptionMiddleware, so it is not re-raised (and logged again) as a 500 would be.
    app.add_exception_handler(ClientDisconnect, on_client_disconnect)
    app.add_exception_handler(Exception, on_unexpected)
