"""Clients and their keys in the database: the one place that writes them.

Used by the admin API (from a thread) and by ``polyray clients`` directly, so an operator can
manage clients with the server stopped. A running server picks changes up through
``ClientDirectory.refresh`` (at most ``refresh_interval_s`` later; at once for its own admin API).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime

import sqlalchemy as sa

from polyray.db.connection import Database
from polyray.db.schema import api_keys, clients
from polyray.errors import InvalidRequest, NotFound
from polyray.tenancy.keys import ADMIN_ROLE, CLIENT_ROLE, generate_key, hash_key
from polyray.tenancy.model import ClientRecord, PriorityClass, Quota, check_name

_QUOTA_FIELDS = ("requests_per_s", "tokens_per_s", "max_concurrent", "daily_compute_s")


@dataclass(frozen=True)
class KeyInfo:
    prefix: str
    role: str
    client: str | None
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class Snapshot:
    """Everything auth needs, read in one transaction: key digest → (role, client name)."""

    clients: dict[str, ClientRecord]
    keys: dict[str, tuple[str, str | None]]


def _now() -> datetime:
    return datetime.now(UTC)


def _client(row: sa.Row) -> ClientRecord:  # type: ignore[type-arg]
    return ClientRecord(
        id=row.id,
        name=row.name,
        priority=PriorityClass(row.priority),
        share=row.share,
        quota=Quota(row.requests_per_s, row.tokens_per_s, row.max_concurrent, row.daily_compute_s),
        disabled=row.disabled,
    )


class ClientStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- clients -------------------------------------------------------------------------
    def create_client(
        self, name: str, priority: PriorityClass = PriorityClass.BATCH, share: float = 1.0, quota: Quota | None = None
    ) -> tuple[ClientRecord, str]:
        """Create a client and its first key; returns (client, key). The key is not stored."""
        try:
            check_name(name)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="name") from None
        if share <= 0:
            raise InvalidRequest(f"share must be > 0, got {share}", param="share")
        quota = quota or Quota()
        with self.db.begin() as conn:
            if conn.execute(sa.select(clients.c.id).where(clients.c.name == name)).first() is not None:
                raise InvalidRequest(f"client {name!r} already exists", param="name", code="client_exists")
            now = _now()
            client_id = conn.execute(
                clients.insert().values(
                    name=name,
                    priority=priority.value,
                    share=share,
                    disabled=False,
                    created_at=now,
                    updated_at=now,
                    **{f: getattr(quota, f) for f in _QUOTA_FIELDS},
                )
            ).inserted_primary_key[0]  # type: ignore[index]
            key = self._add_key(conn, CLIENT_ROLE, client_id)
        return ClientRecord(client_id, name, priority, share, quota), key

    def get(self, name: str) -> ClientRecord:
        with self.db.connect() as conn:
            row = conn.execute(sa.select(clients).where(clients.c.name == name)).first()
        if row is None:
            raise NotFound(f"no client named {name!r}", param="name", code="client_not_found")
        return _client(row)

    def all(self) -> list[ClientRecord]:
        with self.db.connect() as conn:
            return [_client(r) for r in conn.execute(sa.select(clients).order_by(clients.c.name))]

    def update(
        self,
        name: str,
        *,
        quota: Quota | None = None,
        priority: PriorityClass | None = None,
        share: float | None = None,
        disabled: bool | None = None,
    ) -> ClientRecord:
        client = self.get(name)
        if share is not None and share <= 0:
            raise InvalidRequest(f"share must be > 0, got {share}", param="share")
        new = replace(
            client,
            quota=quota if quota is not None else client.quota,
            priority=priority if priority is not None else client.priority,
            share=share if share is not None else client.share,
            disabled=disabled if disabled is not None else client.disabled,
        )
        with self.db.begin() as conn:
            conn.execute(
                clients.update()
                .where(clients.c.id == client.id)
                .values(
                    priority=new.priority.value,
                    share=new.share,
                    disabled=new.disabled,
                    updated_at=_now(),
                    **{f: getattr(new.quota, f) for f in _QUOTA_FIELDS},
                )
            )
        return new

    def rotate_key(self, name: str) -> str:
        """Revoke every key of the client and issue a new one (returned once)."""
        client = self.get(name)
        with self.db.begin() as conn:
            conn.execute(
                api_keys.update()
                .where(api_keys.c.client_id == client.id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=_now())
            )
            return self._add_key(conn, CLIENT_ROLE, client.id)

    def keys(self, name: str) -> list[KeyInfo]:
        client = self.get(name)
        with self.db.connect() as conn:
            rows = conn.execute(sa.select(api_keys).where(api_keys.c.client_id == client.id).order_by(api_keys.c.id))
            return [KeyInfo(r.prefix, r.role, name, r.created_at, r.revoked_at) for r in rows]

    # -- admin keys ----------------------------------------------------------------------
    def create_admin_key(self) -> str:
        with self.db.begin() as conn:
            return self._add_key(conn, ADMIN_ROLE, None)

    def is_empty(self) -> bool:
        """No client and no admin key yet: the state ``polyray serve`` bootstraps from."""
        with self.db.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(api_keys)).scalar_one() == 0

    # -- what auth reads -----------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self.db.connect() as conn:
            by_id = {r.id: _client(r) for r in conn.execute(sa.select(clients))}
            keys: dict[str, tuple[str, str | None]] = {}
            for r in conn.execute(sa.select(api_keys).where(api_keys.c.revoked_at.is_(None))):
                owner = by_id[r.client_id].name if r.client_id is not None else None
                keys[r.key_sha256] = (r.role, owner)
        return Snapshot({c.name: c for c in by_id.values()}, keys)

    @staticmethod
    def _add_key(conn: sa.Connection, role: str, client_id: int | None) -> str:
        key, prefix = generate_key(role)
        conn.execute(
            api_keys.insert().values(
                client_id=client_id, role=role, prefix=prefix, key_sha256=hash_key(key), created_at=_now()
            )
        )
        return key
