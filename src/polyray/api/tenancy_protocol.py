"""Request bodies and JSON views of the admin and usage API (pydantic lives in api/ only)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polyray.errors import InvalidRequest
from polyray.tenancy.model import NAME_PATTERN, ClientRecord, PriorityClass, Quota
from polyray.tenancy.reports import UsageTotal
from polyray.tenancy.store import KeyInfo

# Documents the name rule in the OpenAPI document; the store enforces it (fullmatch: no trailing newline).
NAME_SCHEMA: dict[str, Any] = {"pattern": NAME_PATTERN.pattern, "minLength": 1, "maxLength": 63}


# Upper bounds far above anything a server serves (null is "unlimited"): a share of 1e308 times
# the class weight overflows to inf (answered as null, and fair queueing divides by it), and
# rates near the float limit overflow the token buckets' arithmetic. Found by schemathesis.
MAX_RATE = 1e12
MAX_CONCURRENT = 1_000_000
MAX_SHARE = 1e6


class QuotaFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    requests_per_s: float | None = Field(default=None, gt=0, le=MAX_RATE)
    tokens_per_s: float | None = Field(default=None, gt=0, le=MAX_RATE)
    max_concurrent: int | None = Field(default=None, ge=1, le=MAX_CONCURRENT)
    daily_compute_s: float | None = Field(default=None, gt=0, le=MAX_RATE)


class CreateClient(QuotaFields):
    name: str = Field(json_schema_extra=NAME_SCHEMA)
    priority: PriorityClass = Field(default=PriorityClass.BATCH, strict=False)  # JSON sends the value as a string
    share: float = Field(default=1.0, gt=0, le=MAX_SHARE)

    def quota(self) -> Quota:
        return Quota(self.requests_per_s, self.tokens_per_s, self.max_concurrent, self.daily_compute_s)


class UpdateClient(QuotaFields):
    """Only the fields sent change; a quota sent as null becomes unlimited."""

    priority: PriorityClass | None = Field(default=None, strict=False)
    share: float | None = Field(default=None, gt=0, le=MAX_SHARE)
    disabled: bool | None = None

    def quota_over(self, current: Quota) -> Quota | None:
        names = ("requests_per_s", "tokens_per_s", "max_concurrent", "daily_compute_s")
        if not set(names) & self.model_fields_set:
            return None
        values = {n: getattr(self, n) if n in self.model_fields_set else getattr(current, n) for n in names}
        return Quota(**values)


def parse_body(model: type[BaseModel], payload: Any) -> Any:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"{where or 'body'}: {first['msg']}", param=where) from None


def client_view(client: ClientRecord, keys: list[KeyInfo] | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "name": client.name,
        "priority": client.priority.value,
        "share": client.share,
        "weight": client.weight,
        "disabled": client.disabled,
        "quota": {
            "requests_per_s": client.quota.requests_per_s,
            "tokens_per_s": client.quota.tokens_per_s,
            "max_concurrent": client.quota.max_concurrent,
            "daily_compute_s": client.quota.daily_compute_s,
        },
    }
    if keys is not None:
        view["keys"] = [
            {
                "prefix": k.prefix,
                "created_at": k.created_at.isoformat(),
                "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
            }
            for k in keys
        ]
    return view


def usage_view(totals: list[UsageTotal], by: str, since: datetime, until: datetime | None) -> dict[str, Any]:
    return {
        "object": "usage",
        "by": by,
        "since": since.isoformat(),
        "until": until.isoformat() if until else None,
        "data": [
            {
                by: t.group,
                "num_requests": t.num_requests,
                "num_texts": t.num_texts,
                "num_cached": t.num_cached,
                "num_tokens": t.num_tokens,
                "compute_s": t.compute_s,
            }
            for t in totals
        ],
    }
