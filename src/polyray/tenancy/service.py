"""Tenancy wired together for a server: database, client directory, quotas and usage ledger.

``Tenancy.open`` opens (and migrates) the database, bootstraps an empty one when asked, and
builds the ``Accounts`` the engine charges. ``start``/``stop`` run with the server: the directory
refreshes, the ledger flushes; ``stop`` flushes the last usage (to the spool if the database is
down, to be replayed on the next start).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from polyray.config import TenancyConfig, database_url, spool_path
from polyray.db.connection import Database, open_database, watchdog_of
from polyray.tenancy.accounts import Accounts
from polyray.tenancy.directory import ClientDirectory
from polyray.tenancy.journal import UsageJournal
from polyray.tenancy.ledger import UsageLedger, compute_s_today
from polyray.tenancy.model import PriorityClass
from polyray.tenancy.store import ClientStore
from polyray.types import UsageRecord

log = logging.getLogger(__name__)

FIRST_CLIENT = "default"


def journal_dir(spool: Path) -> Path:
    """The usage journal lives beside the spool (``usage-spool.jsonl`` -> ``usage-spool.journal/``)."""
    return spool.with_suffix(".journal")


@dataclass(frozen=True)
class BootstrapKeys:
    """Keys created on an empty database; shown once by ``polyray serve``."""

    client: str
    client_key: str
    admin_key: str


class Tenancy:
    def __init__(
        self,
        config: TenancyConfig,
        db: Database,
        spool: Path,
        on_record: Callable[[UsageRecord], None] | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.store = ClientStore(db)
        self.directory = ClientDirectory(self.store, config.refresh_interval_s, config.db_timeout_s)
        journal = UsageJournal(journal_dir(spool)) if config.journal else None
        self.ledger = UsageLedger(db, spool, config.flush_interval_s, db_timeout_s=config.db_timeout_s, journal=journal)
        self._on_record = on_record
        self.accounts = Accounts(self.directory.client, self._record)
        self.bootstrap_keys: BootstrapKeys | None = None

    @classmethod
    def open(cls, config: TenancyConfig, on_record: Callable[[UsageRecord], None] | None = None) -> Tenancy:
        db = open_database(database_url(config), timeout_s=config.db_timeout_s)
        tenancy = cls(config, db, spool_path(config), on_record)
        if config.auth == "keys" and config.bootstrap and tenancy.store.is_empty():
            _, client_key = tenancy.store.create_client(FIRST_CLIENT, PriorityClass.INTERACTIVE)
            tenancy.bootstrap_keys = BootstrapKeys(FIRST_CLIENT, client_key, tenancy.store.create_admin_key())
        tenancy.directory.load()
        now_wall_s = time.time()
        for client, used_s in compute_s_today(db, now_wall_s).items():
            tenancy.accounts.quotas.seed_compute_today(client, used_s, now_wall_s)
        return tenancy

    @property
    def auth_required(self) -> bool:
        return self.config.auth == "keys"

    def _record(self, rec: UsageRecord) -> None:
        self.ledger.record(rec)
        if self._on_record is not None:
            self._on_record(rec)

    async def start(self) -> None:
        await self.directory.start()
        await self.ledger.start()

    async def stop(self) -> None:
        await self.directory.stop()
        await self.ledger.stop()
        self.db.dispose()

    def health_report(self) -> dict[str, int]:
        """Ledger and directory counters for /metrics, read at scrape time."""
        watchdog = watchdog_of(self.db)
        return {
            "ledger_write_failures": self.ledger.num_failed_flushes,
            "ledger_spooled_batches": self.ledger.num_spooled_batches,
            "ledger_replayed_batches": self.ledger.num_replayed_batches,
            "ledger_recovered_batches": self.ledger.num_recovered_batches,
            "ledger_spool_batches": self.ledger.num_pending_batches,
            "ledger_healthy": int(self.ledger.healthy),
            "directory_refresh_failures": self.directory.num_refresh_failures,
            "db_call_timeouts": watchdog.num_cut if watchdog is not None else 0,
        }
