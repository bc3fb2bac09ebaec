"""Request bodies and JSON views of the heads API (``/v1/heads``, ``/v1/infer``).

Every body model is strict (a string is never read as a bool or a number, ``"yes"`` is not
``true``) and forbids unknown fields, as ``/v1/embeddings`` does: one rule for every route.
Texts go through ``texts_from_input``, the same check ``/v1/embeddings`` makes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from polyray.api.protocol import INPUT_SCHEMA
from polyray.api.tenancy_protocol import NAME_SCHEMA, parse_body
from polyray.errors import InvalidRequest
from polyray.heads.examples import parse_jsonl
from polyray.heads.kinds import HeadKind, HeadSpec

MAX_HEADS_PER_REQUEST = 256


class CreateHead(BaseModel):
    """``examples`` (a list of ``{"text", "label"}``) or ``examples_jsonl`` (the same as JSON lines)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # The schemas document the rules; the service checks them (with codes such as invalid_head_kind).
    name: str = Field(json_schema_extra=NAME_SCHEMA)
    kind: str = Field(json_schema_extra={"enum": [k.value for k in HeadKind]})
    model: str = "minilm"
    examples: list[Any] | None = None
    examples_jsonl: str | None = None
    options: dict[str, Any] | None = None

    def records(self) -> list[object]:
        if (self.examples is None) == (self.examples_jsonl is None):
            raise InvalidRequest("send exactly one of 'examples' and 'examples_jsonl'", param="examples")
        return list(self.examples) if self.examples is not None else parse_jsonl(self.examples_jsonl or "")


class RetrainHead(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str


class ShareHead(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    clients: list[str] = Field(min_length=1)


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    input: Any = Field(json_schema_extra=INPUT_SCHEMA)
    heads: list[str] = Field(default_factory=list, max_length=MAX_HEADS_PER_REQUEST)
    return_embedding: bool = False


def parse(model: type[BaseModel], payload: Any) -> Any:
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return parse_body(model, payload)


def head_view(spec: HeadSpec) -> dict[str, Any]:
    return {
        "object": "head",
        "id": spec.head_id,
        "name": spec.name,
        "owner": spec.owner,
        "ref": spec.ref,
        "kind": spec.kind.value,
        "model": str(spec.model),
        "status": spec.status.value,
        "progress": round(spec.progress, 4),
        "error": spec.error,
        "labels": list(spec.labels),
        "dim_in": spec.dim_in,
        "dim_out": spec.dim_out,
        "metrics": dict(spec.metrics),
        "num_examples": spec.num_examples,
        "options": dict(spec.options),
        "shared_with": sorted(spec.shared_with),
        "created_at": spec.created_at.isoformat() if spec.created_at else None,
        "updated_at": spec.updated_at.isoformat() if spec.updated_at else None,
    }
