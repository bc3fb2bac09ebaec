"""Admin API (admin key only): clients (create, list, show, change, disable, rotate keys) and the cache report.

Writes go to the database through ``ClientStore`` (in a thread) and then refresh this server's
directory at once, so a disabled client is refused from the next request on.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from polyray.api.auth import require_admin
from polyray.api.body import read_json
from polyray.api.openapi import ClientList, ClientView, NewKey, body, errors, ok
from polyray.api.state import AppState
from polyray.api.tenancy_protocol import CreateClient, UpdateClient, client_view, parse_body
from polyray.tenancy.service import Tenancy

router = APIRouter(prefix="/v1/admin")


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def _admin(request: Request) -> Tenancy:
    require_admin(request)
    state: AppState = request.app.state.polyray
    assert state.tenancy is not None  # require_admin refuses otherwise
    return state.tenancy


async def _json_body(request: Request) -> Any:
    return await read_json(request)


_ERRORS = errors(400, 401, 403, 404)
_BODY_ERRORS = errors(400, 401, 403, 404, 413)
_FREE_FORM = {"type": "object", "additionalProperties": True}


def _report(description: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": description, "content": {"application/json": {"schema": _FREE_FORM}}}, **_ERRORS}


@router.post(
    "/clients",
    responses={**ok(ClientView, 201, "Created; api_key is shown once"), **_BODY_ERRORS},
    openapi_extra=body(CreateClient),
    status_code=201,
)
async def create_client(request: Request) -> Response:
    tenancy = await _admin(request)
    body: CreateClient = parse_body(CreateClient, await _json_body(request))
    client, key = await asyncio.to_thread(
        tenancy.store.create_client, body.name, body.priority, body.share, body.quota()
    )
    await tenancy.directory.refresh()
    return _json({**client_view(client), "api_key": key}, 201)


@router.get("/clients", responses={**ok(ClientList), **_ERRORS})
async def list_clients(request: Request) -> Response:
    tenancy = await _admin(request)
    clients = await asyncio.to_thread(tenancy.store.all)
    return _json({"object": "list", "data": [client_view(c) for c in clients]})


@router.get("/clients/{name}", responses={**ok(ClientView), **_ERRORS})
async def show_client(request: Request, name: str) -> Response:
    tenancy = await _admin(request)
    client = await asyncio.to_thread(tenancy.store.get, name)
    keys = await asyncio.to_thread(tenancy.store.keys, name)
    return _json(client_view(client, keys))


@router.patch("/clients/{name}", responses={**ok(ClientView), **_BODY_ERRORS}, openapi_extra=body(UpdateClient))
async def update_client(request: Request, name: str) -> Response:
    tenancy = await _admin(request)
    body: UpdateClient = parse_body(UpdateClient, await _json_body(request))
    current = await asyncio.to_thread(tenancy.store.get, name)
    client = await asyncio.to_thread(
        lambda: tenancy.store.update(
            name,
            quota=body.quota_over(current.quota),
            priority=body.priority,
            share=body.share,
            disabled=body.disabled,
        )
    )
    await tenancy.directory.refresh()
    return _json(client_view(client))


@router.post("/clients/{name}/rotate-key", responses={**ok(NewKey), **_ERRORS})
async def rotate_key(request: Request, name: str) -> Response:
    tenancy = await _admin(request)
    key = await asyncio.to_thread(tenancy.store.rotate_key, name)
    await tenancy.directory.refresh()
    return _json({"name": name, "api_key": key})


@router.get("/cache", responses=_report("The cache report"))
async def cache_report(request: Request) -> Response:
    """Per model version: hits by tier, the local tier's shape, and the tuner's curve and decision."""
    require_admin(request)
    state: AppState = request.app.state.polyray
    report = state.engine.cache_report()
    return _json(report if report is not None else {"enabled": False})


@router.get("/models/{model}/batching", responses=_report("The batch policy and the fitted curve"))
async def batching_report(request: Request, model: str) -> Response:
    """The batch policy a model version serves with and, when fitted, the measured curve and decision."""
    require_admin(request)
    state: AppState = request.app.state.polyray
    ref = state.engine.resolve(model)
    info = next(i for i in state.engine.models() if i.ref == ref)
    return _json({"model": str(ref), **(info.batching or {})})


@router.post("/models/{model}/fit", responses={**_report("The new decision"), **errors(503)})
async def refit_budget(request: Request, model: str) -> Response:
    """Re-measure the batch budget on this hardware now (a few seconds; the model's batches wait)."""
    require_admin(request)
    state: AppState = request.app.state.polyray
    ref = state.engine.resolve(model)
    decision = await state.engine.refit(str(ref))
    return _json({"model": str(ref), **decision.as_dict()})
