"""The engine's view of tenancy: who a client is, whether it may run now, and what it owes.

The engine calls ``client`` to look a client up (by the name the API authenticated), the quota
tracker to admit it, and ``charge``/``record_request`` to account for what it caused. Where the
charges go (the usage ledger, a test's list) is the ``sink``; without one nothing is stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from polyray.tenancy.model import ClientRecord
from polyray.tenancy.quotas import QuotaTracker
from polyray.types import ModelRef, UsageRecord

ANONYMOUS = "anonymous"
UsageSink = Callable[[UsageRecord], None]


class Accounts:
    def __init__(
        self,
        lookup: Callable[[str], ClientRecord | None] | None = None,
        sink: UsageSink | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._lookup = lookup
        self.sink = sink
        self.wall_clock = wall_clock
        self.quotas = QuotaTracker()
        self._anonymous: dict[str, ClientRecord] = {}
        self.charged_compute_ns = 0

    def client(self, name: str | None) -> ClientRecord:
        """The client record; a caller the directory does not know (auth off) is a default client."""
        name = name or ANONYMOUS
        found = self._lookup(name) if self._lookup is not None else None
        if found is not None:
            return found
        client = self._anonymous.get(name)
        if client is None:
            client = self._anonymous[name] = ClientRecord(id=0, name=name)
        return client

    def charge(self, client: str, ref: ModelRef, compute_ns: int) -> None:
        """Charge measured compute to ``client`` (a batch share or its tokenization)."""
        self.charged_compute_ns += compute_ns
        self.quotas.charge_compute(client, compute_ns / 1e9)
        if self.sink is not None:
            self.sink(UsageRecord(client, ref.name, ref.version, self.wall_clock(), compute_ns=compute_ns))

    def record_request(self, client: str, ref: ModelRef, num_texts: int, num_tokens: int, num_cached: int = 0) -> None:
        if self.sink is not None:
            self.sink(
                UsageRecord(
                    client,
                    ref.name,
                    ref.version,
                    self.wall_clock(),
                    num_requests=1,
                    num_texts=num_texts,
                    num_cached=num_cached,
                    num_tokens=num_tokens,
                )
            )
