"""The engine front: a request's stages, in order (``Engine.embed``).

resolve the version → the client's quota (``tenancy.quotas``) → tokenize (``engine.tokenize``)
→ cache lookup → dedup against in-flight entries (``engine.inflight``) → admit and queue the
new entries (``ModelRunner.submit``) → await them → assemble vectors and usage. The runner
settles each computed batch (``engine.settlement``); a computed vector fills the cache.

``Engine`` is the in-process ``EngineClient``: the HTTP layer and the CLI call ``embed`` and
``models`` and know nothing else about it.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from polyray.backends.base import Backend, Tokenized
from polyray.cache.service import EngineCache
from polyray.config import ServerConfig
from polyray.engine.budget_fit import BudgetDecision, BudgetFitter
from polyray.engine.inflight import InflightTable, WaitKey, leave, wait_key
from polyray.engine.observer import EngineObserver, NullObserver
from polyray.engine.queue import Entry, EntryResult
from polyray.engine.runner import ModelRunner, Prediction
from polyray.engine.tokenize import Tokenizer, estimate_tokens, truncated_indices
from polyray.errors import DeadlineExceeded, InvalidRequest, NotFound, Overloaded
from polyray.policies import AdmissionPolicy, BatchPolicy, FairnessPolicy
from polyray.tenancy.accounts import Accounts
from polyray.tenancy.model import PriorityClass
from polyray.tenancy.quotas import Ticket
from polyray.types import EmbedRequest, EmbedResult, ModelRef, Usage

WARMUP_TEXTS = ("warm up", "a somewhat longer sentence to warm up the model with more than a handful of tokens in it")
# How long past its deadline a caller waits for the runner's own verdict before giving up itself.
DEADLINE_GRACE_S = 1.0


@dataclass(frozen=True)
class ModelInfo:
    ref: ModelRef
    dim: int
    max_seq_tokens: int
    backend: str
    ready: bool
    precision: str = "fp32"
    cosine_to_reference: float | None = None  # least probe cosine to the fp32 reference, measured at load
    batching: dict[str, Any] | None = None  # policy in force and the fitted decision (``ModelRunner.batching_report``)


class Engine:
    def __init__(
        self,
        backends: dict[ModelRef, Backend],
        policy: BatchPolicy,
        server: ServerConfig,
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        accounts: Accounts | None = None,
        fairness: FairnessPolicy | None = None,
        cache: EngineCache | None = None,
        fitters: dict[ModelRef, BudgetFitter] | None = None,
        admission: AdmissionPolicy | None = None,
    ) -> None:
        if not backends:
            raise ValueError("the engine needs at least one model")
        self.server = server
        self.clock = clock
        self.accounts = accounts or Accounts()
        self.cache = cache
        # Per version: cache key -> the queued or computing entry (in-flight dedup, cache on only).
        self._inflight = {
            ref: InflightTable(functools.partial(self._queue_fill, ref) if cache is not None else None)
            for ref in backends
        }
        self._normalization = {ref: _normalization(b) for ref, b in backends.items()}
        self.tokenizer = Tokenizer()
        self._pending_fills: dict[ModelRef, list[tuple[bytes, np.ndarray]]] = {}
        self._fill_tasks: set[asyncio.Future[None]] = set()
        obs = observer or NullObserver()
        self.runners = {
            ref: ModelRunner(
                ref,
                backend,
                replace(policy, padding_free=backend.padding_free),
                server.max_queue_items,
                obs,
                clock,
                fairness,
                functools.partial(self._charge_batch_share, ref),
                functools.partial(self._note_compute, ref) if cache is not None else None,
                (fitters or {}).get(ref),
                admission,
            )
            for ref, backend in backends.items()
        }
        self._started = False

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, warmup: bool = True) -> None:
        if self._started:
            return
        self._started = True
        if self.cache is not None:
            await self.cache.start()
        for runner in self.runners.values():
            await runner.start(WARMUP_TEXTS if warmup else ())

    async def stop(self) -> None:
        await asyncio.gather(*(runner.stop() for runner in self.runners.values()))
        if self.cache is not None:
            await asyncio.sleep(0)  # let the last deliveries schedule their cache fills
            await asyncio.gather(*self._fill_tasks, return_exceptions=True)
            await self.cache.stop()
        self.tokenizer.close()

    @property
    def ready(self) -> bool:
        return self._started and all(r.ready for r in self.runners.values())

    # -- queries -------------------------------------------------------------------------
    def resolve(self, model: str) -> ModelRef:
        """``name`` (its newest version) or ``name@version`` to a served version."""
        name, at, version = model.partition("@")
        if at and not version:
            raise NotFound(f"model {model!r} names no version after '@'", param="model", code="model_not_found")
        versions = sorted((ref for ref in self.runners if ref.name == name), key=_version_key)
        if not versions:
            served = ", ".join(sorted({ref.name for ref in self.runners}))
            raise NotFound(
                f"model {model!r} is not served here (models: {served})", param="model", code="model_not_found"
            )
        if not version:
            return versions[-1]
        for ref in versions:
            if ref.version == version:
                return ref
        have = ", ".join(str(ref) for ref in versions)
        raise NotFound(
            f"model {model!r} has no version {version!r} (versions: {have})", param="model", code="model_not_found"
        )

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                ref,
                r.backend.dim,
                r.backend.max_seq_tokens,
                r.backend.description,
                r.ready,
                r.backend.precision,
                r.backend.cosine_to_reference,
                r.batching_report(),
            )
            for ref, r in sorted(self.runners.items(), key=lambda item: (item[0].name, _version_key(item[0])))
        ]

    def cache_report(self) -> dict[str, Any] | None:
        return self.cache.report() if self.cache is not None else None

    async def refit(self, model: str) -> BudgetDecision:
        """Re-measure one version's batch budget now and apply it (``ModelRunner.refit``)."""
        runner = self.runners[self.resolve(model)]
        if runner.fitter is None:
            raise InvalidRequest(
                f"model {runner.ref} has no batch-budget fit (fit_batch_budget = false)",
                param="model",
                code="budget_fit_disabled",
            )
        return await runner.refit()

    @property
    def measured_tokenize_ns(self) -> int:
        return self.tokenizer.measured_ns

    @property
    def num_inline_tokenized(self) -> int:
        """Requests tokenized on the event loop (the rest: tokenizer threads)."""
        return self.tokenizer.num_inline

    @property
    def measured_compute_ns(self) -> int:
        """Σ of all measured compute: every batch's forward pass plus every tokenization."""
        return self.measured_tokenize_ns + sum(r.measured_compute_ns for r in self.runners.values())

    def _charge_batch_share(self, ref: ModelRef, client: str, compute_ns: int) -> None:
        self.accounts.charge(client, ref, compute_ns)

    def _note_compute(self, ref: ModelRef, compute_ns: int, num_entries: int) -> None:
        assert self.cache is not None
        self.cache.note_compute(ref, compute_ns / 1e9, num_entries)

    # -- the request path ----------------------------------------------------------------
    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """resolve → quota → tokenize → cache → dedup → admit → await → assemble."""
        ref = self.resolve(request.model)
        runner = self._ready_runner(ref, request)
        client = self.accounts.client(request.client)
        quotas = self.accounts.quotas
        ticket = quotas.admit(client, self.clock(), self.accounts.wall_clock())
        try:
            deadline_s = request.deadline_s
            if deadline_s is None:
                deadline_s = self.clock() + self.server.request_timeout_s
            interactive = client.priority is PriorityClass.INTERACTIVE
            call = _Call(request, ref, runner, client.name, client.weight, interactive, ticket, deadline_s)
            return await self._embed_admitted(call)
        finally:
            quotas.release(ticket)

    async def _embed_admitted(self, call: _Call) -> EmbedResult:
        self._precheck(call)  # a refusal the queue alone decides costs no tokenizing
        texts = await self._tokenize(call)
        now_s = self.clock()
        await self._lookup(call, texts)
        waits, prediction = self._dedup_and_submit(call, texts, now_s)
        outcomes = await _await_entries(waits, call.deadline_s - now_s)
        if prediction is not None and outcomes:
            call.runner.observe_wait(prediction, max(r.queue_ms for r in outcomes) / 1000.0)
        return self._assemble(call, texts, waits, outcomes)

    def _ready_runner(self, ref: ModelRef, request: EmbedRequest) -> ModelRunner:
        runner = self.runners[ref]
        if not runner.ready:
            raise Overloaded(f"model {ref} is not ready", code="not_ready", retry_after_s=2.0)
        if not request.texts:
            raise InvalidRequest("input must contain at least one text", param="input")
        return runner

    def _precheck(self, call: _Call) -> None:
        estimated_tokens = estimate_tokens(call.request.texts, call.runner.backend.max_seq_tokens)
        call.runner.precheck(call.client, call.interactive, call.deadline_s, estimated_tokens)

    async def _tokenize(self, call: _Call) -> _Texts:
        """Tokenize; charge the tokenizing as compute and the tokens to the client's quota; refuse
        over-long texts unless the request allows cutting them."""
        backend = call.runner.backend
        tokenized, tokenize_ns = await self.tokenizer.tokenize(backend, call.request.texts)
        self.accounts.charge(call.client, call.ref, tokenize_ns)
        num_tokens = sum(len(t.ids) for t in tokenized)
        self.accounts.quotas.charge_tokens(call.ticket, self.accounts.client(call.client), num_tokens, self.clock())
        truncated = truncated_indices(tokenized, call.request.truncate, call.ref, backend.max_seq_tokens)
        return _Texts(tokenized, tokenize_ns, num_tokens, truncated)

    async def _lookup(self, call: _Call, texts: _Texts) -> None:
        """Set each text's cache key and its cached vector (cache off: neither)."""
        if self.cache is None:
            return
        ref = call.ref
        norm = self._normalization[ref]
        # Truncated texts are neither cached nor shared: their vector is not the text's own.
        texts.keys = [
            None if t.truncated else self.cache.key(ref, norm, text)
            for t, text in zip(texts.tokenized, call.request.texts, strict=True)
        ]
        lookup = [k for k in texts.keys if k is not None]
        found = iter(await self.cache.lookup(ref, lookup)) if lookup else iter(())
        for i, key in enumerate(texts.keys):
            if key is not None:
                texts.vectors[i] = next(found)[0]

    def _dedup_and_submit(
        self, call: _Call, texts: _Texts, now_s: float
    ) -> tuple[dict[WaitKey, tuple[Entry, int]], Prediction | None]:
        """The entries this request waits for (each with its slot among the sharers), and the wait
        admission predicted for it. Texts already queued or computing for another request join
        that entry; the rest are submitted all at once (all or none: ``Overloaded`` /
        ``RateLimited`` leave nothing joined). Nothing here awaits, so it is atomic."""
        runner = call.runner
        table = self._inflight[call.ref]
        loop = asyncio.get_running_loop()

        def new_entry(ids: tuple[int, ...]) -> Entry:
            return Entry(ids, now_s, call.deadline_s, loop.create_future(), call.client, call.weight, call.interactive)

        have = [v is not None for v in texts.vectors]
        claim = table.claim([t.ids for t in texts.tokenized], texts.keys, have, new_entry, call.client)
        prediction = None
        if claim.new:
            prediction = runner.submit(list(claim.new.values()))  # raises the refusal: nothing joined yet
        for entry in claim.joins.values():
            runner.queue.promote(entry, call.client, call.weight, call.interactive)  # no-op once computing
        waits = table.commit(claim, call.client, call.deadline_s)
        if claim.joins and self.cache is not None:
            self.cache.num_deduplicated += len(claim.joins)  # the cache report's dedup count
        return waits, prediction

    def _assemble(
        self, call: _Call, texts: _Texts, waits: dict[WaitKey, tuple[Entry, int]], outcomes: list[EntryResult]
    ) -> EmbedResult:
        """The vectors in request order and the usage: this request's slot of each shared compute."""
        results = dict(zip(waits, outcomes, strict=True))
        vectors = texts.vectors
        num_cached = sum(v is not None for v in vectors)
        for i in range(len(vectors)):
            if vectors[i] is None:
                vectors[i] = results[wait_key(i, texts.keys)].vector
        batches = {r.batch_id: r.inference_ms for r in outcomes}
        usage = Usage(
            num_tokens=texts.num_tokens,
            queue_ms=max((r.queue_ms for r in outcomes), default=0.0),
            inference_ms=sum(batches.values()),
            num_batches=len(batches),
            compute_ns=texts.tokenize_ns + sum(r.sharer_ns[waits[k][1]] for k, r in results.items()),
            num_cached=num_cached,
        )
        self.accounts.record_request(call.client, call.ref, len(vectors), texts.num_tokens, num_cached)
        return EmbedResult(call.ref, np.stack(vectors), usage, texts.truncated)  # type: ignore[arg-type]

    def _queue_fill(self, ref: ModelRef, key: bytes, vector: np.ndarray) -> None:
        """Fill the cache with a computed vector: one fill per batch delivered, not one per text."""
        pending = self._pending_fills.setdefault(ref, [])
        pending.append((key, vector))
        if len(pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush_fills, ref)

    def _flush_fills(self, ref: ModelRef) -> None:
        pending = self._pending_fills.pop(ref, [])
        if pending and self.cache is not None:
            keys, vecs = zip(*pending, strict=True)
            task = asyncio.ensure_future(self.cache.fill(ref, list(keys), list(vecs)))
            self._fill_tasks.add(task)
            task.add_done_callback(self._fill_tasks.discard)


