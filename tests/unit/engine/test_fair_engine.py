"""Fair share, quotas and cost attribution through the real ``Engine`` (``DummyBackend``, no model).

Cost conservation is the invariant: every nanosecond the engine measures (each batch's forward
pass, each tokenization) is charged to exactly one client, so Σ charged == Σ measured exactly,
whatever is cancelled, fails or is refused on the way.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import pytest
from engine_support import REF, ProbeBackend, wait_until

from polyray.backends.dummy import DummyBackend
from polyray.config import ServerConfig
from polyray.engine.engine import Engine
from polyray.errors import BackendError, Overloaded, RateLimited
from polyray.policies import BatchPolicy, FairnessPolicy
from polyray.tenancy.accounts import Accounts
from polyray.tenancy.ledger import UsageRecord
from polyray.tenancy.model import ClientRecord, PriorityClass, Quota
from polyray.types import EmbedRequest, EmbedResult


class ManualClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class Tenants:
    """A directory of clients and the usage the engine charged them."""

    def __init__(self, *clients: ClientRecord, wall_clock: Callable[[], float] | None = None) -> None:
        self.clients = {c.name: c for c in clients}
        self.records: list[UsageRecord] = []
        kwargs = {"wall_clock": wall_clock} if wall_clock else {}
        self.accounts = Accounts(self.clients.get, self.records.append, **kwargs)

    def compute_ns(self, client: str | None = None) -> int:
        return sum(r.compute_ns for r in self.records if client is None or r.client == client)

    def requests(self, client: str) -> int:
        return sum(r.num_requests for r in self.records if r.client == client)


def make_client(
    name: str, priority: PriorityClass = PriorityClass.BATCH, share: float = 1.0, **quota: Any
) -> ClientRecord:
    return ClientRecord(id=hash(name) % 10_000, name=name, priority=priority, share=share, quota=Quota(**quota))


EngineFactory = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def make_engine() -> AsyncIterator[EngineFactory]:
    made: list[tuple[Engine, Any]] = []

    async def factory(
        backend: DummyBackend,
        accounts: Accounts,
        policy: BatchPolicy | None = None,
        server: ServerConfig | None = None,
        fairness: FairnessPolicy | None = None,
        clock: Callable[[], float] | None = None,
    ) -> Engine:
        kwargs: dict[str, Any] = {"clock": clock} if clock is not None else {}
        engine = Engine(
            {REF: backend},
            policy or BatchPolicy(max_wait_ms=1.0),
            server or ServerConfig(),
            accounts=accounts,
            fairness=fairness or FairnessPolicy(max_client_queue_fraction=1.0),
            **kwargs,
        )
        await engine.start(warmup=False)
        made.append((engine, backend))
        return engine

    yield factory
    for engine, backend in made:
        if isinstance(backend, ProbeBackend):
            backend.gate.set()  # never leave a worker blocked
        await engine.stop()


def embed(engine: Engine, client: str, texts: Sequence[str]) -> asyncio.Task[EmbedResult]:
    return asyncio.create_task(engine.embed(EmbedRequest("minilm", tuple(texts), client=client)))


def words(tag: str, n: int, num_words: int) -> list[str]:
    """``n`` distinct texts of exactly ``num_words`` words unique to ``tag``."""
    return [" ".join(f"{tag}{i}w{j}" for j in range(num_words)) for i in range(n)]


def ids_of(backend: DummyBackend, texts: Sequence[str]) -> set[tuple[int, ...]]:
    return {t.ids for t in backend.tokenize(texts)}


def assert_vectors(result: EmbedResult, backend: DummyBackend, texts: Sequence[str]) -> None:
    want = np.stack([backend.vector(t.ids) for t in backend.tokenize(texts)])
    np.testing.assert_array_equal(result.vectors, want)


# -- (a) conservation --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_charged_compute_equals_measured_compute_over_a_random_run(make_engine: EngineFactory, seed: int) -> None:
    rnd = random.Random(seed)
    steady = make_client("steady", PriorityClass.INTERACTIVE)  # never cancels, never fails
    tenants = Tenants(
        steady,
        make_client("bulk", share=3.0),
        make_client("flaky", share=0.5),  # cancels some requests mid-flight
        make_client("broken", PriorityClass.INTERACTIVE, share=2.0),  # sends some poisoned texts
    )
    backend = ProbeBackend(dim=8, seconds_per_token=2e-6, poison_word="poison")
    engine = await make_engine(
        backend, tenants.accounts, BatchPolicy(budget_tokens=600, max_batch_size=24, max_wait_ms=1.0)
    )

    plans: list[tuple[str, list[str], bool]] = []  # (client, texts, cancel it)
    for n in range(90):
        client = rnd.choice(list(tenants.clients))
        texts = [" ".join(f"s{seed}r{n}t{i}w{j}" for j in range(rnd.randint(1, 30))) for i in range(rnd.randint(1, 12))]
        if client == "broken" and rnd.random() < 0.4:
            texts[rnd.randrange(len(texts))] += " poison"
        plans.append((client, texts, client == "flaky" and rnd.random() < 0.5))

    tasks: list[asyncio.Task[EmbedResult]] = []
    for client, texts, cancel in plans:
        task = embed(engine, client, texts)
        tasks.append(task)
        if cancel:
            asyncio.get_running_loop().call_later(rnd.uniform(0.0, 0.01), task.cancel)
        await asyncio.sleep(rnd.uniform(0.0, 0.002))
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    await engine.stop()

    # Every measured nanosecond is charged once: through the sink, and in the accounts' total.
    assert engine.measured_compute_ns > 0
    assert tenants.compute_ns() == engine.measured_compute_ns
    assert tenants.accounts.charged_compute_ns == engine.measured_compute_ns
    assert all(r.compute_ns >= 0 for r in tenants.records)

    by_client: dict[str, list[EmbedResult]] = defaultdict(list)
    num_failed = Counter[str]()
    for (client, texts, _), outcome in zip(plans, outcomes, strict=True):
        if isinstance(outcome, EmbedResult):
            assert_vectors(outcome, backend, texts)
            by_client[client].append(outcome)
        elif isinstance(outcome, BackendError):
            assert client == "broken" and any("poison" in t for t in texts)
            num_failed[client] += 1
        else:
            assert isinstance(outcome, asyncio.CancelledError), outcome
            assert client == "flaky"
    assert by_client["steady"], "the run must include completed requests of the steady client"
    assert num_failed["broken"] > 0, "the run must include failed requests"
    num_cancelled = sum(isinstance(o, asyncio.CancelledError) for o in outcomes)
    assert num_cancelled > 0, "the run must include cancelled requests"

    # A client whose requests all completed was charged exactly what its results report.
    assert sum(r.usage.compute_ns for r in by_client["steady"]) == tenants.compute_ns("steady")
    assert sum(r.usage.compute_ns for r in by_client["bulk"]) == tenants.compute_ns("bulk")
    for client in tenants.clients:
        assert tenants.requests(client) == len(by_client[client])  # one request record per answer
        tokens = sum(r.num_tokens for r in tenants.records if r.client == client)
        assert tokens == sum(r.usage.num_tokens for r in by_client[client])
    # A request that failed or was cancelled still pays for what it computed.
    assert tenants.compute_ns("flaky") >= sum(r.usage.compute_ns for r in by_client["flaky"])
    assert tenants.compute_ns("broken") >= sum(r.usage.compute_ns for r in by_client["broken"])


async def test_one_request_is_charged_exactly_its_reported_usage(make_engine: EngineFactory) -> None:
    tenants = Tenants(make_client("solo"))
    backend = ProbeBackend(dim=8, seconds_per_token=1e-5)
    engine = await make_engine(backend, tenants.accounts, BatchPolicy(budget_tokens=40, max_batch_size=4))
    texts = words("solo", 11, 4)  # several batches, and a threaded tokenization
    result = await engine.embed(EmbedRequest("minilm", tuple(texts), client="solo"))
    assert result.usage.num_batches >= 3
    assert result.usage.compute_ns > 0
    assert result.usage.compute_ns == tenants.compute_ns("solo") == engine.measured_compute_ns
    (request_record,) = [r for r in tenants.records if r.num_requests]
    assert (request_record.num_texts, request_record.num_tokens) == (11, result.usage.num_tokens)
    assert {(r.client, r.model, r.version) for r in tenants.records} == {("solo", "minilm", "1")}


async def test_compute_of_a_caller_that_left_mid_batch_is_still_charged(make_engine: EngineFactory) -> None:
    tenants = Tenants(make_client("gone"), make_client("stays"))
    backend = ProbeBackend(dim=8)
    engine = await make_engine(backend, tenants.accounts, BatchPolicy(max_wait_ms=5.0))
    backend.gate.clear()
    gone = embed(engine, "gone", ["leaves while computing"])
    stays = embed(engine, "stays", ["waits for its answer"])
    await wait_until(backend.started.is_set)
    gone.cancel()
    await asyncio.sleep(0.02)  # the batch computes (is held on the gate) for at least 20 ms
    backend.gate.set()
    result = await stays
    with pytest.raises(asyncio.CancelledError):
        await gone
    await engine.stop()
    assert tenants.compute_ns() == engine.measured_compute_ns
    assert tenants.compute_ns("gone") >= 5_000_000  # its share of the batch it was in, not only its tokenization
    assert tenants.requests("gone") == 0
    assert result.usage.compute_ns == tenants.compute_ns("stays")


# -- (b) a flood does not starve a light client ------------------------------------------------


@pytest.mark.parametrize(("flood_priority", "light_priority"), [("batch", "batch"), ("batch", "interactive")])
async def test_flooding_client_cannot_starve_another(
    make_engine: EngineFactory, flood_priority: str, light_priority: str
) -> None:
    tenants = Tenants(
        make_client("flood", PriorityClass(flood_priority)),
        make_client("light", PriorityClass(light_priority)),
        make_client("first"),
    )
    backend = ProbeBackend(dim=8)
    engine = await make_engine(
        backend,
        tenants.accounts,
        BatchPolicy(budget_tokens=256, max_batch_size=16, max_wait_ms=0.0),
        ServerConfig(max_queue_items=1000),
    )
    backend.gate.clear()
    blocker = embed(engine, "first", ["occupies the worker"])
    await wait_until(backend.started.is_set)
    quotas = tenants.accounts.quotas
    # Requests of at most 8 texts are tokenized inline: admitted (in flight) means queued.
    flood_texts = [words(f"f{k}x", 8, 5) for k in range(25)]  # 200 texts of 7 tokens
    flood = [embed(engine, "flood", texts) for texts in flood_texts]
    await wait_until(lambda: quotas.num_in_flight("flood") == 25)
    light_texts = words("light", 10, 5)
    light = [embed(engine, "light", [text]) for text in light_texts]
    await wait_until(lambda: quotas.num_in_flight("light") == 10)
    backend.gate.set()
    await blocker
    for task, texts in zip(light + flood, [[t] for t in light_texts] + flood_texts, strict=True):
        assert_vectors(await task, backend, texts)

    light_ids = ids_of(backend, light_texts)
    flood_ids = ids_of(backend, [t for texts in flood_texts for t in texts])
    batches = backend.attempted[1:]  # after the blocker
    assert sum(len(b) for b in batches) == 210
    assert all(len(b) <= 16 for b in batches)
    last_light = max(i for i, b in enumerate(batches) if light_ids & set(b))
    flood_before = sum(len(flood_ids & set(b)) for b in batches[: last_light + 1])
    # FIFO would serve all 200 flood texts first. Here: at most the one full batch formed (and held)
    # from the flood while the worker was busy, before the light client arrived, then interleaving.
    assert last_light <= 2, [len(light_ids & set(b)) for b in batches]
    assert flood_before <= 16 + 24, (last_light, flood_before)


# -- (c) the per-client share of the queue -----------------------------------------------------


async def test_per_client_queue_cap_is_429_while_others_can_still_queue(make_engine: EngineFactory) -> None:
    tenants = Tenants(make_client("a"), make_client("b"), make_client("c"), make_client("x"))
    backend = ProbeBackend(dim=8)
    engine = await make_engine(
        backend,
        tenants.accounts,
        BatchPolicy(budget_tokens=100_000, max_batch_size=1000, max_wait_ms=0.0),
        ServerConfig(max_queue_items=10),
        FairnessPolicy(max_client_queue_fraction=0.5),
    )
    runner = engine.runners[REF]
    backend.gate.clear()
    blocker = embed(engine, "x", ["occupies the worker"])
    await wait_until(backend.started.is_set)

    first_a = embed(engine, "a", words("a1", 4, 3))
    await wait_until(lambda: len(runner.queue) == 4)
    refused = words("a2", 2, 3)
    with pytest.raises(RateLimited) as info:
        await engine.embed(EmbedRequest("minilm", tuple(refused), client="a"))
    assert info.value.code == "fair_share_queue"
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
    assert "'a'" in info.value.message and "5" in info.value.message
    assert len(runner.queue) == 4  # nothing of the refused request was queued
    assert tenants.accounts.quotas.num_in_flight("a") == 1

    b = embed(engine, "b", words("b1", 5, 3))  # another client still gets its share
    await wait_until(lambda: len(runner.queue) == 9)
    last_a = embed(engine, "a", words("a3", 1, 3))  # exactly at a's cap
    await wait_until(lambda: len(runner.queue) == 10)
    with pytest.raises(Overloaded) as full:  # the whole queue is full: 503, not a client's limit
        await engine.embed(EmbedRequest("minilm", ("one more",), client="c"))
    assert full.value.code == "queue_full"

    backend.gate.set()
    for task in (blocker, first_a, b, last_a):
        await task
    assert not ids_of(backend, refused) & backend.seen_ids()
    assert tenants.accounts.quotas.num_in_flight("a") == 0
    await engine.stop()
    assert tenants.compute_ns() == engine.measured_compute_ns


async def test_a_client_with_nothing_waiting_may_queue_more_than_its_share(make_engine: EngineFactory) -> None:
    """The cap counts what a client already holds: one request larger than the share is not refused
    (it could never be served otherwise), a second one then is."""
    tenants = Tenants(make_client("big"), make_client("x"))
    backend = ProbeBackend(dim=8)
    engine = await make_engine(
        backend,
        tenants.accounts,
        BatchPolicy(budget_tokens=100_000, max_batch_size=1000, max_wait_ms=0.0),
        ServerConfig(max_queue_items=20),
        FairnessPolicy(max_client_queue_fraction=0.25),
    )
    backend.gate.clear()
    blocker = embed(engine, "x", ["occupies the worker"])
    await wait_until(backend.started.is_set)
    big = embed(engine, "big", words("big", 8, 2))
    await wait_until(lambda: len(engine.runners[REF].queue) == 8)
    with pytest.raises(RateLimited) as info:
        await engine.embed(EmbedRequest("minilm", ("more",), client="big"))
    assert info.value.code == "fair_share_queue"
    backend.gate.set()
    await blocker
    assert (await big).vectors.shape == (8, 8)


# -- (d) quotas through Engine.embed -----------------------------------------------------------


def snapshot(tenants: Tenants, engine: Engine) -> tuple[int, int, int, int]:
    return (
        len(tenants.records),
        tenants.accounts.charged_compute_ns,
        engine.measured_compute_ns,
        len(engine.runners[REF].queue),
    )


async def test_requests_per_s_through_the_engine(make_engine: EngineFactory) -> None:
    clock = ManualClock()
    tenants = Tenants(make_client("team", requests_per_s=2.0), make_client("other", requests_per_s=2.0))
    backend = ProbeBackend(dim=8)
    engine = await make_engine(backend, tenants.accounts, BatchPolicy(max_wait_ms=0.0, rejoin_wait_ms=0.0), clock=clock)
    await engine.embed(EmbedRequest("minilm", ("one",), client="team"))
    await engine.embed(EmbedRequest("minilm", ("two",), client="team"))
    before = snapshot(tenants, engine)
    with pytest.raises(RateLimited) as info:
        await engine.embed(EmbedRequest("minilm", ("three",), client="team"))
    assert info.value.code == "requests_per_s"
    assert "requests_per_s=2" in info.value.message
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
    assert snapshot(tenants, engine) == before  # refused before tokenizing: nothing charged, nothing queued
    assert tenants.accounts.quotas.num_in_flight("team") == 0
    assert not ids_of(backend, ["three"]) & backend.seen_ids()
    await engine.embed(EmbedRequest("minilm", ("another client",), client="other"))  # limits are per client
    clock.now_s += 1.0
    await engine.embed(EmbedRequest("minilm", ("later",), client="team"))
    assert tenants.requests("team") == 3


async def test_max_concurrent_through_the_engine(make_engine: EngineFactory) -> None:
    tenants = Tenants(make_client("team", max_concurrent=1))
    backend = ProbeBackend(dim=8)
    engine = await make_engine(backend, tenants.accounts, BatchPolicy(max_wait_ms=0.0))
    backend.gate.clear()
    first = embed(engine, "team", ["in flight"])
    await wait_until(backend.started.is_set)
    quotas = tenants.accounts.quotas
    assert quotas.num_in_flight("team") == 1
    before = snapshot(tenants, engine)
    with pytest.raises(RateLimited) as info:
        await engine.embed(EmbedRequest("minilm", ("second",), client="team"))
    assert info.value.code == "max_concurrent"
    assert "max_concurrent=1" in info.value.message
    assert snapshot(tenants, engine) == before
    assert quotas.num_in_flight("team") == 1
    backend.gate.set()
    await first
    assert quotas.num_in_flight("team") == 0
    await engine.embed(EmbedRequest("minilm", ("third",), client="team"))
    assert quotas.num_in_flight("team") == 0
    assert not ids_of(backend, ["second"]) & backend.seen_ids()


async def test_max_concurrent_slot_is_released_when_the_caller_cancels(make_engine: EngineFactory) -> None:
    tenants = Tenants(make_client("team", max_concurrent=1))
    backend = ProbeBackend(dim=8)
    engine = await make_engine(backend, tenants.accounts, BatchPolicy(max_wait_ms=0.0))
    backend.gate.clear()
    first = embed(engine, "team", ["in flight"])
    await wait_until(backend.started.is_set)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert tenants.accounts.quotas.num_in_flight("team") == 0
    backend.gate.set()
    await engine.embed(EmbedRequest("minilm", ("next",), client="team"))


async def test_tokens_per_s_through_the_engine(make_engine: EngineFactory) -> None:
    clock = ManualClock()
    tenants = Tenants(make_client("team", tokens_per_s=10.0))
    backend = ProbeBackend(dim=8)
    engine = await make_engine(backend, tenants.accounts, BatchPolicy(max_wait_ms=0.0, rejoin_wait_ms=0.0), clock=clock)
    big = words("big", 1, 18)  # 20 tokens: over the burst of 10, admitted once (the bucket was full)
    result = await engine.embed(EmbedRequest("minilm", tuple(big), client="team"))
    assert result.usage.num_tokens == 20
    num_batches = len(backend.attempted)
    with pytest.raises(RateLimited) as info:
        await engine.embed(EmbedRequest("minilm", ("small",), client="team"))
    assert info.value.code == "tokens_per_s"
    assert "tokens_per_s=10" in info.value.message
    assert info.value.retry_after_s == pytest.approx(1.0)  # 10 tokens of debt at 10 tokens/s
    assert len(backend.attempted) == num_batches  # nothing computed for it
    assert tenants.requests("team") == 1  # the refused request is not counted as a request
    assert tenants.accounts.quotas.num_in_flight("team") == 0
    # Its tokenization did happen, and is charged: charged == measured still.
    assert tenants.compute_ns() == engine.measured_compute_ns
    clock.now_s += 1.1
    await engine.embed(EmbedRequest("minilm", ("small",), client="team"))


async def test_daily_compute_budget_through_the_engine(make_engine: EngineFactory) -> None:
    wall = [20_000 * 86_400.0 + 3600.0]
    tenants = Tenants(make_client("team", daily_compute_s=1e-9), wall_clock=lambda: wall[0])
    backend = ProbeBackend(dim=8)
    engine = await make_engine(backend, tenants.accounts, BatchPolicy(max_wait_ms=0.0))
    await engine.embed(EmbedRequest("minilm", ("spends the budget",), client="team"))
    before = snapshot(tenants, engine)
    with pytest.raises(RateLimited) as info:
        await engine.embed(EmbedRequest("minilm", ("over budget",), client="team"))
    assert info.value.code == "daily_compute_s"
    assert info.value.retry_after_s == pytest.approx(86_400.0 - 3600.0)
    assert snapshot(tenants, engine) == before
    wall[0] += 86_400.0  # the next UTC day
    await engine.embed(EmbedRequest("minilm", ("a new day",), client="team"))


# -- (e) the interactive cap on batch size -----------------------------------------------------


@pytest.mark.parametrize("with_interactive", [True, False])
async def test_interactive_traffic_caps_batches_while_batch_class_waits(
    make_engine: EngineFactory, with_interactive: bool
) -> None:
    cap = 48
    tenants = Tenants(make_client("ui", PriorityClass.INTERACTIVE), make_client("bulk"))
    backend = ProbeBackend(dim=8)
    engine = await make_engine(
        backend,
        tenants.accounts,
        BatchPolicy(budget_tokens=4096, max_batch_size=64, max_wait_ms=0.0),
        fairness=FairnessPolicy(
            interactive_budget_ms=None,  # the cap in tokens (the ms cap: test_admission_engine.py)
            interactive_budget_tokens=cap,
            interactive_window_s=60.0,
            max_client_queue_fraction=1.0,
        ),
    )
    runner = engine.runners[REF]
    backend.gate.clear()
    blocker = embed(engine, "bulk", ["occupies the worker"])
    await wait_until(backend.started.is_set)
    bulk_texts = words("bulk", 40, 6)  # 8 tokens each: one batch of 320 padded tokens without the cap
    bulk = embed(engine, "bulk", bulk_texts)
    await wait_until(lambda: len(runner.queue) == 40)
    ui_texts = words("ui", 1, 3)
    ui = embed(engine, "ui", ui_texts) if with_interactive else None
    if ui is not None:  # one text is tokenized inline: in flight means queued
        await wait_until(lambda: tenants.accounts.quotas.num_in_flight("ui") == 1)
    backend.gate.set()
    await blocker
    assert_vectors(await bulk, backend, bulk_texts)
    batches = backend.attempted[1:]
    costs = [max(len(s) for s in b) * len(b) for b in batches]
    if ui is not None:
        assert_vectors(await ui, backend, ui_texts)
        assert all(cost <= cap for cost in costs), costs
        ui_ids = ids_of(backend, ui_texts)
        assert any(ui_ids & set(b) for b in batches[:2])  # the interactive text goes first or second
    else:
        assert max(costs) > cap, costs  # without interactive traffic the full budget is used
