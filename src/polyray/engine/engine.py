"""The engine front: resolve the model, tokenize, admit, queue, await, assemble the result.

``Engine`` is the in-process ``EngineClient``: the HTTP layer and the CLI call ``embed`` and
``models`` and know nothing else about it.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from polyray.backends.base import Backend, Tokenized
from polyray.cache.service import EngineCache
from polyray.config import ServerConfig
from polyray.engine.budget_fit import BudgetDecision, BudgetFitter
from polyray.engine.observer import EngineObserver, NullObserver
from polyray.engine.queue import Entry, EntryResult
from polyray.engine.runner import ModelRunner
from polyray.errors import DeadlineExceeded, InvalidRequest, NotFound, Overloaded
from polyray.policies import AdmissionPolicy, BatchPolicy, FairnessPolicy
from polyray.tenancy.accounts import Accounts
from polyray.tenancy.model import PriorityClass
from polyray.tenancy.quotas import Ticket
from polyray.types import EmbedRequest, EmbedResult, ModelRef, Usage

WARMUP_TEXTS = ("warm up", "a somewhat longer sentence to warm up the model with more than a handful of tokens in it")
# Requests of at most this many texts and characters are tokenized on the event loop (≈ 1 ms of
# work at most: the real tokenizer runs ~1 µs per character); anything larger goes to the tokenizer
# threads so the loop stays responsive. Counting texts alone let one 4 MB text freeze the server.
INLINE_TOKENIZE_MAX_TEXTS = 8
INLINE_TOKENIZE_MAX_CHARS = 1024
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
        self._inflight: dict[ModelRef, dict[bytes, Entry]] = {ref: {} for ref in backends}
        self._normalization = {ref: _normalization(b) for ref, b in backends.items()}
        self.measured_tokenize_ns = 0
        self.num_inline_tokenized = 0  # requests tokenized on the event loop (the rest: tokenizer threads)
        # Tokenization gets threads of its own: in the default executor it would queue behind
        # database and fsync work (ledger, directory), which can take seconds on a slow disk.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="polyray-tokenize")
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
        self._tokenize_pool.shutdown(wait=False)

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
        ref = self.resolve(request.model)
        runner = self.runners[ref]
        if not runner.ready:
            raise Overloaded(f"model {ref} is not ready", code="not_ready", retry_after_s=2.0)
        if not request.texts:
            raise InvalidRequest("input must contain at least one text", param="input")
        client = self.accounts.client(request.client)
        quotas = self.accounts.quotas
        ticket = quotas.admit(client, self.clock(), self.accounts.wall_clock())
        try:
            return await self._embed_admitted(
                request, ref, runner, client.name, client.weight, client.priority is PriorityClass.INTERACTIVE, ticket
            )
        finally:
            quotas.release(ticket)

    async def _embed_admitted(
        self,
        request: EmbedRequest,
        ref: ModelRef,
        runner: ModelRunner,
        client_name: str,
        weight: float,
        interactive: bool,
        ticket: Ticket,
    ) -> EmbedResult:
        deadline_s = (
            request.deadline_s if request.deadline_s is not None else self.clock() + self.server.request_timeout_s
        )
        # A refusal the queue alone decides costs no tokenizing (about a character per token / 4).
        max_tokens = runner.backend.max_seq_tokens
        estimated_tokens = sum(min(max_tokens, len(text) // 4 + 2) for text in request.texts)
        runner.precheck(client_name, interactive, deadline_s, estimated_tokens)
        started_ns = time.perf_counter_ns()
        tokenized = await self._tokenize(runner.backend, request.texts)
        tokenize_ns = time.perf_counter_ns() - started_ns
        self.measured_tokenize_ns += tokenize_ns
        self.accounts.charge(client_name, ref, tokenize_ns)
        num_tokens = sum(len(t.ids) for t in tokenized)
        self.accounts.quotas.charge_tokens(ticket, self.accounts.client(client_name), num_tokens, self.clock())
        truncated = tuple(i for i, t in enumerate(tokenized) if t.truncated)
        if truncated and not request.truncate:
            raise InvalidRequest(
                f"input[{truncated[0]}] is longer than model {ref}'s maximum of {runner.backend.max_seq_tokens} tokens "
                "(this server rejects over-long texts instead of truncating them)",
                param=f"input[{truncated[0]}]",
                code="context_length_exceeded",
            )
        now_s = self.clock()
        vectors: list[np.ndarray | None] = [None] * len(tokenized)
        keys: list[bytes | None] = [None] * len(tokenized)
        if self.cache is not None:
            norm = self._normalization[ref]
            # Truncated texts are neither cached nor shared: their vector is not the text's own.
            keys = [
                None if t.truncated else self.cache.key(ref, norm, text)
                for t, text in zip(tokenized, request.texts, strict=True)
            ]
            lookup = [k for k in keys if k is not None]
            found = iter(await self.cache.lookup(ref, lookup)) if lookup else iter(())
            for i, key in enumerate(keys):
                if key is not None:
                    vectors[i] = next(found)[0]
        num_cached = sum(v is not None for v in vectors)
        runner.last_prediction = None
        waits = self._join_or_submit(
            ref, runner, tokenized, keys, vectors, now_s, deadline_s, client_name, weight, interactive
        )
        prediction = runner.last_prediction  # set by submit when admission predicted the wait
        gathered = asyncio.gather(*(asyncio.shield(e.future) for e, _ in waits.values()))
        # If this request gives up (cancelled, deadline, another entry failed), the gather ends with
        # the first error and nobody reads it: mark it read so asyncio does not log it.
        gathered.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            outcomes: list[EntryResult] = await asyncio.wait_for(
                gathered, timeout=max(0.0, deadline_s - now_s) + DEADLINE_GRACE_S
            )
        except TimeoutError:
            raise DeadlineExceeded() from None
        finally:
            for entry, _ in waits.values():  # the last request to give up on an entry drops it before compute
                entry.num_waiters -= 1
                if entry.num_waiters == 0 and not entry.future.done():
                    entry.future.cancel()
        results = dict(zip(waits, outcomes, strict=True))
        if prediction is not None and outcomes:
            runner.observe_wait(prediction, max(r.queue_ms for r in outcomes) / 1000.0)
        for i in range(len(tokenized)):
            if vectors[i] is None:
                vectors[i] = results[self._wait_key(i, keys)].vector
        computed = list(results.values())
        batches = {r.batch_id: r.inference_ms for r in computed}
        usage = Usage(
            num_tokens=num_tokens,
            queue_ms=max((r.queue_ms for r in computed), default=0.0),
            inference_ms=sum(batches.values()),
            num_batches=len(batches),
            compute_ns=tokenize_ns + sum(r.sharer_ns[waits[k][1]] for k, r in results.items()),
            num_cached=num_cached,
        )
        self.accounts.record_request(client_name, ref, len(tokenized), num_tokens, num_cached)
        return EmbedResult(ref, np.stack(vectors), usage, truncated)  # type: ignore[arg-type]

    @staticmethod
    def _wait_key(index: int, keys: list[bytes | None]) -> bytes | int:
        """Requests wait per distinct entry: a cache key, or the text's index when it has none."""
        key = keys[index]
        return key if key is not None else index

    def _join_or_submit(
        self,
        ref: ModelRef,
        runner: ModelRunner,
        tokenized: list[Tokenized],
        keys: list[bytes | None],
        vectors: list[np.ndarray | None],
        now_s: float,
        deadline_s: float,
        client_name: str,
        weight: float,
        interactive: bool,
    ) -> dict[bytes | int, tuple[Entry, int]]:
        """The entries this request waits for, each with this request's slot among its sharers.

        Texts already queued or computing for another request (same cache key) join that entry;
        the rest become new entries, submitted all at once (all or none). Nothing here awaits, so
        the joins and the submit are atomic with respect to other requests.
        """
        loop = asyncio.get_running_loop()
        inflight = self._inflight[ref]
        joins: dict[bytes | int, Entry] = {}
        new: dict[bytes | int, Entry] = {}
        for i, t in enumerate(tokenized):
            if vectors[i] is not None:
                continue
            wait_key = self._wait_key(i, keys)
            if wait_key in joins or wait_key in new:
                continue  # the same text twice in one request: one entry
            existing = inflight.get(wait_key) if isinstance(wait_key, bytes) else None
            if existing is not None and not existing.future.done():
                joins[wait_key] = existing
            else:
                entry = Entry(t.ids, now_s, deadline_s, loop.create_future(), client_name, weight, interactive)
                entry.key = wait_key if isinstance(wait_key, bytes) else None
                entry.sharers.append(client_name)
                new[wait_key] = entry
        if new:
            runner.submit(list(new.values()))  # raises Overloaded / RateLimited: nothing joined yet
        waits: dict[bytes | int, tuple[Entry, int]] = {}
        for wait_key, entry in joins.items():
            runner.queue.promote(entry, client_name, weight, interactive)  # no-op once it is computing
            entry.num_waiters += 1
            entry.deadline_s = max(entry.deadline_s, deadline_s)
            entry.sharers.append(client_name)
            waits[wait_key] = (entry, len(entry.sharers) - 1)
        if joins and self.cache is not None:
            self.cache.num_deduplicated += len(joins)
        for wait_key, entry in new.items():
            waits[wait_key] = (entry, 0)
            if entry.key is not None:
                inflight[entry.key] = entry
                entry.future.add_done_callback(functools.partial(self._entry_done, ref, entry))
        return waits

    def _entry_done(self, ref: ModelRef, entry: Entry, fut: asyncio.Future[EntryResult]) -> None:
        """Leave the in-flight table, and fill the cache with a computed vector."""
        assert entry.key is not None
        if self._inflight[ref].get(entry.key) is entry:
            del self._inflight[ref][entry.key]
        if self.cache is None or fut.cancelled() or fut.exception() is not None:
            return
        pending = self._pending_fills.setdefault(ref, [])
        pending.append((entry.key, fut.result().vector))
        if len(pending) == 1:  # one fill per batch delivered, not one per text
            asyncio.get_running_loop().call_soon(self._flush_fills, ref)

    def _flush_fills(self, ref: ModelRef) -> None:
        pending = self._pending_fills.pop(ref, [])
        if pending and self.cache is not None:
            keys, vecs = zip(*pending, strict=True)
            task = asyncio.ensure_future(self.cache.fill(ref, list(keys), list(vecs)))
            self._fill_tasks.add(task)
            task.add_done_callback(self._fill_tasks.discard)

    async def _tokenize(self, backend: Backend, texts: Sequence[str]) -> list[Tokenized]:
        if len(texts) <= INLINE_TOKENIZE_MAX_TEXTS and sum(map(len, texts)) <= INLINE_TOKENIZE_MAX_CHARS:
            self.num_inline_tokenized += 1
            return backend.tokenize(texts)
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, backend.tokenize, texts)


def _normalization(backend: Backend) -> str:
    """Part of the cache key: whether the version's vectors are L2-normalized."""
    model_dir = getattr(backend, "model_dir", None)
    return "l2" if model_dir is None or getattr(model_dir, "normalize", True) else "none"


def _version_key(ref: ModelRef) -> tuple[int, int | str]:
    """Numeric versions sort numerically and after non-numeric ones."""
    return (1, int(ref.version)) if ref.version.isdigit() else (0, ref.version)
