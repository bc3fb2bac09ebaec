"""GET /v1/usage: a client reads its own usage (admins read anyone's, or all, here or on /v1/admin/usage)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from polyray.api.auth import principal, require_admin
from polyray.api.state import AppState
from polyray.api.tenancy_protocol import parse_time, usage_view
from polyray.errors import Forbidden
from polyray.tenancy.reports import usage_totals

router = APIRouter()


async def _report(request: Request, client: str | None) -> Response:
    state: AppState = request.app.state.polyray
    if state.tenancy is None:
        raise Forbidden("this server runs without a usage ledger", code="no_tenancy")
    params = request.query_params
    since = parse_time(params.get("since"), "since", datetime.now(UTC) - timedelta(days=1))
    until = parse_time(params.get("until"), "until", None)
    assert since is not None
    by = params.get("by", "client")
    await state.tenancy.ledger.flush()  # the caller sees its latest requests, not the last flush
    totals = await asyncio.to_thread(usage_totals, state.tenancy.db, since, until, by, client)
    return Response(orjson.dumps(usage_view(totals, by, since, until)), media_type="application/json")


@router.get("/v1/usage")
async def own_usage(request: Request) -> Response:
    who = principal(request)
    asked = request.query_params.get("client")
    if who is not None and who.is_admin:
        return await _report(request, asked)
    own = who.client.name if who is not None and who.client is not None else None
    if who is not None and asked is not None and asked != own:
        raise Forbidden("a client may read only its own usage", code="not_your_usage")
    return await _report(request, own if who is not None else asked)


@router.get("/v1/admin/usage")
async def all_usage(request: Request) -> Response:
    require_admin(request)
    return await _report(request, request.query_params.get("client"))
