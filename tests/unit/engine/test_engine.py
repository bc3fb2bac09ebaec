"""The engine front and the per-model runner, driven with the deterministic ``DummyBackend``.

Tests that need the worker to be busy use ``ProbeBackend``: its ``encode`` blocks on a gate the
test opens, so "while the worker computes a slow batch" is a state the test controls instead of a
race against a sleep.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import pytest
from engine_support import REF, ProbeBackend, wait_until

from polyray.backends.dummy import DummyBackend
from polyray.config import ServerConfig
from polyray.engine.engine import Engine
from polyray.engine.queue import Entry, EntryResult
from polyray.engine.runner import ModelRunner, compute_rows
from polyray.errors import BackendError, DeadlineExceeded, InvalidRequest, NotFound, Overloaded
from polyray.policies import BatchPolicy, FairnessPolicy
from polyray.tenancy.accounts import Accounts
from polyray.types import EmbedRequest, EmbedResult, ModelRef


class RecordingObserver:
    """An ``EngineObserver`` that keeps what it is told."""

    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()
        self.batches: list[tuple[int, int, int]] = []  # (num_entries, cost_tokens, num_tokens)
        self.depths: list[int] = []

    def on_queue_depth(self, model: ModelRef, num_entries: int) -> None:
        self.depths.append(num_entries)

    def on_batch(
        self,
        model: ModelRef,
        num_entries: int,
        cost_tokens: int,
        num_tokens: int,
        queue_ms: list[float],
        compute_ms: float,
    ) -> None:
        assert len(queue_ms) == num_entries
        assert compute_ms >= 0
        self.batches.append((num_entries, cost_tokens, num_tokens))

    def on_dropped(self, model: ModelRef, reason: str, num_entries: int) -> None:
        self.dropped[reason] += num_entries


EngineFactory = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def make_engine() -> AsyncIterator[EngineFactory]:
    made: list[tuple[Engine, list[Any]]] = []

    async def factory(
        backends: dict[ModelRef, Any] | None = None,
        policy: BatchPolicy | None = None,
        server: ServerConfig | None = None,
        observer: Any = None,
        fairness: FairnessPolicy | None = None,
        accounts: Accounts | None = None,
    ) -> Engine:
        backends = backends if backends is not None else {REF: DummyBackend(dim=16)}
        engine = Engine(
            backends,
            policy or BatchPolicy(max_wait_ms=1.0),
            server or ServerConfig(),
            observer,
            accounts=accounts,
            fairness=fairness or FairnessPolicy(max_client_queue_fraction=1.0),
        )
        await engine.start(warmup=False)
        made.append((engine, list(backends.values())))
        return engine

    yield factory
    for engine, backends in made:
        for backend in backends:  # never leave a worker blocked on a gate
            if isinstance(backend, ProbeBackend):
                backend.gate.set()
        await engine.stop()


def expected(backend: DummyBackend, texts: Sequence[str]) -> np.ndarray:
    return np.stack([backend.vector(t.ids) for t in backend.tokenize(texts)])


def assert_result(result: EmbedResult, backend: DummyBackend, texts: Sequence[str]) -> None:
    assert result.vectors.shape == (len(texts), backend.dim)
    assert result.vectors.dtype == np.float32
    np.testing.assert_array_equal(result.vectors, expected(backend, texts))


def texts_of(tag: str, n: int) -> tuple[str, ...]:
    """Distinct texts of varied lengths whose words are unique to ``tag``."""
    return tuple(" ".join(f"{tag}w{i}x{j}" for j in range(1 + (i * 7) % 13)) for i in range(n))


async def start_blocker(engine: Engine, backend: ProbeBackend) -> asyncio.Task[EmbedResult]:
    """Occupy the worker with a batch held on the backend's gate."""
    backend.gate.clear()
    task = asyncio.create_task(engine.embed(EmbedRequest("minilm", ("blocker text",))))
    await wait_until(backend.started.is_set)
    return task


