"""Read the usage ledger back: totals grouped by client, model (version) or day, for a time range."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from polyray.db.connection import Database
from polyray.db.schema import usage
from polyray.errors import InvalidRequest

GROUPINGS = ("client", "model", "day", "minute")


@dataclass(frozen=True)
class UsageTotal:
    group: str
    num_requests: int
    num_texts: int
    num_cached: int
    num_tokens: int
    compute_s: float


def usage_totals(
    db: Database, since: datetime, until: datetime | None = None, by: str = "client", client: str | None = None
) -> list[UsageTotal]:
    """Sums over [since, until) grouped ``by``; only ``client``'s rows when given."""
    if by not in GROUPINGS:
        raise InvalidRequest(f"by must be one of {', '.join(GROUPINGS)}, got {by!r}", param="by")
    if by == "client":
        group_cols = [usage.c.client]
    elif by == "model":
        group_cols = [usage.c.model, usage.c.version]
    else:
        group_cols = [usage.c.minute]
    sums = [
        sa.func.sum(usage.c.num_requests),
        sa.func.sum(usage.c.num_texts),
        sa.func.sum(usage.c.num_cached),
        sa.func.sum(usage.c.num_tokens),
        sa.func.sum(usage.c.compute_ns),
    ]
    query = sa.select(*group_cols, *sums).where(usage.c.minute >= since)
    if until is not None:
        query = query.where(usage.c.minute < until)
    if client is not None:
        query = query.where(usage.c.client == client)
    query = query.group_by(*group_cols).order_by(*group_cols)
    totals: dict[str, list[int]] = {}
    with db.connect() as conn:
        for row in conn.execute(query):
            *groups, n_req, n_texts, n_cached, n_tokens, ns = row
            if by == "model":
                label = f"{groups[0]}@{groups[1]}"
            elif by in ("day", "minute"):
                moment = groups[0]
                label = moment.strftime("%Y-%m-%d") if by == "day" else moment.strftime("%Y-%m-%dT%H:%MZ")
            else:
                label = groups[0]
            acc = totals.setdefault(label, [0, 0, 0, 0, 0])
            for i, v in enumerate((n_req, n_texts, n_cached, n_tokens, ns)):
                acc[i] += int(v or 0)
    return [UsageTotal(label, a[0], a[1], a[2], a[3], a[4] / 1e9) for label, a in totals.items()]
