"""Models, health, readiness and metrics."""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from polyray.api.auth import principal
from polyray.api.state import AppState

router = APIRouter()
_STARTED_AT = int(time.time())


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    principal(request)  # any valid key (client or admin); probes use /healthz and /readyz
    state: AppState = request.app.state.polyray
    infos = state.engine.models()
    newest = {info.ref.name: info.ref for info in infos}  # models() is sorted: the last one wins
    data = [
        {
            "id": str(info.ref),
            "object": "model",
            "created": _STARTED_AT,
            "owned_by": "polyray",
            "name": info.ref.name,
            "version": info.ref.version,
            "aliases": [info.ref.name] if newest[info.ref.name] == info.ref else [],
            "dimensions": info.dim,
            "max_input_tokens": info.max_seq_tokens,
            "backend": info.backend,
            "precision": info.precision,
            "cosine_to_reference": info.cosine_to_reference,
            "batching": _batching_summary(info.batching),
            "ready": info.ready,
        }
        for info in infos
    ]
    return _json({"object": "list", "data": data})


def _batching_summary(batching: dict[str, Any] | None) -> dict[str, Any] | None:
    """The policy in force and the fit's one-line reason; the whole curve is at the admin route."""
    if batching is None:
        return None
    decision = batching.get("decision")
    return {key: batching[key] for key in ("budget_tokens", "max_wait_ms", "overhead_tokens", "fitted")} | (
        {"reason": decision["reason"], "expected_tokens_per_s": round(decision["expected_tokens_per_s"])}
        if decision
        else {}
    )


@router.get("/healthz")
async def healthz() -> Response:
    return _json({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    state: AppState = request.app.state.polyray
    models = {str(info.ref): info.ready for info in state.engine.models()}
    ready = state.engine.ready
    return _json({"status": "ready" if ready else "not_ready", "models": models}, 200 if ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state: AppState = request.app.state.polyray
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
