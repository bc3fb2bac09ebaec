"""The OpenAPI document: request bodies, real error statuses, bearer auth, response shapes.

Why by hand: the routes read their bodies themselves (the key is checked before a byte of the
body is read, the body is refused at its size limit while it streams, a caller that hangs up is
dropped), so FastAPI never sees a body parameter and would document none, and it documents a
422 the server never sends (validation errors are 400 here, DESIGN.md's table). This module
declares, per route, which pydantic model its body is and which error statuses it can answer;
``install_openapi`` puts them into the document, so a tool (schemathesis, a client generator)
can test or use the API from ``/openapi.json`` alone. The models here only describe responses;
the routes serialize with orjson.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from polyray.errors import ErrorKind

BEARER = "bearer"

_STATUS_TEXT = {
    400: "Invalid request: bad JSON, an unknown field, a wrong type or value (the body names the param)",
    401: "No API key or an unknown one (send 'Authorization: Bearer <key>')",
    403: "The key may not use this route (admin vs client key, a disabled client, another client's data)",
    404: "Unknown model, version, head or client",
    405: "Method not allowed on this path",
    413: "The request body or an input is over the configured limit",
    429: "Over a quota or the client's share of the queue; retry after Retry-After seconds",
    503: "Overloaded, over the connection limit, or shutting down; retry after Retry-After seconds",
}


class ErrorDetail(BaseModel):
    message: str
    type: ErrorKind
    code: str
    param: str | None


class ErrorBody(BaseModel):
    """Every error: the OpenAI error shape."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 little-endian float32 bytes")


class EmbeddingsResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage
    truncated_inputs: list[int] | None = None


class ModelView(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    name: str
    version: str
    aliases: list[str]
    dimensions: int
    ready: bool


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelView]


class UsageReport(BaseModel):
    object: Literal["usage"]
    by: str
    since: str
    until: str | None
    data: list[dict[str, Any]]


class QuotaView(BaseModel):
    requests_per_s: float | None
    tokens_per_s: float | None
    max_concurrent: int | None
    daily_compute_s: float | None


class KeyView(BaseModel):
    prefix: str
    created_at: str
    revoked_at: str | None


class ClientView(BaseModel):
    name: str
    priority: Literal["interactive", "batch"]
    share: float
    weight: float
    disabled: bool
    quota: QuotaView
    keys: list[KeyView] | None = None
    api_key: str | None = Field(default=None, description="only when a client is created: shown once")


class ClientList(BaseModel):
    object: Literal["list"]
    data: list[ClientView]


class NewKey(BaseModel):
    name: str
    api_key: str


class HeadView(BaseModel):
    object: Literal["head"]
    id: str
    name: str
    owner: str
    ref: str
    kind: str
    model: str
    status: Literal["pending", "training", "ready", "failed"]
    progress: float
    error: str | None
    labels: list[str]
    dim_in: int | None
    dim_out: int | None
    metrics: dict[str, Any]
    num_examples: int | None
    options: dict[str, Any]
    shared_with: list[str]
    created_at: str | None
    updated_at: str | None


class HeadList(BaseModel):
    object: Literal["list"]
    data: list[HeadView]


class HeadDeleted(BaseModel):
    id: str
    object: Literal["head"]
    deleted: Literal[True]


class InferItem(BaseModel):
    index: int
    heads: dict[str, Any]
    embedding: list[float] | None = None


class InferResponse(BaseModel):
    object: Literal["list"]
    model: str
    data: list[InferItem]
    usage: Usage
    truncated_inputs: list[int] | None = None


_HEALTH: dict[str, Any] = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entries for the error statuses a route can answer, each the error shape."""
    # Explicit JSON content (not ``model=``): FastAPI would give the route's own media type, and
    # /metrics answers text/plain while its errors are JSON. install_openapi adds the schema.
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    return {s: {"description": _STATUS_TEXT[s], "content": content} for s in statuses}


def ok(model: type[BaseModel], status: int = 200, description: str = "Success") -> dict[int | str, dict[str, Any]]:
    return {status: {"model": model, "description": description}}


# Request-body models by (path, method); filled by ``body()`` as the routes are declared.
_BODIES: dict[str, type[BaseModel]] = {}


def body(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads ``model`` as its JSON body."""
    _BODIES[model.__name__] = model
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


# Routes anyone may call (probes); /metrics takes a key optionally (per-client series need one).
PUBLIC: list[dict[str, list[str]]] = []
OPTIONAL_AUTH: list[dict[str, list[str]]] = [{}, {BEARER: []}]


def _drop_null(schema: dict[str, Any]) -> None:
    """``anyOf: [X, null]`` (FastAPI's rendering of ``X | None``) becomes ``X`` in place."""
    options = schema.get("anyOf")
    if isinstance(options, list):
        kept = [o for o in options if o != {"type": "null"}]
        if len(kept) == 1:
            del schema["anyOf"]
            schema.update(kept[0])


def install_openapi(app: FastAPI) -> None:
    """Replace FastAPI's generator with one that adds bodies, drops 422s and declares bearer auth."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
        for name, model in _BODIES.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[name] = schema
        health = {"description": "The status", "content": {"application/json": {"schema": _HEALTH}}}
        for probe in ("/healthz", "/readyz"):
            for operation in doc.get("paths", {}).get(probe, {}).values():
                operation["security"] = PUBLIC  # probes carry no key
                not_ready = {"anyOf": [_HEALTH, {"$ref": "#/components/schemas/ErrorBody"}]}  # or over the limit
                operation["responses"] = {
                    "200": health,
                    "503": {
                        "description": "Not ready, or draining",
                        "content": {"application/json": {"schema": not_ready}},
                    },
                }
        error_schema = {"$ref": "#/components/schemas/ErrorBody"}
        error_body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(error_body.pop("$defs", {}))
        schemas["ErrorBody"] = error_body
        for path in doc.get("paths", {}).values():
            for operation in path.values():
                for parameter in operation.get("parameters", []):
                    _drop_null(parameter["schema"])  # a query string cannot carry null: absent is None
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)  # validation errors are 400 here
                # Any route refuses an unknown or repeated query parameter (api.body.strict_query),
                # and polyray serve answers any request 503 beyond its connection limit.
                for status in ("400", "503"):
                    responses.setdefault(
                        status,
                        {
                            "description": _STATUS_TEXT[int(status)],
                            "content": {"application/json": {"schema": error_schema}},
                        },
                    )
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        doc["components"]["securitySchemes"] = {
            BEARER: {
                "type": "http",
                "scheme": "bearer",
                "description": "A client key (or an admin key for /v1/admin); the CLI's --key, "
                "the SDK's api_key, or $POLYRAY_API_KEY",
            }
        }
        doc["security"] = [{BEARER: []}]
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
