"""Admission, the ms-based batch-class cap, the queue-depth gauge and size-aware tokenization,
through the real ``Engine`` with ``ProbeBackend`` (gated worker) and a frozen clock.

The runner's cost line is pinned (``ServiceCost.seeded`` with an overwhelming prior weight, so
the microsecond batches of the dummy backend do not move it): 1 ms per token, no per-call
overhead. Every number below follows from that and the dummy tokenizer (one token per word plus
[CLS] and [SEP]).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest
from engine_support import REF, ProbeBackend, wait_until

from polyray.backends.base import Tokenized
from polyray.backends.dummy import DummyBackend
from polyray.config import ServerConfig
from polyray.engine.admission import ServiceCost
from polyray.engine.engine import Engine
from polyray.engine.tokenize import INLINE_TOKENIZE_MAX_CHARS
from polyray.errors import Overloaded, RateLimited
from polyray.policies import AdmissionPolicy, BatchPolicy, FairnessPolicy
from polyray.tenancy.accounts import Accounts
from polyray.tenancy.model import ClientRecord, PriorityClass, Quota
from polyray.types import EmbedRequest, EmbedResult, ModelRef

MS_PER_TOKEN = 1.0
BOUND_MS = 100.0


class FrozenClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class DepthObserver:
    def __init__(self) -> None:
        self.depths: list[int] = []

    def on_queue_depth(self, model: ModelRef, num_entries: int) -> None:
        self.depths.append(num_entries)

    def on_batch(self, *args: Any) -> None:
        pass

    def on_dropped(self, model: ModelRef, reason: str, num_entries: int) -> None:
        pass


def client(name: str, priority: PriorityClass = PriorityClass.BATCH) -> ClientRecord:
    return ClientRecord(id=hash(name) % 10_000, name=name, priority=priority, share=1.0, quota=Quota())


def pinned(overhead_s: float = 0.0, s_per_token: float = MS_PER_TOKEN / 1000) -> ServiceCost:
    return ServiceCost.seeded(overhead_s, s_per_token, 4096, prior_weight=1e12)


Factory = Callable[..., Awaitable[tuple[Engine, ProbeBackend, FrozenClock]]]


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    made: list[tuple[Engine, ProbeBackend]] = []

    async def factory(
        admission: AdmissionPolicy | None = None,
        fairness: FairnessPolicy | None = None,
        observer: Any = None,
        backend: ProbeBackend | None = None,
    ) -> tuple[Engine, ProbeBackend, FrozenClock]:
        clock = FrozenClock()
        backend = backend or ProbeBackend(dim=8)
        names = ("a", "b", "c", "ui")
        clients = {n: client(n, PriorityClass.INTERACTIVE if n == "ui" else PriorityClass.BATCH) for n in names}
        engine = Engine(
            {REF: backend},
            BatchPolicy(max_wait_ms=0.0, rejoin_wait_ms=0.0),  # no timed holds: the clock is frozen
            ServerConfig(),
            observer,
            clock=clock,
            accounts=Accounts(clients.get, lambda record: None),
            fairness=fairness or FairnessPolicy(max_client_queue_fraction=1.0),
            admission=admission,
        )
        await engine.start(warmup=False)
        engine.runners[REF].cost = pinned()
        made.append((engine, backend))
        return engine, backend, clock

    yield factory
    for engine, backend in made:
        backend.gate.set()
        await engine.stop()


def texts(tag: str, n: int, num_tokens: int) -> list[str]:
    """``n`` distinct texts of exactly ``num_tokens`` dummy tokens ([CLS] + words + [SEP])."""
    return [" ".join(f"{tag}{i}w{j}" for j in range(num_tokens - 2)) for i in range(n)]


def embed(
    engine: Engine, name: str, batch: Sequence[str], deadline_s: float | None = None
) -> asyncio.Task[EmbedResult]:
    return asyncio.create_task(engine.embed(EmbedRequest("minilm", tuple(batch), client=name, deadline_s=deadline_s)))


async def occupy_worker(engine: Engine, backend: ProbeBackend) -> asyncio.Task[EmbedResult]:
    """A 5-token request computing on the gated worker: 5 ms of the pinned line left to run."""
    backend.gate.clear()
    blocker = embed(engine, "c", texts("blocker", 1, 5))
    await wait_until(backend.started.is_set)
    return blocker


async def queued(engine: Engine, task: asyncio.Task[EmbedResult], num_entries: int) -> None:
    runner = engine.runners[REF]
    await wait_until(lambda: len(runner.queue) >= num_entries or task.done())
    assert not task.done(), task


# No own-work allowance: these tests check the class bound's arithmetic to the millisecond
# (the allowance is covered in test_admission.py).
POLICY = AdmissionPolicy(
    interactive_max_queue_ms=BOUND_MS,
    batch_max_queue_ms=BOUND_MS,
    max_client_queue_fraction=1.0,
    own_work_allowance=0.0,
)
# The same with a client's share of the bound at half: the fair-share 429 tests.
HALF_SHARE = replace(POLICY, max_client_queue_fraction=0.5)


async def test_a_request_expected_to_wait_past_its_bound_is_refused_at_once_with_a_derived_retry_after(
    make: Factory,
) -> None:
    engine, backend, _ = await make(POLICY)
    runner = engine.runners[REF]
    blocker = await occupy_worker(engine, backend)
    b = embed(engine, "b", texts("b", 20, 10))  # 200 tokens; b had nothing queued, wait 5 ms: admitted
    await queued(engine, b, 20)
    a = embed(engine, "a", texts("a", 9, 10))  # 90 tokens, a new client goes near the head: admitted
    await queued(engine, a, 29)
    # a's next text starts after a's 90 tokens; b's first 90 tokens start before it (fair order):
    # expected wait = 5 ms (running) + (90 + 90) ms = 185 ms > 100 ms.
    inline_before = engine.num_inline_tokenized
    with pytest.raises(Overloaded) as refused:
        await engine.embed(EmbedRequest("minilm", tuple(texts("a2", 1, 10)), client="a"))
    assert engine.num_inline_tokenized == inline_before  # refused before tokenizing: the queue decided
    assert refused.value.code == "queue_full"
    assert refused.value.retry_after_s == pytest.approx(0.085)  # 185 ms - 100 ms
    assert "expected wait 185 ms" in refused.value.message
    assert len(runner.queue) == 29  # nothing of the refused request was queued
    with pytest.raises(Overloaded) as again:  # refused at the same instant: after the first one's work
        await engine.embed(EmbedRequest("minilm", tuple(texts("a3", 1, 10)), client="a"))
    # Refused before tokenizing: the first request's work is estimated at a token per 4 characters.
    first_ms = len(texts("a2", 1, 10)[0]) // 4 + 2
    assert again.value.retry_after_s == pytest.approx(0.085 + first_ms / 1000)
    backend.gate.set()
    for task in (blocker, a, b):
        await task  # everything admitted is served


async def test_a_client_over_its_share_in_time_gets_429_while_another_is_admitted(make: Factory) -> None:
    engine, backend, _ = await make(HALF_SHARE)
    blocker = await occupy_worker(engine, backend)
    b = embed(engine, "b", texts("b", 1, 10))  # another client waits too: a must leave it room
    await queued(engine, b, 1)
    a = embed(engine, "a", texts("a", 4, 10))  # a's first request: 40 ms, admitted even over its 50 ms share
    await queued(engine, a, 5)
    with pytest.raises(RateLimited) as over:  # 40 + 100 = 140 ms of a's own work > 50 ms share
        await engine.embed(EmbedRequest("minilm", tuple(texts("a2", 10, 10)), client="a"))
    assert over.value.code == "fair_share_queue"
    assert over.value.retry_after_s == pytest.approx(0.090)
    b2 = embed(engine, "b", texts("b2", 3, 10))  # the other client still gets in
    await queued(engine, b2, 8)
    backend.gate.set()
    for task in (blocker, a, b, b2):
        await task


async def test_a_client_alone_in_the_queue_is_bounded_by_the_queue_not_by_a_share(make: Factory) -> None:
    """With nobody else waiting, a burst from one client is admitted up to the class bound."""
    engine, backend, _ = await make(HALF_SHARE)
    blocker = await occupy_worker(engine, backend)
    a = embed(engine, "a", texts("a", 4, 10))
    await queued(engine, a, 4)
    a2 = embed(engine, "a", texts("a2", 10, 10))  # 140 ms of a's own work: over a share, but nobody else waits
    await queued(engine, a2, 14)
    with pytest.raises(Overloaded) as refused:  # 5 ms running + 140 ms ahead > 100 ms: the bound still holds
        await engine.embed(EmbedRequest("minilm", tuple(texts("a3", 1, 10)), client="a"))
    assert refused.value.code == "queue_full"
    backend.gate.set()
    for task in (blocker, a, a2):
        await task


async def test_a_deadline_shorter_than_the_expected_wait_is_refused_as_unmeetable(make: Factory) -> None:
    engine, backend, clock = await make(POLICY)
    blocker = await occupy_worker(engine, backend)
    a = embed(engine, "a", texts("a", 3, 10))
    await queued(engine, a, 3)
    # a's next: 5 ms running + 30 ms of its own = 35 ms: within the bound, past a 20 ms deadline.
    with pytest.raises(Overloaded) as refused:
        await engine.embed(EmbedRequest("minilm", ("x y z",), client="a", deadline_s=clock() + 0.020))
    assert refused.value.code == "deadline_unmeetable"
    assert refused.value.retry_after_s == pytest.approx(0.05)  # 15 ms away, floored at MIN_RETRY_AFTER_S
    fine = embed(engine, "a", ["x y z"], deadline_s=clock() + 0.050)
    await queued(engine, fine, 4)
    backend.gate.set()
    for task in (blocker, a, fine):
        await task


async def test_without_an_admission_policy_only_the_count_bounds_apply(make: Factory) -> None:
    engine, backend, _ = await make(None)
    blocker = await occupy_worker(engine, backend)
    tasks = [embed(engine, "a", texts(f"a{i}", 10, 10)) for i in range(5)]  # 500 ms of work
    await wait_until(lambda: len(engine.runners[REF].queue) == 50)
    backend.gate.set()
    await asyncio.gather(blocker, *tasks)


async def test_the_count_bound_429_carries_a_retry_after_from_the_queued_work(make: Factory) -> None:
    engine, backend, _ = await make(
        None, FairnessPolicy(max_client_queue_fraction=0.5)
    )  # 8192 texts, one client at most 4096
    blocker = await occupy_worker(engine, backend)
    runner = engine.runners[REF]
    a = embed(engine, "a", texts("a", 4000, 3))
    await queued(engine, a, 4000)
    await asyncio.sleep(0.01)  # the runner holds one full batch taken from the queue meanwhile
    held = runner.queue.tokens_waiting("a") // 3
    with pytest.raises(RateLimited) as over:
        await engine.embed(EmbedRequest("minilm", tuple(texts("a2", 200, 3)), client="a"))
    # (held + 200 - 4096) texts over the cap, 3 tokens each at 1 ms/token, not a constant 1 s.
    assert over.value.retry_after_s == pytest.approx((held + 200 - 4096) * 0.003)
    backend.gate.set()
    await asyncio.gather(blocker, a)


# -- the batch-class cap in milliseconds ------------------------------------------------------------


async def test_the_batch_class_cap_is_the_interactive_budget_in_ms_at_the_measured_cost(make: Factory) -> None:
    fairness = FairnessPolicy(interactive_budget_ms=15.0, interactive_window_s=60.0, max_client_queue_fraction=1.0)
    engine, backend, _ = await make(None, fairness)
    runner = engine.runners[REF]
    runner.cost = pinned(overhead_s=0.002, s_per_token=0.0001)
    assert runner.interactive_cap_tokens() == 130  # (15 ms - 2 ms) / 0.1 ms per token
    runner.cost = ServiceCost()
    assert runner.interactive_cap_tokens() == fairness.interactive_budget_tokens  # nothing measured yet
    runner.cost = pinned(overhead_s=0.002, s_per_token=0.0001)
    blocker = await occupy_worker(engine, backend)
    bulk_texts = texts("bulk", 40, 10)  # 400 tokens: one batch without the cap
    bulk = embed(engine, "a", bulk_texts)
    await queued(engine, bulk, 40)
    ui = embed(engine, "ui", ["one short question"])
    await queued(engine, ui, 41)
    backend.gate.set()
    await asyncio.gather(blocker, bulk, ui)
    costs = [max(len(s) for s in b) * len(b) for b in backend.attempted[1:]]
    assert max(costs) <= 130 and len(costs) >= 4, costs


async def test_without_interactive_traffic_batch_class_batches_are_not_capped(make: Factory) -> None:
    engine, backend, _ = await make(None, FairnessPolicy(interactive_budget_ms=15.0, max_client_queue_fraction=1.0))
    engine.runners[REF].cost = pinned(overhead_s=0.002, s_per_token=0.0001)
    blocker = await occupy_worker(engine, backend)
    bulk = embed(engine, "a", texts("bulk", 40, 10))
    await queued(engine, bulk, 40)
    backend.gate.set()
    await asyncio.gather(blocker, bulk)
    assert [len(b) for b in backend.attempted[1:]] == [40]


# -- the queue-depth gauge ------------------------------------------------------------------------


async def test_queue_depth_is_reported_after_dropped_entries(make: Factory) -> None:
    observer = DepthObserver()
    engine, backend, _ = await make(None, observer=observer)
    runner = engine.runners[REF]
    blocker = await occupy_worker(engine, backend)
    gone = embed(engine, "a", texts("gone", 3, 4))
    await queued(engine, gone, 3)
    assert observer.depths[-1] == 3
    gone.cancel()  # the caller leaves: its entries are dropped before compute
    backend.gate.set()
    await blocker
    await wait_until(lambda: len(runner.queue) == 0)
    await wait_until(lambda: observer.depths[-1] == 0)  # not stale at 3


# -- tokenization off the loop by size ------------------------------------------------------------


class SlowTokenizer(DummyBackend):
    """Tokenizing takes 0.3 s per text longer than 1,000 characters (a stand-in for a 4 MB text)."""

    def tokenize(self, texts: Sequence[str]) -> list[Tokenized]:
        if any(len(t) > 1000 for t in texts):
            time.sleep(0.3)
        return super().tokenize(texts)


async def test_a_long_text_is_tokenized_off_the_event_loop(make: Factory) -> None:
    engine = Engine({REF: SlowTokenizer(dim=8)}, BatchPolicy(max_wait_ms=0.0), ServerConfig())
    await engine.start(warmup=False)
    try:
        await engine.embed(EmbedRequest("minilm", ("short text",)))
        assert engine.num_inline_tokenized == 1
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        ticking = asyncio.create_task(ticker())
        long_text = "word " * (INLINE_TOKENIZE_MAX_CHARS // 5 + 300)  # one text over the inline limit
        result = await engine.embed(EmbedRequest("minilm", (long_text,)))
        stop.set()
        await ticking
        assert result.truncated == (0,)
        assert engine.num_inline_tokenized == 1  # the long one went to the tokenizer threads
        assert ticks >= 10, ticks  # the loop kept running for the 0.3 s of tokenizing
    finally:
        await engine.stop()
