"""Settle a finished batch: split its measured compute, charge it, resolve its entries.

A batch's compute (worker wall time, integer ns) is split over its entries by padded tokens and
each entry's share again equally over the requests that shared it (``tenancy.costs``). Every
part is charged, whether or not its caller is still there, so charged compute always equals
measured compute to the nanosecond. ``split`` is pure; ``Settlement.charge`` and ``resolve`` are
the two side effects, kept apart so each can be tested alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from polyray.engine.queue import Entry, EntryResult
from polyray.errors import BackendError
from polyray.tenancy.costs import split_batch_compute, split_exact

RowOutcome = np.ndarray | BaseException
# (client, compute_ns): called on the event loop for every sharer of every entry of a computed batch.
ChargeSink = Callable[[str, int], None]


@dataclass(frozen=True)
class FinishedBatch:
    """What the worker returned for one batch: a row (vector or error) per entry and its compute."""

    entries: Sequence[Entry]
    rows: Sequence[RowOutcome]
    compute_ns: int  # 0 when the compute itself failed (``failed``)
    started_s: float  # on the runner's clock, when the worker started it
    batch_id: int
    failed: bool = False  # the worker raised (a bug: backend errors are contained per row)

    @property
    def lengths(self) -> list[int]:
        return [e.num_tokens for e in self.entries]

    @property
    def queue_ms(self) -> list[float]:
        """How long each entry waited in the queue before its batch started."""
        return [(self.started_s - e.enqueued_s) * 1000.0 for e in self.entries]

    @property
    def inference_ms(self) -> float:
        return self.compute_ns / 1e6

    @property
    def measured(self) -> bool:
        """Whether the compute is a measurement the cost line and the fitter may learn from."""
        return bool(self.compute_ns) and not self.failed


@dataclass(frozen=True)
class Settlement:
    """A batch's compute split over its entries (``shares_ns``) and each share over the entry's
    sharers (``sharer_ns``, owner first)."""

    batch: FinishedBatch
    shares_ns: tuple[int, ...]
    sharer_ns: tuple[tuple[int, ...], ...]

    def charges(self) -> Iterator[tuple[str, int]]:
        """(client, ns) for every sharer of every entry, in batch order; they add up to the compute."""
        for entry, parts in zip(self.batch.entries, self.sharer_ns, strict=True):
            yield from zip(sharers_of(entry), parts, strict=True)

    def charge(self, sink: ChargeSink | None) -> None:
        if sink is None:
            return
        for client, part_ns in self.charges():
            sink(client, part_ns)

    def resolve(self) -> int:
        """Give each waiting entry its vector or its error; returns how many nobody waited for
        (the caller left while the batch computed)."""
        batch = self.batch
        inference_ms = batch.inference_ms
        num_abandoned = 0
        for entry, row, waited_ms, share_ns, parts in zip(
            batch.entries, batch.rows, batch.queue_ms, self.shares_ns, self.sharer_ns, strict=True
        ):
            if entry.future.done():
                num_abandoned += 1
            elif isinstance(row, BaseException):
                entry.future.set_exception(BackendError(f"the model failed on this input: {row}"))
            else:
                entry.future.set_result(EntryResult(row, waited_ms, inference_ms, batch.batch_id, share_ns, parts))
        return num_abandoned


def sharers_of(entry: Entry) -> list[str]:
    """The clients that receive ``entry``'s vector (an entry queued without dedup: its owner)."""
    return entry.sharers or [entry.client]


def split(batch: FinishedBatch, padding_free: bool) -> Settlement:
    """Split ``batch.compute_ns`` exactly: by padded tokens over entries, equally over sharers."""
    shares_ns = split_batch_compute(batch.compute_ns, batch.lengths, padding_free)
    sharer_ns = tuple(
        tuple(split_exact(share_ns, [1] * len(sharers_of(entry))))
        for entry, share_ns in zip(batch.entries, shares_ns, strict=True)
    )
    return Settlement(batch, tuple(shares_ns), sharer_ns)