# -- results ---------------------------------------------------------------------------------


async def test_single_text_result_is_the_backend_vector(make_engine: EngineFactory) -> None:
    backend = DummyBackend(dim=16)
    engine = await make_engine({REF: backend})
    result = await engine.embed(EmbedRequest("minilm", ("hello world",)))
    assert result.model == REF
    assert result.truncated == ()
    assert_result(result, backend, ["hello world"])
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("num_texts", [2, 8, 9, 50])  # 9 and 50 take the threaded tokenize path
async def test_many_text_request_rows_in_order(make_engine: EngineFactory, num_texts: int) -> None:
    backend = DummyBackend(dim=16)
    engine = await make_engine({REF: backend}, BatchPolicy(budget_tokens=64, max_batch_size=4, max_wait_ms=0.5))
    texts = texts_of("many", num_texts)
    result = await engine.embed(EmbedRequest("minilm", texts))
    assert_result(result, backend, texts)
    assert len({v.tobytes() for v in result.vectors}) == num_texts


async def test_identical_texts_in_one_request(make_engine: EngineFactory) -> None:
    backend = DummyBackend(dim=16)
    engine = await make_engine({REF: backend})
    texts = ("same", "other", "same")
    result = await engine.embed(EmbedRequest("minilm", texts))
    assert_result(result, backend, texts)


async def test_concurrent_requests_never_mixed_up(make_engine: EngineFactory) -> None:
    backend = DummyBackend(dim=16, seconds_per_token=0.00002)
    engine = await make_engine({REF: backend}, BatchPolicy(budget_tokens=200, max_batch_size=16, max_wait_ms=1.0))
    requests = [texts_of(f"r{k}", 1 + k % 4) for k in range(40)]
    results = await asyncio.gather(*(engine.embed(EmbedRequest("minilm", texts)) for texts in requests))
    for texts, result in zip(requests, results, strict=True):
        assert_result(result, backend, texts)
    assert sum(backend.batch_sizes) == sum(len(t) for t in requests)  # each text computed once


async def test_concurrent_requests_are_batched_together(make_engine: EngineFactory) -> None:
    backend = DummyBackend(dim=16, seconds_per_token=0.0005)
    engine = await make_engine({REF: backend}, BatchPolicy(budget_tokens=1024, max_batch_size=64, max_wait_ms=1.0))
    requests = [(f"text number {k}",) for k in range(20)]
    results = await asyncio.gather(*(engine.embed(EmbedRequest("minilm", texts)) for texts in requests))
    for texts, result in zip(requests, results, strict=True):
        assert_result(result, backend, texts)
    assert max(backend.batch_sizes) > 1
    assert backend.num_batches < len(requests)
    assert sum(backend.batch_sizes) == len(requests)


# -- drops -----------------------------------------------------------------------------------


async def test_past_deadline_is_dropped_before_compute(make_engine: EngineFactory) -> None:
    backend = ProbeBackend(dim=16)
    observer = RecordingObserver()
    engine = await make_engine({REF: backend}, observer=observer)
    texts = texts_of("late", 3)
    with pytest.raises(DeadlineExceeded) as info:
        await engine.embed(EmbedRequest("minilm", texts, deadline_s=engine.clock() - 1.0))
    assert info.value.code == "deadline_exceeded"
    assert backend.attempted == []
    assert observer.dropped["deadline"] == 3
    # The engine still serves.
    assert_result(await engine.embed(EmbedRequest("minilm", ("after",))), backend, ["after"])


