"""One model's waiting entries, oldest first, with a hard bound.

An entry is one text of one request. The queue has a single owner (the model's runner loop) plus
``push`` from request handlers; all of it runs on the event loop thread, so no lock is needed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from polyray.engine.batcher import Candidate
from polyray.errors import Overloaded


@dataclass(frozen=True)
class EntryResult:
    vector: np.ndarray
    queue_ms: float
    inference_ms: float
    batch_id: int


@dataclass(eq=False)
class Entry:
    ids: tuple[int, ...]
    enqueued_s: float
    deadline_s: float
    future: asyncio.Future[EntryResult] = field(repr=False)

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
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: list[Entry] = []

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, entries: list[Entry]) -> None:
        """All of a request's entries or none, so a request is never half-queued."""
        if len(self._entries) + len(entries) > self.max_entries:
            raise Overloaded(
                f"the queue is full ({len(self._entries)} of {self.max_entries} texts waiting); retry shortly",
                code="queue_full",
            )
        self._entries.extend(entries)

    def candidates(self) -> list[Candidate]:
        return [Candidate(e.num_tokens, e.enqueued_s) for e in self._entries]

    def take(self, indices: tuple[int, ...]) -> list[Entry]:
        chosen = set(indices)
        taken = [self._entries[i] for i in indices]
        self._entries = [e for i, e in enumerate(self._entries) if i not in chosen]
        return taken

    def remove_dead(self, now_s: float) -> tuple[list[Entry], list[Entry]]:
        """Split off entries whose caller has gone (cancelled) and those past their deadline."""
        self._entries, cancelled, expired = split_dead(self._entries, now_s)
        return cancelled, expired

    def drain(self) -> list[Entry]:
        entries, self._entries = self._entries, []
        return entries
