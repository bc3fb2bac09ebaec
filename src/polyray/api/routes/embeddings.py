"""POST /v1/embeddings, OpenAI-compatible."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from polyray.api.auth import client_name
from polyray.api.body import CLIENT_CLOSED_REQUEST, read_json
from polyray.api.errors import polyray_error_response
from polyray.api.openapi import EmbeddingsResponse, body, errors, ok
from polyray.api.protocol import EmbeddingsRequest, check_dimensions, format_embedding, parse_embeddings_request
from polyray.api.state import AppState
from polyray.errors import PolyrayError
from polyray.types import EmbedRequest, EmbedResult

router = APIRouter()
ROUTE = "/v1/embeddings"


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@router.post(
    ROUTE,
    responses={**ok(EmbeddingsResponse), **errors(400, 401, 403, 404, 413, 429, 503)},
    openapi_extra=body(EmbeddingsRequest),
)
async def create_embeddings(request: Request) -> Response:
    """Embed a text or a list of texts (OpenAI-compatible)."""
    state: AppState = request.app.state.polyray
    try:
        response = await _embed(request, state)
    except PolyrayError as exc:
        state.metrics.requests.labels(ROUTE, exc.kind.value).inc()
        return polyray_error_response(exc)
    state.metrics.requests.labels(ROUTE, "ok" if response.status_code == 200 else "disconnected").inc()
    return response


async def _embed(request: Request, state: AppState) -> Response:
    server = state.settings.server
    client = client_name(request)  # before reading the body: an unauthenticated caller costs nothing
    payload = await read_json(request, server.max_body_bytes)
    req, texts = parse_embeddings_request(payload, server.max_items)
    ref = state.engine.resolve(req.model)
    check_dimensions(req.dimensions, state.dims[ref])
    engine_task = asyncio.ensure_future(
        state.engine.embed(EmbedRequest(req.model, texts, client=client, truncate=server.truncate))
    )
    disconnect_task = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait([engine_task, disconnect_task], return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect_task.cancel()
    if not engine_task.done():  # the caller left: cancelling drops its texts before compute
        engine_task.cancel()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    result = engine_task.result()
    return embeddings_response(result, req.encoding_format)


def embeddings_response(result: EmbedResult, encoding_format: str) -> Response:
    usage = result.usage
    body: dict[str, Any] = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": format_embedding(vec, encoding_format)}
            for i, vec in enumerate(result.vectors)
        ],
        "model": str(result.model),
        "usage": {"prompt_tokens": usage.num_tokens, "total_tokens": usage.num_tokens},
    }
    headers = {
        "X-Polyray-Queue-Ms": f"{usage.queue_ms:.3f}",
        "X-Polyray-Inference-Ms": f"{usage.inference_ms:.3f}",
        "X-Polyray-Compute-Ms": f"{usage.compute_ns / 1e6:.3f}",
        "Server-Timing": f"queue;dur={usage.queue_ms:.3f}, inference;dur={usage.inference_ms:.3f}",
    }
    if result.truncated:
        # OpenAI has no field for this; an extra field is ignored by its SDK, and the header is
        # visible to any client.
        body["truncated_inputs"] = list(result.truncated)
        headers["X-Polyray-Truncated-Inputs"] = ",".join(map(str, result.truncated))
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)
