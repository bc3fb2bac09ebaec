"""In-flight dedup: one model version's queued or computing entries by cache key.

With the cache on, a text that another request has already queued (or that is computing now)
is not queued again: the later request *joins* that entry, shares its vector and splits its
compute (``Entry.sharers``). A request's wait is planned in two steps so a refusal leaves no
trace: ``claim`` decides, without changing anything, which entries it joins and which it
creates; the engine then submits the new ones to the runner (which may refuse them all) and
only after that ``commit`` joins and registers. Nothing awaits between the two, so the pair is
atomic with respect to other requests on the event loop.

A request that gives up ``leave``s each entry it waited for; the last one to leave cancels the
entry, so it is dropped before it costs compute. A finished entry leaves the table (``done``)
and hands its vector to ``on_computed`` (the engine's cache fill).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from polyray.engine.queue import Entry, EntryResult

# A request waits per distinct entry: its cache key, or the text's index when it has none
# (cache off, or a truncated text, whose vector is not the text's own).
WaitKey = bytes | int
# (cache key, vector) of every entry computed successfully.
ComputedSink = Callable[[bytes, np.ndarray], None]


def wait_key(index: int, keys: Sequence[bytes | None]) -> WaitKey:
    """The key a request waits on for text ``index``: its cache key, or its index without one."""
    key = keys[index]
    return key if key is not None else index


@dataclass
class Claim:
    """What one request will wait for: entries of other requests it joins, and its new entries
    (in text order, each text once). Nothing is changed until ``InflightTable.commit``."""

    joins: dict[WaitKey, Entry] = field(default_factory=dict)
    new: dict[WaitKey, Entry] = field(default_factory=dict)


class InflightTable(Mapping[bytes, Entry]):
    """Cache key -> the queued or computing entry, for one model version (a read-only mapping;
    changed only through ``commit`` and ``done``). Counts the joins it made (``num_deduplicated``)."""

    def __init__(self, on_computed: ComputedSink | None = None) -> None:
        self._entries: dict[bytes, Entry] = {}
        self.on_computed = on_computed
        self.num_deduplicated = 0

    def __getitem__(self, key: bytes) -> Entry:
        return self._entries[key]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def live(self, key: WaitKey) -> Entry | None:
        """The entry a request may join for ``key``: only a keyed one that has not finished."""
        if not isinstance(key, bytes):
            return None
        entry = self._entries.get(key)
        return entry if entry is not None and not entry.future.done() else None

    def claim(
        self,
        ids: Sequence[tuple[int, ...]],
        keys: Sequence[bytes | None],
        have: Sequence[bool],
        new_entry: Callable[[tuple[int, ...]], Entry],
        client: str,
    ) -> Claim:
        """Plan a request's wait: texts with ``have[i]`` (cache hits) need nothing; a text whose key
        is live joins that entry; the rest become new entries from ``new_entry`` (owner ``client``)."""
        claim = Claim()
        for i, text_ids in enumerate(ids):
            if have[i]:
                continue
            key = wait_key(i, keys)
            if key in claim.joins or key in claim.new:
                continue  # the same text twice in one request: one entry
            existing = self.live(key)
            if existing is not None:
                claim.joins[key] = existing
            else:
                entry = new_entry(text_ids)
                entry.key = key if isinstance(key, bytes) else None
                entry.sharers.append(client)
                claim.new[key] = entry
        return claim

    def commit(self, claim: Claim, client: str, deadline_s: float) -> dict[WaitKey, tuple[Entry, int]]:
        """Join the claimed entries and register the new ones (call once the new ones are queued).

        Returns the entries the request waits for, each with the request's slot among its sharers
        (``EntryResult.sharer_ns`` is indexed by it): joins first, then new entries.
        """
        waits: dict[WaitKey, tuple[Entry, int]] = {}
        for key, entry in claim.joins.items():
            waits[key] = (entry, self.join(entry, client, deadline_s))
        for key, entry in claim.new.items():
            waits[key] = (entry, 0)
            self.submit(entry)
        return waits

    def join(self, entry: Entry, client: str, deadline_s: float) -> int:
        """One more request waits for ``entry``: it keeps the entry alive to the later deadline and
        shares its compute. Returns the request's slot among the sharers."""
        entry.num_waiters += 1
        entry.deadline_s = max(entry.deadline_s, deadline_s)
        entry.sharers.append(client)
        self.num_deduplicated += 1
        return len(entry.sharers) - 1

    def submit(self, entry: Entry) -> None:
        """Make a queued keyed entry joinable until it finishes (unkeyed entries are not shared)."""
        if entry.key is None:
            return
        self._entries[entry.key] = entry
        entry.future.add_done_callback(functools.partial(self.done, entry))

    def done(self, entry: Entry, fut: asyncio.Future[EntryResult]) -> None:
        """``entry`` finished (result, error or cancelled): leave the table; pass a vector on."""
        assert entry.key is not None
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if self.on_computed is None or fut.cancelled() or fut.exception() is not None:
            return
        self.on_computed(entry.key, fut.result().vector)


def leave(entry: Entry) -> None:
    """A request stops waiting for ``entry``; the last one to leave drops it before compute."""
    entry.num_waiters -= 1
    if entry.num_waiters == 0 and not entry.future.done():
        entry.future.cancel()
