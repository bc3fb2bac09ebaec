"""The in-flight dedup table alone: claim, commit (join + submit), done, leave (cancellation)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from polyray.engine.inflight import Claim, InflightTable, leave, wait_key
from polyray.engine.queue import Entry, EntryResult

KEY_A = b"key-a"
KEY_B = b"key-b"


def claim_for(
    table: InflightTable,
    client: str,
    keys: list[bytes | None],
    have: list[bool] | None = None,
    deadline_s: float = 10.0,
) -> Claim:
    loop = asyncio.get_running_loop()

    def new_entry(ids: tuple[int, ...]) -> Entry:
        return Entry(ids, 0.0, deadline_s, loop.create_future(), client)

    ids = [(101, i, 102) for i in range(len(keys))]
    return table.claim(ids, keys, have or [False] * len(keys), new_entry, client)


def result(vector: np.ndarray) -> EntryResult:
    return EntryResult(vector, 0.0, 0.0, 0, 0)


def test_wait_key_is_the_cache_key_or_the_index() -> None:
    assert wait_key(0, [KEY_A, None]) == KEY_A
    assert wait_key(1, [KEY_A, None]) == 1


async def test_claim_changes_nothing_until_commit() -> None:
    table = InflightTable()
    claim = claim_for(table, "alice", [KEY_A, KEY_B])
    assert set(claim.new) == {KEY_A, KEY_B} and not claim.joins
    assert len(table) == 0  # a refusal between claim and commit leaves no trace
    assert all(e.sharers == ["alice"] and e.key in (KEY_A, KEY_B) for e in claim.new.values())


async def test_claim_skips_cached_texts_and_repeats_within_a_request() -> None:
    table = InflightTable()
    claim = claim_for(table, "alice", [KEY_A, KEY_B, KEY_A, None, None], have=[False, True, False, False, False])
    # KEY_B is a cache hit; KEY_A twice is one entry; unkeyed texts wait per index, never shared.
    assert list(claim.new) == [KEY_A, 3, 4]
    assert claim.new[3].key is None and claim.new[4].key is None
    table.commit(claim, "alice", 10.0)
    assert list(table) == [KEY_A]  # only keyed entries are joinable


async def test_a_second_request_joins_a_live_entry() -> None:
    table = InflightTable()
    first = claim_for(table, "alice", [KEY_A], deadline_s=5.0)
    waits = table.commit(first, "alice", 5.0)
    entry, slot = waits[KEY_A]
    assert slot == 0 and table[KEY_A] is entry

    second = claim_for(table, "bob", [KEY_A, KEY_B], deadline_s=9.0)
    assert second.joins == {KEY_A: entry} and list(second.new) == [KEY_B]
    assert table.num_deduplicated == 0  # claiming is not joining
    waits = table.commit(second, "bob", 9.0)
    assert list(waits) == [KEY_A, KEY_B]  # joins first, then new entries
    assert waits[KEY_A] == (entry, 1)
    assert entry.sharers == ["alice", "bob"]
    assert entry.num_waiters == 2
    assert entry.deadline_s == 9.0  # kept alive for the later deadline
    assert table.num_deduplicated == 1


async def test_a_finished_entry_is_not_joined_and_leaves_the_table() -> None:
    computed: list[tuple[bytes, np.ndarray]] = []
    table = InflightTable(lambda key, vector: computed.append((key, vector)))
    waits = table.commit(claim_for(table, "alice", [KEY_A]), "alice", 10.0)
    entry = waits[KEY_A][0]
    vector = np.ones(4, dtype=np.float32)
    entry.future.set_result(result(vector))
    assert table.live(KEY_A) is None  # done: a new request computes afresh
    await asyncio.sleep(0)  # the done callback runs on the loop
    assert KEY_A not in table
    assert computed == [(KEY_A, vector)]


@pytest.mark.parametrize("outcome", ["error", "cancel"])
async def test_a_failed_or_cancelled_entry_leaves_without_a_vector(outcome: str) -> None:
    computed: list[bytes] = []
    table = InflightTable(lambda key, vector: computed.append(key))
    entry = table.commit(claim_for(table, "alice", [KEY_A]), "alice", 10.0)[KEY_A][0]
    if outcome == "error":
        entry.future.set_exception(RuntimeError("boom"))
        entry.future.exception()  # read, so asyncio does not log it
    else:
        entry.future.cancel()
    await asyncio.sleep(0)
    assert len(table) == 0 and computed == []


async def test_done_of_a_replaced_entry_keeps_the_new_one() -> None:
    table = InflightTable()
    old = table.commit(claim_for(table, "alice", [KEY_A]), "alice", 10.0)[KEY_A][0]
    old.future.cancel()  # finished: the next claim makes a new entry before the callback runs
    new = table.commit(claim_for(table, "bob", [KEY_A]), "bob", 10.0)[KEY_A][0]
    assert new is not old
    await asyncio.sleep(0)  # the old entry's done callback runs now
    assert table[KEY_A] is new


async def test_the_last_request_to_leave_cancels_the_entry() -> None:
    table = InflightTable()
    entry = table.commit(claim_for(table, "alice", [KEY_A]), "alice", 10.0)[KEY_A][0]
    table.commit(claim_for(table, "bob", [KEY_A]), "bob", 10.0)
    leave(entry)
    assert not entry.future.cancelled()  # bob still waits
    leave(entry)
    assert entry.future.cancelled()  # nobody waits: dropped before compute
    await asyncio.sleep(0)
    assert len(table) == 0


async def test_leaving_a_finished_entry_keeps_its_result() -> None:
    table = InflightTable()
    entry = table.commit(claim_for(table, "alice", [KEY_A]), "alice", 10.0)[KEY_A][0]
    entry.future.set_result(result(np.zeros(4, dtype=np.float32)))
    leave(entry)
    assert entry.future.done() and not entry.future.cancelled()
    assert entry.num_waiters == 0