async def test_deadline_passing_while_worker_busy_drops_entries(make_engine: EngineFactory) -> None:
    backend = ProbeBackend(dim=16)
    observer = RecordingObserver()
    engine = await make_engine({REF: backend}, BatchPolicy(max_wait_ms=0.0), observer=observer)
    blocker = await start_blocker(engine, backend)
    texts = texts_of("late", 2)
    late = asyncio.create_task(engine.embed(EmbedRequest("minilm", texts, deadline_s=engine.clock() + 0.02)))
    on_time = asyncio.create_task(engine.embed(EmbedRequest("minilm", ("patient",))))
    await wait_until(lambda: len(engine.runners[REF].queue) == 3)
    await asyncio.sleep(0.04)  # the deadline passes while the worker is still busy
    backend.gate.set()
    with pytest.raises(DeadlineExceeded):
        await late
    assert_result(await on_time, backend, ["patient"])
    assert_result(await blocker, backend, ["blocker text"])
    late_ids = {t.ids for t in backend.tokenize(texts)}
    assert not late_ids & backend.seen_ids()
    assert observer.dropped["deadline"] == 2


async def test_deadline_passing_in_held_full_batch_drops_entries(make_engine: EngineFactory) -> None:
    # max_batch_size=2 makes the two late texts a full batch, held while the worker is busy.
    backend = ProbeBackend(dim=16)
    observer = RecordingObserver()
    engine = await make_engine({REF: backend}, BatchPolicy(max_batch_size=2, max_wait_ms=0.0), observer=observer)
    blocker = await start_blocker(engine, backend)
    texts = texts_of("late", 2)
    late = asyncio.create_task(engine.embed(EmbedRequest("minilm", texts, deadline_s=engine.clock() + 0.02)))
    # Depths so far: blocker queued (1) and taken (0); late queued (2) and taken as a full batch (0).
    await wait_until(lambda: len(observer.depths) >= 4 and observer.depths[-1] == 0)
    assert not late.done()
    await asyncio.sleep(0.04)
    backend.gate.set()
    with pytest.raises(DeadlineExceeded):
        await late
    await blocker
    assert not {t.ids for t in backend.tokenize(texts)} & backend.seen_ids()
    assert observer.dropped["deadline"] == 2


async def test_cancelled_request_is_not_computed(make_engine: EngineFactory) -> None:
    backend = ProbeBackend(dim=16)
    observer = RecordingObserver()
    engine = await make_engine({REF: backend}, BatchPolicy(max_wait_ms=0.0), observer=observer)
    blocker = await start_blocker(engine, backend)
    texts = texts_of("gone", 3)
    victim = asyncio.create_task(engine.embed(EmbedRequest("minilm", texts)))
    await wait_until(lambda: len(engine.runners[REF].queue) == 3)
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    backend.gate.set()
    await blocker
    after = await engine.embed(EmbedRequest("minilm", ("after",)))
    assert_result(after, backend, ["after"])
    assert not {t.ids for t in backend.tokenize(texts)} & backend.seen_ids()
    assert observer.dropped["cancelled"] == 3
    assert observer.dropped["abandoned_after_compute"] == 0


async def test_cancelled_request_in_held_full_batch_is_not_computed(make_engine: EngineFactory) -> None:
    backend = ProbeBackend(dim=16)
    observer = RecordingObserver()
    engine = await make_engine({REF: backend}, BatchPolicy(max_batch_size=2, max_wait_ms=0.0), observer=observer)
    blocker = await start_blocker(engine, backend)
    texts = texts_of("gone", 2)
    victim = asyncio.create_task(engine.embed(EmbedRequest("minilm", texts)))
    # The full batch leaves the queue at once and waits for the worker.
    await wait_until(lambda: len(observer.depths) >= 4 and observer.depths[-1] == 0)
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    backend.gate.set()
    await blocker
    assert_result(await engine.embed(EmbedRequest("minilm", ("after",))), backend, ["after"])
    assert not {t.ids for t in backend.tokenize(texts)} & backend.seen_ids()
    assert observer.dropped["cancelled"] == 2


async def test_cancel_during_compute_counts_abandoned(make_engine: EngineFactory) -> None:
    backend = ProbeBackend(dim=16)
    observer = RecordingObserver()
    engine = await make_engine({REF: backend}, BatchPolicy(max_wait_ms=0.0), observer=observer)
    blocker = await start_blocker(engine, backend)
    blocker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocker
    backend.gate.set()
    assert_result(await engine.embed(EmbedRequest("minilm", ("after",))), backend, ["after"])
    assert observer.dropped["abandoned_after_compute"] == 1


