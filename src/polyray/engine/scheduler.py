"""Fair share across clients: start-time fair queuing (SFQ) on tokens.

Each waiting entry gets a *start tag* when it is queued::

    start  = max(virtual, last_finish[client])
    finish = start + cost_tokens / weight

and entries are served in start-tag order (ties by arrival). ``virtual`` is the start tag of
the entry in service: the earliest entry of the last batch taken (always the queue's head). A client that floods the service pushes only its *own* tags ahead, so a
client with a steady load below its share finds its entries near the head of the queue; over any
interval in which two clients are both backlogged, the tokens each is served differ from their
weighted shares by at most one entry's cost per client (SFQ's fairness bound, Goyal et al. 1996).
A client returning from idle gets no credit for the time it was idle (``max`` with ``virtual``).

Batching does not change the rule: the batcher looks at the first ``window`` entries in tag
order and the entry with the smallest tag always goes in the next batch (see ``batcher``).
The queue is a plain data structure: no clock, no I/O, so it is tested exhaustively.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(order=True)
class Tagged(Generic[T]):
    """One queued item with its fair-queuing tags; orders by (start tag, arrival sequence)."""

    start: float
    seq: int
    finish: float = field(compare=False)
    client: str = field(compare=False)
    cost_tokens: int = field(compare=False)
    item: T = field(compare=False, repr=False)


class FairQueue(Generic[T]):
    """Items of many clients, kept in SFQ start-tag order."""

    def __init__(self) -> None:
        self.virtual = 0.0
        self._last_finish: dict[str, float] = {}
        self._items: list[Tagged[T]] = []
        self._seq = 0
        self._per_client: dict[str, int] = {}
        self._client_tokens: dict[str, int] = {}  # queued cost per client (admission's work estimate)
        self._client_weight: dict[str, float] = {}  # the weight of the client's latest queued item

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Tagged[T]]:
        return iter(self._items)

    def __getitem__(self, index: int) -> Tagged[T]:
        return self._items[index]

    def num_waiting(self, client: str) -> int:
        return self._per_client.get(client, 0)

    def tokens_waiting(self, client: str) -> int:
        return self._client_tokens.get(client, 0)

    def work_ahead(self, client: str, cost_tokens: float = 0.0, weight: float = 1.0) -> float:
        """Queued cost served before the *last* of ``cost_tokens`` of items ``client`` would push now
        (at ``weight``), in SFQ order. O(clients). With ``cost_tokens = 0``: before its first item.

        The new items start at ``S = max(virtual, last_finish[client])`` and the last of them near
        ``S + cost_tokens / weight``: all of the client's own queued items are ahead of it, and of
        another client ``c`` the items whose start tags lie below that. A request's own items
        interleave with the others' in fair order, so this is what delays its completion. ``c``'s items are tagged back to back, each advancing its tag by cost / weight,
        so its queued items start near ``head_c = last_finish[c] - backlog_c / weight_c`` and
        ``weight_c × (S - head_c)`` of its cost is ahead (at most all of it). An estimate: items
        taken out of order by the batcher's window or promoted by dedup shift it by a few items.
        """
        start = max(self.virtual, self._last_finish.get(client, 0.0)) + cost_tokens / weight
        ahead = 0.0
        for other, backlog in self._client_tokens.items():
            if other == client:
                ahead += backlog
                continue
            weight = self._client_weight[other]
            head = self._last_finish.get(other, self.virtual) - backlog / weight
            ahead += min(float(backlog), max(0.0, weight * (start - head)))
        return ahead

    def push(self, client: str, item: T, cost_tokens: int, weight: float) -> Tagged[T]:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        start = max(self.virtual, self._last_finish.get(client, 0.0))
        finish = start + cost_tokens / weight
        self._last_finish[client] = finish
        tagged = Tagged(start, self._seq, finish, client, cost_tokens, item)
        self._seq += 1
        bisect.insort(self._items, tagged)
        self._count(tagged, weight)
        return tagged

    def _count(self, tagged: Tagged[T], weight: float) -> None:
        client = tagged.client
        self._per_client[client] = self._per_client.get(client, 0) + 1
        self._client_tokens[client] = self._client_tokens.get(client, 0) + tagged.cost_tokens
        self._client_weight[client] = weight

    def promote(self, item: T, client: str, cost_tokens: int, weight: float) -> bool:
        """Re-tag a queued ``item`` for ``client`` if that would serve it sooner (in-flight dedup:
        a request joining another client's queued entry must not wait behind that client's
        backlog). True if the item moved. O(queue length); joins are rare next to pushes."""
        start = max(self.virtual, self._last_finish.get(client, 0.0))
        for i, tagged in enumerate(self._items):
            if tagged.item is item:
                if start >= tagged.start:
                    return False
                del self._items[i]
                self._forget([tagged])
                finish = start + cost_tokens / weight
                self._last_finish[client] = finish
                moved = Tagged(start, tagged.seq, finish, client, cost_tokens, item)
                bisect.insort(self._items, moved)
                self._count(moved, weight)
                return True
        return False

    def take(self, indices: tuple[int, ...] | list[int]) -> list[Tagged[T]]:
        """Remove the items at ``indices`` (positions in tag order) and advance virtual time."""
        chosen = set(indices)
        taken = [self._items[i] for i in sorted(chosen)]
        self._items = [t for i, t in enumerate(self._items) if i not in chosen]
        if taken:
            # Virtual time is the start tag of the item "in service": the earliest one taken (the
            # batcher always takes the head). Not the latest: a batch picks items by length from a
            # window, and jumping to its deepest tag would put every newcomer behind the items the
            # window skipped.
            self.virtual = max(self.virtual, taken[0].start)
        self._forget(taken)
        return taken

    def remove_if(self, predicate: Callable[[T], bool]) -> list[Tagged[T]]:
        """Remove the items for which ``predicate(item)`` is true (dead entries); keeps order."""
        keep: list[Tagged[T]] = []
        gone: list[Tagged[T]] = []
        for tagged in self._items:
            (gone if predicate(tagged.item) else keep).append(tagged)
        self._items = keep
        self._forget(gone)
        return gone

    def drain(self) -> list[Tagged[T]]:
        items, self._items = self._items, []
        self._per_client.clear()
        self._client_tokens.clear()
        self._client_weight.clear()
        return items

    def _forget(self, removed: list[Tagged[T]]) -> None:
        for tagged in removed:
            left = self._per_client[tagged.client] - 1
            if left:
                self._per_client[tagged.client] = left
                self._client_tokens[tagged.client] -= tagged.cost_tokens
            else:
                del self._per_client[tagged.client]
                del self._client_tokens[tagged.client]
                del self._client_weight[tagged.client]
        if not self._items:
            # Idle: drop per-client history so the map does not grow with every client ever seen.
            # Safe because every future start tag is max(virtual, ...) >= any finish we forget
            # only when that finish <= virtual; otherwise keep it (a flooder stays behind).
            self._last_finish = {c: f for c, f in self._last_finish.items() if f > self.virtual}
