"""Models, health, readiness and metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from polyray.api.auth import bearer_key, principal
from polyray.api.openapi import OPTIONAL_AUTH, ModelList, errors, ok
from polyray.api.state import AppState

router = APIRouter()
_STARTED_AT = int(time.time())


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


@router.get("/v1/models", responses={**ok(ModelList), **errors(401, 403)})
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


# Set in the request scope by polyray.server.DrainGate while the server drains (value: the reason).
DRAINING_SCOPE_KEY = "polyray.draining"


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    """200 when every model is loaded; 503 while loading, and while draining after SIGTERM/SIGINT
    (for ``drain_grace_s`` before the listener closes), so a load balancer stops sending first.
    Liveness is ``/healthz``, which stays 200 while draining: the process is healthy, only leaving."""
    state: AppState = request.app.state.polyray
    models = {str(info.ref): info.ready for info in state.engine.models()}
    draining = request.scope.get(DRAINING_SCOPE_KEY)
    if draining is not None:
        body = {"status": "draining", "reason": f"shutting down: {draining}", "models": models}
        return _json(body, 503)
    ready = state.engine.ready
    return _json({"status": "ready" if ready else "not_ready", "models": models}, 200 if ready else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus text format"}, **errors(401, 403)},
    openapi_extra={"security": OPTIONAL_AUTH},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics; the per-client series only for an admin key (``[server] metrics_auth``)."""
    state: AppState = request.app.state.polyray
    if _shows_clients(request, state):
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(_WithoutClients(state.metrics.registry)), media_type=CONTENT_TYPE_LATEST)


def _shows_clients(request: Request, state: AppState) -> bool:
    """Per-client series are tenants' data: shown with an admin key, or when the operator opened them.

    A key that is sent must be valid (401 otherwise: a scraper with a stale key should fail loudly,
    not silently lose series); no key, or a client key, gets the aggregate series."""
    if state.settings.server.metrics_auth == "none":
        return True
    if state.tenancy is None or not state.tenancy.auth_required:
        return True  # no keys exist: a loopback-only server whose operator is the caller
    if bearer_key(request) is None:
        return False
    who = principal(request)
    return who is not None and who.is_admin


class _WithoutClients(Collector):
    """The registry's families minus those labelled by client (polyray_client_*)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if family.name.startswith("polyray_client_") or any("client" in s.labels for s in family.samples):
                continue
            yield family
