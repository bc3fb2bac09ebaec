"""Task heads over HTTP: train, list, show, share, retrain, delete (``/v1/heads``) and ``POST /v1/infer``.

A head is named in paths by its id, its name (the caller's own) or ``owner/name``; ``?model=``
picks the version when a name exists for several. Every route needs a client key: heads belong
to clients, and admin keys spend no compute.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from polyray.api.auth import client_name
from polyray.api.body import read_json
from polyray.api.heads_protocol import CreateHead, InferRequest, RetrainHead, ShareHead, head_view, parse
from polyray.api.openapi import HeadDeleted, HeadList, HeadView, InferResponse, body, errors, ok
from polyray.api.protocol import format_embedding, texts_from_input
from polyray.api.state import AppState
from polyray.errors import Forbidden
from polyray.heads.service import HeadService

router = APIRouter()


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _heads(request: Request) -> tuple[HeadService, str]:
    """The head service and the calling client (authenticated before anything else is read)."""
    client = client_name(request)
    state: AppState = request.app.state.polyray
    if state.heads is None:
        raise Forbidden("this server runs without a client database: no heads", code="no_tenancy")
    return state.heads, client


async def _body(request: Request) -> Any:
    return await read_json(request)


_MODEL = Query(default=None, description="the model version, when the head's name exists for several")
_READ_ERRORS = errors(400, 401, 403, 404)
_WRITE_ERRORS = errors(400, 401, 403, 404, 413)


@router.post(
    "/v1/heads",
    responses={**ok(HeadView, 202, "Accepted for training"), **_WRITE_ERRORS},
    openapi_extra=body(CreateHead),
    status_code=202,
)
async def create_head(request: Request) -> Response:
    """Accept a head for training (202): it trains in the background; poll ``GET /v1/heads/{id}``."""
    heads, client = _heads(request)
    body: CreateHead = parse(CreateHead, await _body(request))
    spec = await heads.create(client, body.name, body.kind, body.model, body.records(), body.options)
    return _json(head_view(spec), 202)


@router.get("/v1/heads", responses={**ok(HeadList), **_READ_ERRORS})
async def list_heads(request: Request, model: str | None = _MODEL) -> Response:
    heads, client = _heads(request)
    ref = heads.engine.resolve(model) if model else None
    return _json({"object": "list", "data": [head_view(s) for s in heads.visible(client, ref)]})


@router.get("/v1/heads/{head:path}", responses={**ok(HeadView), **_READ_ERRORS})
async def show_head(request: Request, head: str, model: str | None = _MODEL) -> Response:
    heads, client = _heads(request)
    return _json(head_view(await heads.get(client, head, model)))


@router.delete("/v1/heads/{head:path}", responses={**ok(HeadDeleted), **_READ_ERRORS})
async def delete_head(request: Request, head: str, model: str | None = _MODEL) -> Response:
    heads, client = _heads(request)
    spec = await heads.delete(client, head, model)
    return _json({"id": spec.head_id, "object": "head", "deleted": True})


@router.post(
    "/v1/heads/{head:path}/retrain",
    responses={**ok(HeadView, 202, "Accepted for training"), **_WRITE_ERRORS},
    openapi_extra=body(RetrainHead),
    status_code=202,
)
async def retrain_head(request: Request, head: str, model: str | None = _MODEL) -> Response:
    """Train the same head for another model version from its stored examples (202)."""
    heads, client = _heads(request)
    body: RetrainHead = parse(RetrainHead, await _body(request))
    spec = await heads.retrain(client, head, body.model, source_model=model)
    return _json(head_view(spec), 202)


@router.post("/v1/heads/{head:path}/share", responses={**ok(HeadView), **_WRITE_ERRORS}, openapi_extra=body(ShareHead))
async def share_head(request: Request, head: str) -> Response:
    heads, client = _heads(request)
    body: ShareHead = parse(ShareHead, await _body(request))
    return _json(head_view(await heads.share(client, head, body.clients, share=True)))


@router.post(
    "/v1/heads/{head:path}/unshare", responses={**ok(HeadView), **_WRITE_ERRORS}, openapi_extra=body(ShareHead)
)
async def unshare_head(request: Request, head: str) -> Response:
    heads, client = _heads(request)
    body: ShareHead = parse(ShareHead, await _body(request))
    return _json(head_view(await heads.share(client, head, body.clients, share=False)))


@router.post(
    "/v1/infer",
    responses={**ok(InferResponse), **errors(400, 401, 403, 404, 413, 429, 503)},
    openapi_extra=body(InferRequest),
)
async def infer(request: Request) -> Response:
    """Embed each input once and apply every requested head to it (one stacked product)."""
    heads, client = _heads(request)
    state: AppState = request.app.state.polyray
    body: InferRequest = parse(InferRequest, await _body(request))
    texts = texts_from_input(body.input, state.settings.server.max_items)
    result = await heads.infer(client, body.model, texts, body.heads, truncate=state.settings.server.truncate)
    embedded = result.embedding
    data: list[dict[str, Any]] = []
    for i, row in enumerate(result.outputs):
        item: dict[str, Any] = {"index": i, "heads": dict(zip(result.names, row, strict=True))}
        if body.return_embedding:
            item["embedding"] = format_embedding(embedded.vectors[i], "float")
        data.append(item)
    out: dict[str, Any] = {
        "object": "list",
        "model": str(embedded.model),
        "data": data,
        "usage": {"prompt_tokens": embedded.usage.num_tokens, "total_tokens": embedded.usage.num_tokens},
    }
    if embedded.truncated:
        out["truncated_inputs"] = list(embedded.truncated)
    headers = {
        "X-Polyray-Queue-Ms": f"{embedded.usage.queue_ms:.3f}",
        "X-Polyray-Inference-Ms": f"{embedded.usage.inference_ms:.3f}",
        "X-Polyray-Heads-Ms": f"{result.heads_ns / 1e6:.3f}",
        "X-Polyray-Compute-Ms": f"{result.compute_ns / 1e6:.3f}",
    }
    return _json(out, headers=headers)
