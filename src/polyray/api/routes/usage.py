"""GET /v1/usage: a client reads its own usage (admins read anyone's, or all, here or on /v1/admin/usage)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Literal

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from polyray.api.auth import principal, require_admin
from polyray.api.openapi import UsageReport, errors, ok
from polyray.api.state import AppState
from polyray.api.tenancy_protocol import usage_view
from polyray.errors import Forbidden
from polyray.tenancy.reports import GROUPINGS, usage_totals
from polyray.timewindow import parse_time

router = APIRouter()

Grouping = Literal["client", "model", "day", "minute"]
assert set(Grouping.__args__) == set(GROUPINGS)  # type: ignore[attr-defined]

_TIME_HELP = "ISO 8601 date or date-time (UTC unless it names a zone), or relative: -30m, -24h, -7d"
_SINCE = Query(default=None, description=f"start of the window (default -24h); {_TIME_HELP}")
_UNTIL = Query(default=None, description=f"end of the window, exclusive (default: now); {_TIME_HELP}")
_BY = Query(default="client", description="how rows are grouped")
_CLIENT = Query(default=None, description="one client's rows (a client key may name only itself)")
_RESPONSES = {**ok(UsageReport), **errors(400, 401, 403)}


async def _report(request: Request, client: str | None, since: str | None, until: str | None, by: str) -> Response:
    state: AppState = request.app.state.polyray
    if state.tenancy is None:
        raise Forbidden("this server runs without a usage ledger", code="no_tenancy")
    start = parse_time(since, "since", datetime.now(UTC) - timedelta(days=1))
    end = parse_time(until, "until", None)
    assert start is not None
    await state.tenancy.ledger.flush()  # the caller sees its latest requests, not the last flush
    totals = await asyncio.to_thread(usage_totals, state.tenancy.db, start, end, by, client)
    return Response(orjson.dumps(usage_view(totals, by, start, end)), media_type="application/json")


@router.get("/v1/usage", responses=_RESPONSES)
async def own_usage(
    request: Request,
    since: str | None = _SINCE,
    until: str | None = _UNTIL,
    by: Grouping = _BY,
    client: str | None = _CLIENT,
) -> Response:
    """Usage totals: a client key reads its own; an admin key anyone's (``client=``) or all."""
    who = principal(request)
    if who is not None and who.is_admin:
        return await _report(request, client, since, until, by)
    own = who.client.name if who is not None and who.client is not None else None
    if who is not None and client is not None and client != own:
        raise Forbidden("a client may read only its own usage", code="not_your_usage")
    return await _report(request, own if who is not None else client, since, until, by)


@router.get("/v1/admin/usage", responses=_RESPONSES)
async def all_usage(
    request: Request,
    since: str | None = _SINCE,
    until: str | None = _UNTIL,
    by: Grouping = _BY,
    client: str | None = _CLIENT,
) -> Response:
    """Usage totals of every client (admin key)."""
    require_admin(request)
    return await _report(request, client, since, until, by)
