"""One model's waiting entries in fair-share order, with a hard bound overall and per client.

An entry is one text of one request. Entries are kept in start-time fair-queuing order
(``scheduler.FairQueue``, weights from the client's share and priority class), so the batcher's
"oldest first" becomes "smallest start tag first": a client flooding the queue only pushes its
own entries back. The queue has a single owner (the model's runner loop) plus ``push`` from
request handlers; all of it runs on the event-loop thread, so no lock is needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from polyray.engine.batcher import Candidate
from polyray.engine.scheduler import FairQueue
from polyray.errors import Overloaded, RateLimited


@dataclass(frozen=True)
class EntryResult:
    vector: np.ndarray
    queue_ms: float
    inference_ms: float
    batch_id: int
    compute_ns: int  # this entry's share of its batch's measured compute
    sharer_ns: tuple[int, ...] = ()  # that share split equally over ``Entry.sharers`` (dedup)


@dataclass(eq=False)
class Entry:
    ids: tuple[int, ...]
    enqueued_s: float
    deadline_s: float
    future: asyncio.Future[EntryResult] = field(repr=False)
    client: str = ""
    weight: float = 1.0
    interactive: bool = False
    # In-flight dedup (cache on): the cache key, the clients of every request that receives this
    # entry's vector (the owner first; the compute is split equally among them), and how many
    # requests still wait for it (the last one to leave cancels it before compute).
    key: bytes | None = None
    sharers: list[str] = field(default_factory=list)
    num_waiters: int = 1

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


def split_dead(entries: list[Entry], now_s: float) -> tuple[list[Entry], list[Entry], list[Entry]]:
    """(live, cancelled: the caller has gone, expired: past the deadline), order kept."""
    live: list[Entry] = []
    cancelled: list[Entry] = []
    expired: list[Entry] = []
    for entry in entries:
        if entry.future.done():
            cancelled.append(entry)
        elif entry.deadline_s <= now_s:
            expired.append(entry)
        else:
            live.append(entry)
    return live, cancelled, expired


class EntryQueue:
    """``max_queue_items`` overall; one client may hold at most ``max_client_fraction`` of it, so a
    flood from one client leaves room for the others (over it: 429 ``fair_share_queue``)."""

    def __init__(self, max_queue_items: int, max_client_fraction: float = 1.0) -> None:
        self.max_queue_items = max_queue_items
        self.max_client_queue_items = max(1, int(max_queue_items * max_client_fraction))
        self._fair: FairQueue[Entry] = FairQueue()
        self.tokens = 0  # Σ tokens of the queued entries

    def __len__(self) -> int:
        return len(self._fair)

    def push(self, entries: list[Entry], drain_s: Callable[[float], float] | None = None) -> None:
        """All of a request's entries or none, so a request is never half-queued.

        ``drain_s(tokens)``: how long serving that much queued work takes (``ServiceCost``), for a
        Retry-After that says when enough has drained; without it, 1 s.
        """
        mean_tokens = self.tokens / len(self._fair) if len(self._fair) else 0.0

        def retry_after_s(num_entries: int) -> float:
            return max(0.05, drain_s(num_entries * mean_tokens)) if drain_s is not None else 1.0

        excess = len(self._fair) + len(entries) - self.max_queue_items
        if excess > 0:
            raise Overloaded(
                f"the queue is full ({len(self._fair)} of {self.max_queue_items} texts waiting); retry shortly",
                code="queue_full",
                retry_after_s=retry_after_s(excess),
            )
        if entries:
            client = entries[0].client
            held = self._fair.num_waiting(client)
            if held and held + len(entries) > self.max_client_queue_items:
                raise RateLimited(
                    f"client {client!r} already has {held} texts waiting; one client may queue at most "
                    f"{self.max_client_queue_items} (fair share of the queue); retry when some are done",
                    code="fair_share_queue",
                    retry_after_s=retry_after_s(held + len(entries) - self.max_client_queue_items),
                )
        for entry in entries:
            self._fair.push(entry.client, entry, entry.num_tokens, entry.weight)
            self.tokens += entry.num_tokens

    def work_ahead(self, client: str, cost_tokens: float = 0.0, weight: float = 1.0) -> float:
        """Queued tokens served before the last entry of a request ``client`` pushes now
        (``FairQueue.work_ahead``)."""
        return self._fair.work_ahead(client, cost_tokens, weight)

    def tokens_waiting(self, client: str) -> int:
        return self._fair.tokens_waiting(client)

    def promote(self, entry: Entry, client: str, weight: float, interactive: bool) -> None:
        """A request of ``client`` joined ``entry`` (dedup): serve it at the better of the two places."""
        if interactive and not entry.interactive:
            entry.interactive = True
        self._fair.promote(entry, client, entry.num_tokens, weight)

    def candidates(self, limit: int | None = None) -> tuple[list[Candidate], list[int]]:
        """The first ``limit`` entries in fair order (the batcher looks at a window, not a flood),
        and their positions in the queue (for ``take``).

        When the window holds an interactive entry, only interactive entries are candidates: an
        interactive request's batch is neither slowed by batch-class entries riding along nor split
        across batches by the batch-class entries its fair tags interleave with. The inversion is
        bounded: a batch-class entry ahead in the window waits one batch more, and only entries
        within the window may go first. Batch-class batches are capped while interactive traffic
        is recent (see ``ModelRunner``).
        """
        limit = len(self._fair) if limit is None else limit
        if not len(self._fair):
            return [], []
        window = min(limit, len(self._fair))
        interactive_only = any(self._fair[i].item.interactive for i in range(window))
        candidates: list[Candidate] = []
        positions: list[int] = []
        for i, tagged in enumerate(self._fair):
            if len(candidates) >= limit:
                break
            entry = tagged.item
            if interactive_only and not entry.interactive:
                continue
            candidates.append(Candidate(entry.num_tokens, entry.enqueued_s))
            positions.append(i)
        return candidates, positions

    def head_is_batch_class(self) -> bool:
        return bool(len(self._fair)) and not self._fair[0].item.interactive

    def take(self, indices: tuple[int, ...]) -> list[Entry]:
        taken = [t.item for t in self._fair.take(indices)]
        self.tokens -= sum(e.num_tokens for e in taken)
        return taken

    def remove_dead(self, now_s: float) -> tuple[list[Entry], list[Entry]]:
        """Split off entries whose caller has gone (cancelled) and those past their deadline."""
        gone = self._fair.remove_if(lambda e: e.future.done() or e.deadline_s <= now_s)
        self.tokens -= sum(t.item.num_tokens for t in gone)
        _, cancelled, expired = split_dead([t.item for t in gone], now_s)
        return cancelled, expired

    def drain(self) -> list[Entry]:
        self.tokens = 0
        return [t.item for t in self._fair.drain()]