# -- admission -------------------------------------------------------------------------------


async def test_queue_bound_rejects_overflow_and_earlier_requests_complete(make_engine: EngineFactory) -> None:
    backend = ProbeBackend(dim=16)
    engine = await make_engine(
        {REF: backend},
        BatchPolicy(budget_tokens=100_000, max_batch_size=1000, max_wait_ms=0.0),
        ServerConfig(max_queue_items=4),
    )
    blocker = await start_blocker(engine, backend)
    first = texts_of("first", 3)
    waiting = asyncio.create_task(engine.embed(EmbedRequest("minilm", first)))
    await wait_until(lambda: len(engine.runners[REF].queue) == 3)
    with pytest.raises(Overloaded) as info:
        await engine.embed(EmbedRequest("minilm", texts_of("over", 2)))
    assert info.value.code == "queue_full"
    assert info.value.retry_after_s is not None
    assert len(engine.runners[REF].queue) == 3  # the rejected request queued nothing
    last = asyncio.create_task(engine.embed(EmbedRequest("minilm", ("fits exactly",))))
    await wait_until(lambda: len(engine.runners[REF].queue) == 4)
    backend.gate.set()
    assert_result(await blocker, backend, ["blocker text"])
    assert_result(await waiting, backend, first)
    assert_result(await last, backend, ["fits exactly"])
    assert not {t.ids for t in backend.tokenize(texts_of("over", 2))} & backend.seen_ids()


async def test_request_larger_than_queue_is_rejected(make_engine: EngineFactory) -> None:
    engine = await make_engine(server=ServerConfig(max_queue_items=2))
    with pytest.raises(Overloaded) as info:
        await engine.embed(EmbedRequest("minilm", ("a", "b", "c")))
    assert info.value.code == "queue_full"


# -- backend failures ------------------------------------------------------------------------


async def test_poisoned_request_fails_alone_and_engine_keeps_serving(make_engine: EngineFactory) -> None:
    backend = ProbeBackend(dim=16, poison_word="poison")
    engine = await make_engine({REF: backend}, BatchPolicy(budget_tokens=10_000, max_batch_size=64, max_wait_ms=0.0))
    blocker = await start_blocker(engine, backend)
    good = [texts_of(f"good{k}", 2) for k in range(3)]
    tasks = [asyncio.create_task(engine.embed(EmbedRequest("minilm", texts))) for texts in good]
    bad = asyncio.create_task(engine.embed(EmbedRequest("minilm", ("this has poison in it", "clean one"))))
    await wait_until(lambda: len(engine.runners[REF].queue) == 8)
    backend.gate.set()
    await blocker
    with pytest.raises(BackendError) as info:
        await bad
    assert "poisoned input" in info.value.message
    for texts, task in zip(good, tasks, strict=True):
        assert_result(await task, backend, texts)
    # All eight went in one batch, which failed and was retried row by row.
    assert any(len(batch) == 8 for batch in backend.attempted)
    assert backend.poison_id is not None
    poisoned_alone = [b for b in backend.attempted if len(b) == 1 and backend.poison_id in b[0]]
    assert poisoned_alone
    # Serving continues, and a later poisoned request fails on its own again.
    assert_result(await engine.embed(EmbedRequest("minilm", ("still fine",))), backend, ["still fine"])
    with pytest.raises(BackendError):
        await engine.embed(EmbedRequest("minilm", ("poison",)))


def test_compute_rows_isolates_failing_rows() -> None:
    backend = ProbeBackend(dim=8, poison_word="poison")
    rows = [t.ids for t in backend.tokenize(["ok", "poison", "fine"])]
    out = compute_rows(backend, rows)
    assert isinstance(out[1], ValueError)
    np.testing.assert_array_equal(out[0], backend.vector(rows[0]))
    np.testing.assert_array_equal(out[2], backend.vector(rows[2]))
    assert [len(b) for b in backend.attempted] == [3, 1, 1, 1]


