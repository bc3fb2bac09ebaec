"""Shared pieces of the reliability benches: closed-loop load against a ``ServeProcess``.

The server and PostgreSQL helpers live with the integration tests (``tests/integration/
postgres_support.py``: ``ServeProcess``, ``Forwarder``, ``usage_sums``) so the tests and the
benches exercise the same thing; this module puts that folder on ``sys.path``.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from postgres_support import Received, ServeProcess  # noqa: E402


@dataclass
class Load:
    """Closed-loop clients sending one request after another until ``stop``."""

    server: ServeProcess
    concurrency: int = 8
    told: Received = field(default_factory=Received)
    latencies_s: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.concurrency)]
        for t in self._threads:
            t.start()

    def stop(self) -> Received:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        return self.told

    def snapshot(self) -> Received:
        with self._lock:
            return Received(
                self.told.num_requests,
                self.told.num_texts,
                self.told.num_tokens,
                self.told.compute_ms,
                self.told.num_failed,
            )

    def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            began = time.perf_counter()
            got = self.server.embed(num_texts=1 + (i + n) % 3, timeout_s=30)
            took_s = time.perf_counter() - began
            n += 1
            with self._lock:
                self.told.add(got)
                if got.num_requests:
                    self.latencies_s.append(took_s)
            if got.num_failed:
                time.sleep(0.05)  # the server is gone (a kill): do not spin