@dataclass(frozen=True)
class _Call:
    """One admitted request on its way through the stages: who asked, for what, until when."""

    request: EmbedRequest
    ref: ModelRef
    runner: ModelRunner
    client: str
    weight: float
    interactive: bool
    ticket: Ticket
    deadline_s: float


@dataclass
class _Texts:
    """A request's texts through the stages: their tokens, then cache keys and cached vectors."""

    tokenized: list[Tokenized]
    tokenize_ns: int
    num_tokens: int
    truncated: tuple[int, ...]
    keys: list[bytes | None] = field(init=False)  # None: not cached (cache off, or truncated)
    vectors: list[np.ndarray | None] = field(init=False)  # None: still to compute

    def __post_init__(self) -> None:
        self.keys = [None] * len(self.tokenized)
        self.vectors = [None] * len(self.tokenized)


async def _await_entries(waits: dict[WaitKey, tuple[Entry, int]], deadline_left_s: float) -> list[EntryResult]:
    """Wait for every entry (until the deadline plus the runner's grace); on the way out, for any
    reason, leave each entry so the last request to give up drops it before compute."""
    gathered = asyncio.gather(*(asyncio.shield(e.future) for e, _ in waits.values()))
    # If this request gives up (cancelled, deadline, another entry failed), the gather ends with
    # the first error and nobody reads it: mark it read so asyncio does not log it.
    gathered.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        return await asyncio.wait_for(gathered, timeout=max(0.0, deadline_left_s) + DEADLINE_GRACE_S)
    except TimeoutError:
        raise DeadlineExceeded() from None
    finally:
        for entry, _ in waits.values():
            leave(entry)


def _normalization(backend: Backend) -> str:
    """Part of the cache key: whether the version's vectors are L2-normalized."""
    model_dir = getattr(backend, "model_dir", None)
    return "l2" if model_dir is None or getattr(model_dir, "normalize", True) else "none"


def _version_key(ref: ModelRef) -> tuple[int, int | str]:
    """Numeric versions sort numerically and after non-numeric ones."""
    return (1, int(ref.version)) if ref.version.isdigit() else (0, ref.version)