def test_compute_rows_rejects_wrong_shape() -> None:
    class WrongShape(DummyBackend):
        def encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
            return np.zeros((len(batch), self.dim + 1), dtype=np.float32)

    backend = WrongShape(dim=4)
    out = compute_rows(backend, [(101, 102), (101, 5, 102)])
    assert len(out) == 2
    assert all(isinstance(row, BackendError) for row in out)


# -- models and validation -------------------------------------------------------------------


async def test_unknown_model_and_version(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    with pytest.raises(NotFound) as info:
        await engine.embed(EmbedRequest("nope", ("x",)))
    assert info.value.param == "model"
    assert info.value.code == "model_not_found"
    with pytest.raises(NotFound) as info:
        await engine.embed(EmbedRequest("minilm@9", ("x",)))
    assert info.value.param == "model"


async def test_name_and_version_resolution(make_engine: EngineFactory) -> None:
    refs = {v: ModelRef("minilm", v) for v in ("1", "2", "10", "beta")}
    backends = {refs[v]: DummyBackend(dim=d) for v, d in (("1", 4), ("2", 8), ("10", 12), ("beta", 6))}
    backends[ModelRef("other", "1")] = DummyBackend(dim=5)
    engine = await make_engine(backends)
    assert engine.resolve("minilm") == refs["10"]  # numeric versions sort numerically, after names
    assert engine.resolve("minilm@2") == refs["2"]
    assert engine.resolve("minilm@beta") == refs["beta"]
    assert engine.resolve("other") == ModelRef("other", "1")
    result = await engine.embed(EmbedRequest("minilm@2", ("hi",)))
    assert result.model == refs["2"]
    assert_result(result, backends[refs["2"]], ["hi"])
    latest = await engine.embed(EmbedRequest("minilm", ("hi",)))
    assert latest.vectors.shape == (1, 12)
    infos = engine.models()
    # Listed by name, then version in resolution order, so the newest (the alias target) is last.
    assert [i.ref for i in infos] == [refs["beta"], refs["1"], refs["2"], refs["10"], ModelRef("other", "1")]
    assert all(i.ready for i in infos)
    assert {i.ref: i.dim for i in infos}[refs["beta"]] == 6


async def test_empty_texts_rejected(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    with pytest.raises(InvalidRequest) as info:
        await engine.embed(EmbedRequest("minilm", ()))
    assert info.value.param == "input"


async def test_over_long_text_rejected_without_truncate(make_engine: EngineFactory) -> None:
    backend = DummyBackend(dim=8, max_seq_tokens=8)
    engine = await make_engine({REF: backend})
    texts = ("short", "one two three four five six seven eight nine")
    with pytest.raises(InvalidRequest) as info:
        await engine.embed(EmbedRequest("minilm", texts, truncate=False))
    assert info.value.param == "input[1]"
    assert info.value.code == "context_length_exceeded"
    assert backend.num_batches == 0


async def test_over_long_text_truncated(make_engine: EngineFactory) -> None:
    backend = DummyBackend(dim=8, max_seq_tokens=8)
    engine = await make_engine({REF: backend})
    texts = ("short", "one two three four five six seven eight nine", "fits in six")
    result = await engine.embed(EmbedRequest("minilm", texts, truncate=True))
    assert result.truncated == (1,)
    assert_result(result, backend, texts)
    assert result.usage.num_tokens == 3 + 8 + 5


async def test_usage(make_engine: EngineFactory) -> None:
    backend = DummyBackend(dim=8)
    engine = await make_engine({REF: backend}, BatchPolicy(budget_tokens=16, max_batch_size=64, max_wait_ms=0.0))
    texts = ("alpha", "beta gamma delta", "a b c d e f g", "x")
    result = await engine.embed(EmbedRequest("minilm", texts))
    assert result.usage.num_tokens == sum(len(t.ids) for t in backend.tokenize(texts))
    assert result.usage.queue_ms >= 0
    assert result.usage.inference_ms >= 0
    assert result.usage.num_batches >= 2  # 16-token budget cannot hold them all
    assert result.usage.num_batches <= backend.num_batches


# -- lifecycle -------------------------------------------------------------------------------


async def test_stop_drains_accepted_requests_then_rejects(make_engine: EngineFactory) -> None:
    backend = ProbeBackend(dim=16)
    observer = RecordingObserver()
    engine = await make_engine(
        {REF: backend}, BatchPolicy(budget_tokens=40, max_batch_size=4, max_wait_ms=50.0), observer=observer
    )
    blocker = await start_blocker(engine, backend)
    requests = [texts_of(f"drain{k}", 3) for k in range(5)]
    tasks = [asyncio.create_task(engine.embed(EmbedRequest("minilm", texts))) for texts in requests]
    # Each task runs up to its submit (tokenizing inline) on its first step.
    await asyncio.sleep(0)
    assert len(observer.depths) >= 2 + len(requests)
    stopping = asyncio.create_task(engine.stop())
    await asyncio.sleep(0.005)
    assert not engine.ready
    with pytest.raises(Overloaded):
        await engine.embed(EmbedRequest("minilm", ("too late",)))
    backend.gate.set()
    await stopping
    assert_result(await blocker, backend, ["blocker text"])
    for texts, task in zip(requests, tasks, strict=True):
        assert_result(await task, backend, texts)
    with pytest.raises(Overloaded):
        await engine.embed(EmbedRequest("minilm", ("after stop",)))
    late_ids = {t.ids for t in backend.tokenize(["too late", "after stop"])}
    assert not late_ids & backend.seen_ids()


def test_engine_needs_a_model() -> None:
    with pytest.raises(ValueError):
        Engine({}, BatchPolicy(), ServerConfig())


async def test_engine_ready_only_after_start() -> None:
    engine = Engine({REF: DummyBackend(dim=4)}, BatchPolicy(), ServerConfig())
    assert not engine.ready
    with pytest.raises(Overloaded) as info:
        await engine.embed(EmbedRequest("minilm", ("x",)))
    assert info.value.code == "not_ready"
    await engine.start(warmup=True)
    try:
        assert engine.ready
        assert (await engine.embed(EmbedRequest("minilm", ("x",)))).vectors.shape == (1, 4)
    finally:
        await engine.stop()
    assert not engine.ready


# -- the runner on its own -------------------------------------------------------------------


async def test_runner_reports_batches_to_observer() -> None:
    backend = DummyBackend(dim=8)
    observer = RecordingObserver()
    runner = ModelRunner(REF, backend, BatchPolicy(budget_tokens=1000, max_wait_ms=0.0), 100, observer)
    await runner.start()
    loop = asyncio.get_running_loop()
    tokenized = backend.tokenize(["one", "two words", "three words here"])
    now_s = runner.clock()
    entries = [Entry(t.ids, now_s, now_s + 10.0, loop.create_future()) for t in tokenized]
    try:
        runner.submit(entries)
        results: list[EntryResult] = await asyncio.gather(*(e.future for e in entries))
    finally:
        await runner.stop()
    for t, r in zip(tokenized, results, strict=True):
        np.testing.assert_array_equal(r.vector, backend.vector(t.ids))
        assert r.queue_ms >= 0
    lengths = [len(t.ids) for t in tokenized]
    assert sum(n for n, _, _ in observer.batches) == 3
    assert sum(tokens for _, _, tokens in observer.batches) == sum(lengths)
    if len(observer.batches) == 1:
        assert observer.batches[0] == (3, max(lengths) * 3, sum(lengths))
    with pytest.raises(Overloaded) as info:
        runner.submit([Entry((101, 102), now_s, now_s + 1, loop.create_future())])
    assert info.value.code == "shutting_down"
