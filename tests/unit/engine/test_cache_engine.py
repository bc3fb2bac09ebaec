"""The result cache through the real ``Engine``: hits, in-flight dedup and its cost split.

Driven with the deterministic ``DummyBackend``; ``ProbeBackend`` holds ``encode`` on a gate the
test opens, so "a second request arrives while the first one's text is queued or computing" is a
state the test sets up rather than a race against a sleep. Cost conservation is checked after
every scenario: every nanosecond the engine measured is charged to exactly one client.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from engine_support import REF, ProbeBackend, wait_until

from polyray.backends.dummy import DummyBackend
from polyray.cache.config import CacheConfig
from polyray.cache.service import EngineCache
from polyray.config import ServerConfig
from polyray.engine.engine import Engine
from polyray.engine.queue import Entry
from polyray.errors import BackendError, Overloaded
from polyray.policies import BatchPolicy, FairnessPolicy
from polyray.tenancy.accounts import Accounts
from polyray.tenancy.ledger import UsageRecord
from polyray.types import EmbedRequest, EmbedResult, ModelRef

MIN_COSINE = 1.0 - 1e-3  # the fp16 codec's guarantee
# "always" admits on first compute, so a text's second request is a hit (the default tinylfu
# admits a key only once it has been seen twice); no retune during a test.
CACHE = CacheConfig(local_max_bytes=1 << 20, admission="always", retune_interval_s=3600.0)


class Rig:
    """An engine with the cache on, its backend, the usage it recorded and its batch charges."""

    def __init__(
        self, engine: Engine, backend: ProbeBackend, records: list[UsageRecord], dropped: Counter[str]
    ) -> None:
        self.engine = engine
        self.backend = backend
        self.records = records
        self.dropped = dropped  # entries the runner dropped, by reason
        self.batch_charges: list[tuple[str, int]] = []  # (client, ns) per sharer, as the runner charges
        runner = engine.runners[REF]
        inner = runner.charge
        assert inner is not None

        def charge(client: str, compute_ns: int) -> None:
            self.batch_charges.append((client, compute_ns))
            inner(client, compute_ns)

        runner.charge = charge

    @property
    def cache(self) -> EngineCache:
        assert self.engine.cache is not None
        return self.engine.cache

    def embed(self, client: str, *texts: str) -> asyncio.Task[EmbedResult]:
        return asyncio.create_task(self.engine.embed(EmbedRequest("minilm", texts, client=client)))

    def inflight(self) -> dict[bytes, Entry]:
        return self.engine._inflight[REF]

    def entry(self, text: str) -> Entry | None:
        """The queued or computing entry of ``text`` (in-flight dedup table), if any."""
        return self.inflight().get(self.cache.key(REF, "l2", text))

    def charged_ns(self, client: str | None = None) -> int:
        return sum(r.compute_ns for r in self.records if client is None or r.client == client)

    def assert_conserved(self) -> None:
        """Σ charged (every usage record) == Σ measured (every batch and tokenization), exactly."""
        assert self.charged_ns() == self.engine.measured_compute_ns
        assert self.engine.accounts.charged_compute_ns == self.engine.measured_compute_ns

    async def settle(self) -> None:
        """Let scheduled cache fills run (``_entry_done`` -> ``call_soon`` -> fill task)."""
        for _ in range(5):
            await asyncio.sleep(0)
        await asyncio.gather(*self.engine._fill_tasks)


class DropCounter:
    """An ``EngineObserver`` that counts dropped entries."""

    def __init__(self, dropped: Counter[str]) -> None:
        self.dropped = dropped

    def on_queue_depth(self, model: ModelRef, num_entries: int) -> None:
        pass

    def on_batch(self, *args: Any) -> None:
        pass

    def on_dropped(self, model: ModelRef, reason: str, num_entries: int) -> None:
        self.dropped[reason] += num_entries


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig() -> AsyncIterator[RigFactory]:
    made: list[Rig] = []

    async def factory(
        backend: ProbeBackend | None = None,
        server: ServerConfig | None = None,
        config: CacheConfig | None = None,
    ) -> Rig:
        backend = backend or ProbeBackend(dim=32)
        records: list[UsageRecord] = []
        dropped: Counter[str] = Counter()
        engine = Engine(
            {REF: backend},
            BatchPolicy(max_wait_ms=1.0, rejoin_wait_ms=0.0),
            server or ServerConfig(),
            DropCounter(dropped),
            accounts=Accounts(sink=records.append),
            fairness=FairnessPolicy(max_client_queue_fraction=1.0),
            cache=EngineCache(config or CACHE, [REF]),
        )
        await engine.start(warmup=False)
        rig = Rig(engine, backend, records, dropped)
        made.append(rig)
        return rig

    yield factory
    for rig in made:
        rig.backend.gate.set()  # never leave a worker blocked on a gate
        await rig.engine.stop()


async def occupy_worker(rig: Rig) -> asyncio.Task[EmbedResult]:
    """Hold the worker on a batch of its own, so what is submitted next stays queued."""
    rig.backend.gate.clear()
    task = rig.embed("blocker", "the blocker text")
    await wait_until(rig.backend.started.is_set)
    return task


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def truth(backend: DummyBackend, text: str) -> np.ndarray:
    return backend.vector(backend.tokenize([text])[0].ids)


# -- hits ------------------------------------------------------------------------------------------


async def test_repeated_texts_are_answered_from_the_cache(make_rig: RigFactory) -> None:
    rig = await make_rig()
    texts = ("the first text", "a second, longer text with more words", "third")
    first = await rig.embed("alice", *texts)
    assert first.usage.num_cached == 0
    await rig.settle()
    batches_before = rig.backend.num_batches
    measured_before = rig.engine.runners[REF].measured_compute_ns

    again = await rig.embed("bob", *texts[::-1], "a new one")

    # Only the new text reached the model.
    assert rig.backend.num_batches == batches_before + 1
    assert rig.backend.times_seen("the first text") == 1 and rig.backend.times_seen("a new one") == 1
    assert again.usage.num_cached == 3 and again.usage.num_batches == 1
    for text, vec in zip([*texts[::-1], "a new one"], again.vectors, strict=True):
        assert cosine(vec, truth(rig.backend, text)) >= MIN_COSINE
    np.testing.assert_array_equal(again.vectors[3], truth(rig.backend, "a new one"))  # computed: exact
    # Hits cost bob no batch compute: his only batch charge is the one new text's batch.
    assert [c for c, _ in rig.batch_charges].count("bob") == 1
    assert rig.engine.runners[REF].measured_compute_ns > measured_before
    bob_request = [r for r in rig.records if r.client == "bob" and r.num_requests == 1]
    assert [(r.num_texts, r.num_cached) for r in bob_request] == [(4, 3)]

    # Entirely from the cache: no batch at all.
    third = await rig.embed("carol", texts[1])
    assert third.usage.num_cached == 1 and third.usage.num_batches == 0 and third.usage.inference_ms == 0.0
    assert "carol" not in {c for c, _ in rig.batch_charges}
    assert rig.backend.num_batches == batches_before + 1
    report = rig.cache.report()["models"][str(REF)]
    assert (report["lookups"], report["local_hits"], report["misses"]) == (3 + 4 + 1, 4, 4)
    rig.assert_conserved()


# -- in-flight dedup -------------------------------------------------------------------------------


async def test_two_clients_asking_for_a_computing_text_share_one_computation(make_rig: RigFactory) -> None:
    rig = await make_rig()
    rig.backend.gate.clear()
    alice = rig.embed("alice", "shared text")
    await wait_until(rig.backend.started.is_set)  # alice's text is computing
    bob = rig.embed("bob", "shared text")
    await wait_until(lambda: rig.cache.num_deduplicated == 1)
    rig.backend.gate.set()
    a, b = await asyncio.gather(alice, bob)

    assert rig.backend.times_seen("shared text") == 1
    expected = truth(rig.backend, "shared text")
    np.testing.assert_array_equal(a.vectors[0], expected)
    np.testing.assert_array_equal(b.vectors[0], expected)
    assert a.usage.num_cached == b.usage.num_cached == 0
    # The one entry's compute (the whole batch) is split equally between the two clients.
    batch_ns = rig.engine.runners[REF].measured_compute_ns
    assert [c for c, _ in rig.batch_charges] == ["alice", "bob"]
    (_, alice_ns), (_, bob_ns) = rig.batch_charges
    assert alice_ns + bob_ns == batch_ns and abs(alice_ns - bob_ns) <= 1 and bob_ns > 0
    # Each result's usage carries its own half (plus its own tokenization), not the whole.
    assert alice_ns <= a.usage.compute_ns < batch_ns
    assert bob_ns <= b.usage.compute_ns < batch_ns
    rig.assert_conserved()
    assert rig.charged_ns("alice") + rig.charged_ns("bob") == rig.engine.measured_compute_ns
    assert rig.inflight() == {}


async def test_a_queued_text_is_shared_and_split_three_ways(make_rig: RigFactory) -> None:
    rig = await make_rig()
    blocker = await occupy_worker(rig)
    tasks = [rig.embed(client, "queued shared text") for client in ("alice", "bob", "carol")]
    await wait_until(lambda: rig.cache.num_deduplicated == 2)
    entry = rig.entry("queued shared text")
    assert entry is not None and entry.sharers == ["alice", "bob", "carol"] and entry.num_waiters == 3
    rig.backend.gate.set()
    results = await asyncio.gather(*tasks)
    await blocker

    assert rig.backend.times_seen("queued shared text") == 1
    for r in results:
        np.testing.assert_array_equal(r.vectors[0], truth(rig.backend, "queued shared text"))
    parts = {c: ns for c, ns in rig.batch_charges if c != "blocker"}
    assert set(parts) == {"alice", "bob", "carol"}
    assert max(parts.values()) - min(parts.values()) <= 1
    # The queued text had a batch of its own: its three parts are that batch's whole compute.
    blocker_ns = sum(ns for c, ns in rig.batch_charges if c == "blocker")
    assert sum(parts.values()) + blocker_ns == rig.engine.runners[REF].measured_compute_ns
    rig.assert_conserved()


async def test_the_owner_leaving_does_not_drop_a_shared_entry(make_rig: RigFactory) -> None:
    rig = await make_rig()
    blocker = await occupy_worker(rig)
    owner = rig.embed("alice", "wanted by two")
    await wait_until(lambda: rig.entry("wanted by two") is not None)
    follower = rig.embed("bob", "wanted by two")
    await wait_until(lambda: rig.cache.num_deduplicated == 1)
    owner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await owner
    entry = rig.entry("wanted by two")
    assert entry is not None and entry.num_waiters == 1 and not entry.future.done()

    rig.backend.gate.set()
    result = await follower
    await blocker
    np.testing.assert_array_equal(result.vectors[0], truth(rig.backend, "wanted by two"))
    assert rig.backend.times_seen("wanted by two") == 1
    assert rig.dropped["cancelled"] == 0
    await rig.settle()
    assert len(rig.cache.tiers[REF].local) == 2  # the blocker's text and the shared one were filled
    rig.assert_conserved()


async def test_an_entry_every_waiter_left_is_dropped_before_compute(make_rig: RigFactory) -> None:
    rig = await make_rig()
    blocker = await occupy_worker(rig)
    waiters = [rig.embed(client, "nobody waits for me") for client in ("alice", "bob")]
    await wait_until(lambda: rig.cache.num_deduplicated == 1)
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    rig.backend.gate.set()
    await blocker
    await wait_until(lambda: rig.dropped["cancelled"] == 1)

    assert rig.backend.times_seen("nobody waits for me") == 0
    assert rig.inflight() == {}
    assert {c for c, _ in rig.batch_charges} == {"blocker"}
    # Asked again later: computed afresh, not stuck on the dropped entry.
    again = await rig.embed("carol", "nobody waits for me")
    np.testing.assert_array_equal(again.vectors[0], truth(rig.backend, "nobody waits for me"))
    assert rig.backend.times_seen("nobody waits for me") == 1
    rig.assert_conserved()


async def test_the_same_text_twice_in_one_request_is_one_entry(make_rig: RigFactory) -> None:
    rig = await make_rig()
    result = await rig.embed("alice", "twice", "other", "twice")
    assert rig.backend.times_seen("twice") == 1 and rig.backend.times_seen("other") == 1
    assert sum(rig.backend.batch_sizes) == 2
    np.testing.assert_array_equal(result.vectors[0], result.vectors[2])
    np.testing.assert_array_equal(result.vectors[0], truth(rig.backend, "twice"))
    assert rig.cache.num_deduplicated == 0  # within a request is not a join
    assert [c for c, _ in rig.batch_charges] == ["alice", "alice"]  # one charge per entry
    rig.assert_conserved()


async def test_truncated_texts_are_neither_cached_nor_shared(make_rig: RigFactory) -> None:
    rig = await make_rig(ProbeBackend(dim=32, max_seq_tokens=6))
    long_text = "one two three four five six seven eight"
    first = await rig.embed("alice", long_text, "short")
    assert first.truncated == (0,)
    await rig.settle()
    second = await rig.embed("alice", long_text, "short")
    assert second.truncated == (0,) and second.usage.num_cached == 1
    assert rig.backend.times_seen(long_text) == 2  # computed each time
    assert rig.backend.times_seen("short") == 1
    np.testing.assert_array_equal(second.vectors[0], first.vectors[0])
    # Nor shared in flight: two concurrent requests compute it twice.
    rig.backend.gate.clear()
    a = rig.embed("alice", long_text)
    b = rig.embed("bob", long_text)
    await wait_until(lambda: len(rig.engine.runners[REF].queue) >= 1 or rig.backend.times_seen(long_text) > 2)
    rig.backend.gate.set()
    await asyncio.gather(a, b)
    assert rig.backend.times_seen(long_text) == 4
    assert rig.cache.num_deduplicated == 0
    report = rig.cache.report()["models"][str(REF)]
    assert report["lookups"] == 2  # only "short" was ever looked up
    await rig.settle()
    assert len(rig.cache.tiers[REF].local) == 1
    rig.assert_conserved()


async def test_a_refused_request_leaves_no_joined_state(make_rig: RigFactory) -> None:
    rig = await make_rig(server=ServerConfig(max_queue_items=3))
    blocker = await occupy_worker(rig)
    owner = rig.embed("alice", "popular")
    await wait_until(lambda: rig.entry("popular") is not None)
    entry = rig.entry("popular")
    assert entry is not None
    # bob's request would join "popular" and queue three new texts: 1 + 3 > 3, refused whole.
    with pytest.raises(Overloaded):
        await rig.embed("bob", "popular", "new one", "new two", "new three")
    assert entry.sharers == ["alice"] and entry.num_waiters == 1
    assert rig.cache.num_deduplicated == 0
    assert rig.entry("new one") is None and len(rig.inflight()) == 2  # the blocker's and "popular"
    assert len(rig.engine.runners[REF].queue) == 1
    # The owner alone holds the entry: when she leaves, it is dropped before compute.
    owner.cancel()
    await asyncio.gather(owner, return_exceptions=True)
    rig.backend.gate.set()
    await blocker
    await wait_until(lambda: rig.dropped["cancelled"] == 1)
    assert rig.backend.times_seen("popular") == 0 and rig.backend.times_seen("new one") == 0
    assert rig.inflight() == {}
    rig.assert_conserved()


async def test_a_failing_row_fails_every_waiter_and_is_not_cached(make_rig: RigFactory) -> None:
    rig = await make_rig(ProbeBackend(dim=32, poison_word="poison"))
    blocker = await occupy_worker(rig)
    alice = rig.embed("alice", "this has poison in it")
    bob = rig.embed("bob", "this has poison in it")
    carol = rig.embed("carol", "a clean text")
    await wait_until(lambda: rig.cache.num_deduplicated == 1 and rig.entry("a clean text") is not None)
    rig.backend.gate.set()
    outcomes = await asyncio.gather(alice, bob, carol, return_exceptions=True)
    await blocker
    assert isinstance(outcomes[0], BackendError) and isinstance(outcomes[1], BackendError)
    assert "poisoned input" in outcomes[0].message
    assert isinstance(outcomes[2], EmbedResult)  # the clean text in the same batch is served
    await rig.settle()
    assert rig.inflight() == {}
    local = rig.cache.tiers[REF].local
    assert len(local) == 2  # the blocker's and the clean text; not the failed one
    poison_key = rig.cache.key(REF, "l2", "this has poison in it")
    assert poison_key not in local
    tried = rig.backend.times_seen("this has poison in it")
    # Asked again: a miss, computed (and failing) again, never answered from the cache.
    with pytest.raises(BackendError):
        await rig.embed("dave", "this has poison in it")
    assert rig.backend.times_seen("this has poison in it") > tried
    rig.assert_conserved()
