"""The settlement step alone: a finished batch's compute split, charged and resolved, exactly."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from polyray.engine.queue import Entry
from polyray.engine.settlement import FinishedBatch, sharers_of, split
from polyray.errors import BackendError

CLIENTS = ("alice", "bob", "carol")
# Entries need futures, not a running loop: settlement never awaits.
_LOOP = asyncio.new_event_loop()


@pytest.fixture(scope="module", autouse=True)
def _close_loop() -> Iterator[None]:
    yield
    _LOOP.close()


def entry(num_tokens: int, client: str = "alice", sharers: list[str] | None = None, enqueued_s: float = 0.0) -> Entry:
    e = Entry(tuple(range(num_tokens)), enqueued_s, 10.0, _LOOP.create_future(), client)
    e.sharers = list(sharers or [])
    return e


def batch(entries: list[Entry], compute_ns: int, started_s: float = 1.0) -> FinishedBatch:
    rows = [np.full(2, i, dtype=np.float32) for i in range(len(entries))]
    return FinishedBatch(entries, rows, compute_ns, started_s, batch_id=7)


entries_strategy = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=512),
        st.sampled_from(CLIENTS),
        st.lists(st.sampled_from(CLIENTS), max_size=4),
    ),
    min_size=1,
    max_size=16,
)


@given(spec=entries_strategy, compute_ns=st.integers(min_value=0, max_value=10**12), padding_free=st.booleans())
def test_charges_add_up_to_the_measured_compute_exactly(
    spec: list[tuple[int, str, list[str]]], compute_ns: int, padding_free: bool
) -> None:
    entries = [entry(n, client, sharers) for n, client, sharers in spec]
    settlement = split(batch(entries, compute_ns), padding_free)
    charges = list(settlement.charges())
    assert sum(ns for _, ns in charges) == compute_ns
    assert sum(settlement.shares_ns) == compute_ns
    for e, share_ns, parts in zip(entries, settlement.shares_ns, settlement.sharer_ns, strict=True):
        assert sum(parts) == share_ns  # each entry's share split again, nothing lost
        assert len(parts) == len(sharers_of(e))
        assert max(parts) - min(parts) <= 1  # equally, to the nanosecond
    assert [c for c, _ in charges] == [c for e in entries for c in sharers_of(e)]  # batch order, owner first


@given(spec=entries_strategy, compute_ns=st.integers(min_value=0, max_value=10**12))
def test_a_padded_batch_splits_equally_over_entries(spec: list[tuple[int, str, list[str]]], compute_ns: int) -> None:
    entries = [entry(n, client, sharers) for n, client, sharers in spec]
    shares = split(batch(entries, compute_ns), padding_free=False).shares_ns
    assert max(shares) - min(shares) <= 1  # every row paid for the longest one


def test_a_packed_batch_splits_by_own_tokens() -> None:
    entries = [entry(3), entry(10), entry(5)]
    assert split(batch(entries, 1800), padding_free=True).shares_ns == (300, 1000, 500)


def test_charge_calls_the_sink_per_sharer_and_none_is_a_no_op() -> None:
    entries = [entry(4, "alice", ["alice", "bob"]), entry(4, "carol")]
    settlement = split(batch(entries, 1001), padding_free=False)
    charged: Counter[str] = Counter()
    settlement.charge(lambda client, ns: charged.update({client: ns}))
    assert charged == Counter({"alice": 251, "bob": 250, "carol": 500})
    settlement.charge(None)  # no sink: nothing to do, no error


def test_resolve_gives_vectors_errors_and_counts_the_abandoned() -> None:
    ok = entry(2, enqueued_s=0.25)
    failed = entry(2)
    gone = entry(2)
    gone.future.cancel()  # the caller left while the batch computed
    rows: list[np.ndarray | BaseException] = [np.ones(2, dtype=np.float32), ValueError("bad row"), np.zeros(2)]
    finished = FinishedBatch([ok, failed, gone], rows, 3_000_000, started_s=1.0, batch_id=7)
    settlement = split(finished, padding_free=False)
    assert settlement.resolve() == 1
    got = ok.future.result()
    assert got.batch_id == 7 and got.compute_ns == 1_000_000 and got.sharer_ns == (1_000_000,)
    assert got.queue_ms == 750.0 and got.inference_ms == 3.0
    assert isinstance(failed.future.exception(), BackendError)
    # the abandoned entry was still charged: conservation holds whether or not its caller stayed
    assert sum(ns for _, ns in settlement.charges()) == 3_000_000


def test_a_failed_compute_is_not_a_measurement() -> None:
    entries = [entry(2)]
    failed = FinishedBatch(entries, [RuntimeError("bug")], 0, 1.0, 0, failed=True)
    assert not failed.measured
    assert split(failed, padding_free=False).shares_ns == (0,)
    assert not batch([entry(2)], 0).measured  # no compute measured: nothing to learn from
    assert batch([entry(2)], 5).measured
