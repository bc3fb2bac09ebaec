"""Authentication: API key → principal, from an in-memory snapshot of the database.

Request handlers never touch the database: ``authenticate`` hashes the key and looks it up in
the current snapshot (a dict swap makes refreshes atomic for readers). The snapshot is reloaded
every ``refresh_interval_s`` (changes made with ``polyray clients`` or by another replica) and at
once after this server's own admin API changes something. A refresh has a deadline
(``db_timeout_s``): in a database outage the server keeps serving on the last snapshot, logs one
line when the outage starts and one when it ends, and counts the failures (a metric).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from polyray.db.connection import DEFAULT_DB_TIMEOUT_S, call_with_deadline
from polyray.errors import Forbidden, Unauthenticated
from polyray.tenancy.keys import ADMIN_ROLE, hash_key
from polyray.tenancy.model import ClientRecord
from polyray.tenancy.store import ClientStore, Snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    """Who is calling: an admin (``client`` None) or a client."""

    role: str
    client: ClientRecord | None

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN_ROLE


class ClientDirectory:
    def __init__(
        self, store: ClientStore, refresh_interval_s: float = 2.0, db_timeout_s: float = DEFAULT_DB_TIMEOUT_S
    ) -> None:
        self.store = store
        self.refresh_interval_s = refresh_interval_s
        self.call_timeout_s = db_timeout_s + 1.0  # the watchdog cuts at db_timeout_s; this bounds a reconnect too
        self._snapshot = Snapshot({}, {})
        self._task: asyncio.Task[None] | None = None
        self.num_refresh_failures = 0
        self.healthy = True

    def load(self) -> None:
        self._snapshot = self.store.snapshot()

    async def refresh(self) -> None:
        self._snapshot = await call_with_deadline(self.call_timeout_s, self.store.snapshot)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="client-directory")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep serving on the last snapshot while the database is away
                self.num_refresh_failures += 1
                if self.healthy:
                    first = (str(exc).strip().splitlines() or [""])[0][:200]
                    log.warning(
                        "client directory: refresh failed (%s: %s); serving on the last snapshot until it succeeds",
                        type(exc).__name__,
                        first,
                    )
                self.healthy = False
                continue
            if not self.healthy:
                log.warning("client directory: refresh works again (%d failed meanwhile)", self.num_refresh_failures)
                self.healthy = True

    def client(self, name: str) -> ClientRecord | None:
        return self._snapshot.clients.get(name)

    def authenticate(self, key: str | None) -> Principal:
        if not key:
            raise Unauthenticated(
                "no API key: send 'Authorization: Bearer <key>' (polyray serve prints a first key on an empty "
                "database; polyray clients create NAME makes more)",
                code="missing_api_key",
            )
        found = self._snapshot.keys.get(hash_key(key))
        if found is None:
            raise Unauthenticated("the API key is not valid (unknown or revoked)", code="invalid_api_key")
        role, owner = found
        if owner is None:
            return Principal(role, None)
        client = self._snapshot.clients[owner]
        if client.disabled:
            raise Forbidden(f"client {owner!r} is disabled", code="client_disabled")
        return Principal(role, client)
