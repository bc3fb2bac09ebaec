"""Heads in a running server: training jobs, who may use which head, and applying them with their cost.

``HeadService`` sits beside the engine (engine layer: no FastAPI, no pydantic). The API calls it;
it calls the engine for embeddings, the store for persistence and ``Accounts`` for charges.

* **Training** is a background job per head, one at a time (the machine has few cores and the
  model serves meanwhile). A job embeds the head's stored examples through the engine as its
  owner - batched, fair-queued, cached and charged like any request - then fits in a thread and
  stores the parameters. Status and progress go to the store, so any replica (and the CLI's
  progress bar) sees them. Jobs left pending or training by a stopped server are resumed at start.
* **Quotas**: the queue is shared by every client, so a job never waits long on its owner's
  quota. An owner out of ``daily_compute_s`` (or refused by any of its own limits for longer
  than ``max_quota_wait_s`` in all) fails its own job at once, status ``failed`` with an error
  starting ``quota_exhausted (<limit>)``, and the queue goes on to the next job; retraining the
  failed head on its own version queues it again once the quota allows. A short refusal (its
  ``requests_per_s``, ``tokens_per_s``, ``max_concurrent`` or fair-share queue limit) is waited
  out within that bound. A full server (``Overloaded``) is waited out without a bound: it refuses
  every owner alike, so waiting takes nothing from the other jobs.
* **Names**: a caller names a head by ``name`` (its own), ``owner/name`` (shared with it) or
  its id. A name may exist for several model versions; the request's model picks one. Another
  client's private head is 403, a head bound to another version than asked for is 400
  (``head_version_mismatch``): a head is never applied to another version's embedding space.
* **Index**: head descriptions are held in memory and reloaded when the store's change counter
  moves (polled every ``refresh_interval_s``, and at once after this server's own writes), so
  resolving names costs no database round trip on the request path. Parameters are loaded once
  per head and stacked per distinct head set (``HeadStack``: one matrix product for all heads).
* **Cost**: applying heads is measured (wall time of the stacked product and its outputs) and
  charged to the caller on top of its embedding share; training's fit time is charged to the
  head's owner like its embedding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from threadpoolctl import threadpool_limits

from polyray.errors import Forbidden, InvalidRequest, NotFound, Overloaded, PolyrayError, RateLimited
from polyray.heads.apply import HeadOutput, HeadStack
from polyray.heads.artifact import dump_params, load_params, sha256
from polyray.heads.examples import Example, TrainOptions, parse_examples
from polyray.heads.kinds import HeadKind, HeadParams, HeadSpec, HeadStatus, check_head_name
from polyray.heads.store import HeadStore
from polyray.heads.train import train_head
from polyray.tenancy.accounts import Accounts
from polyray.types import EmbedRequest, EmbedResult, ModelRef

log = logging.getLogger(__name__)

TRAIN_CHUNK_TEXTS = 64  # texts per embedding request of a training job
EMBED_PROGRESS = 0.8  # embedding the examples is this share of a job's progress; fitting the rest
PROGRESS_INTERVAL_S = 0.5  # at most this often a job writes its progress
MAX_STACKS = 256  # distinct head sets kept stacked
# The longest a training job waits, in all, on its owner's short-term limits before it fails
# (``quota_exhausted``): meanwhile every other client's job waits behind it.
MAX_QUOTA_WAIT_S = 60.0
# Limits that do not recover within a job's wait: fail at once, whatever the wait bound.
_LONG_TERM_LIMITS = frozenset({"daily_compute_s"})


class Embedder(Protocol):
    """What heads need of the engine (``EngineClient`` has it)."""

    async def embed(self, request: EmbedRequest) -> EmbedResult: ...

    def resolve(self, model: str) -> ModelRef: ...


@dataclass(frozen=True)
class HeadInference:
    """One infer call on the server: the embedding, each row's head outputs and the time they took
    (named apart from the SDK's ``polyray.InferResult``, which is what the caller gets back)."""

    embedding: EmbedResult
    names: tuple[str, ...]  # the heads as the request named them, in its order (duplicates removed)
    outputs: list[list[HeadOutput]]  # per input row, per name
    heads_ns: int  # measured time applying the heads (charged to the caller)

    @property
    def compute_ns(self) -> int:
        return self.embedding.usage.compute_ns + self.heads_ns


def _label_json(example: Example) -> object:
    return list(example.label) if isinstance(example.label, tuple) else example.label


class HeadService:
    def __init__(
        self,
        store: HeadStore,
        engine: Embedder,
        accounts: Accounts,
        refresh_interval_s: float = 1.0,
        dims: Mapping[ModelRef, int] | None = None,
        max_quota_wait_s: float = MAX_QUOTA_WAIT_S,
    ) -> None:
        self.store = store
        self.engine = engine
        self.accounts = accounts
        self.refresh_interval_s = refresh_interval_s
        self.max_quota_wait_s = max_quota_wait_s
        self.dims = dict(dims or {})
        self.measured_heads_ns = 0  # Σ of every measured application and fit (the conservation check)
        self._index: dict[str, HeadSpec] = {}
        self._by_name: dict[tuple[str, str], list[HeadSpec]] = {}
        self._generation: int | None = None
        self._params: dict[str, tuple[object, HeadParams]] = {}  # id -> (updated_at, params)
        self._stacks: OrderedDict[tuple[str, ...], HeadStack] = OrderedDict()
        self._jobs: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        # Process-wide, so it happens when the server starts, not when the object is built: the
        # stacked product is a small GEMM that numpy's multi-threaded BLAS runs 4-100x slower on
        # busy cores than one thread does (heads.apply); the model has thread pools of its own.
        threadpool_limits(limits=1, user_api="blas")
        await self._reload()
        for spec in await asyncio.to_thread(self.store.pending):
            self._schedule(spec.head_id)
        self._tasks = [
            asyncio.create_task(self._train_loop(), name="heads-train"),
            asyncio.create_task(self._refresh_loop(), name="heads-refresh"),
        ]

    async def stop(self) -> None:
        """Stop the jobs; one cut off mid-way stays pending in the store and resumes at next start."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    # -- the index -------------------------------------------------------------------------
    async def _reload(self) -> None:
        generation = await asyncio.to_thread(self.store.generation)
        if generation == self._generation:
            return
        specs = await asyncio.to_thread(self.store.list_all)
        self._generation = generation
        self._index = {s.head_id: s for s in specs}
        by_name: dict[tuple[str, str], list[HeadSpec]] = {}
        for spec in sorted(specs, key=lambda s: (s.created_at is None, s.created_at)):
            by_name.setdefault((spec.owner, spec.name), []).append(spec)  # oldest first
        self._by_name = by_name
        live = {s.head_id: s.updated_at for s in specs}
        self._params = {k: v for k, v in self._params.items() if live.get(k) == v[0]}
        self._stacks.clear()

    async def _refresh_loop(self) -> None:
        """Poll the store; in a database outage, serve on the last index, log one line when it
        starts and one when it ends (not a traceback a second), and back off up to 30 s."""
        delay_s = self.refresh_interval_s
        num_failures = 0
        while True:
            await asyncio.sleep(delay_s)
            try:
                await self._reload()
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not end the loop; the next poll retries
                if num_failures == 0:
                    first = (str(exc).strip().splitlines() or [""])[0][:200]
                    log.warning(
                        "heads: reloading the index failed (%s: %s); serving on the last index, retrying with backoff",
                        type(exc).__name__,
                        first,
                    )
                num_failures += 1
                delay_s = min(30.0, max(delay_s * 2, self.refresh_interval_s))
                continue
            if num_failures:
                log.warning("heads: reloading the index works again (%d failed polls)", num_failures)
            num_failures = 0
            delay_s = self.refresh_interval_s

    def resolve(self, client: str, name: str, model: ModelRef | None = None) -> HeadSpec:
        """The head ``client`` means by ``name`` (see the module docstring), visible to it."""
        if not isinstance(name, str) or not name:
            raise InvalidRequest("a head is named by a non-empty string", param="heads", code="invalid_head")
        spec = self._index.get(name)  # an id (a name may look like one, but ids are 96 random bits)
        if spec is not None:
            self._check_visible(client, spec, name)
            if model is not None and spec.model != model:
                raise self._mismatch(name, [spec], model)
            return spec
        owner, slash, short = name.rpartition("/")
        owner = owner if slash else client
        versions = self._by_name.get((owner, short), [])
        if not versions:
            raise NotFound(f"no head {name!r}", param="heads", code="head_not_found")
        self._check_visible(client, versions[0], name)
        if model is None:
            return versions[-1]
        for spec in versions:
            if spec.model == model:
                return spec
        raise self._mismatch(name, versions, model)

    @staticmethod
    def _check_visible(client: str, spec: HeadSpec, name: str) -> None:
        if not spec.visible_to(client):
            raise Forbidden(
                f"head {name!r} belongs to client {spec.owner!r} and is not shared with you",
                param="heads",
                code="head_not_shared",
            )

    @staticmethod
    def _mismatch(name: str, versions: Sequence[HeadSpec], model: ModelRef) -> InvalidRequest:
        bound = ", ".join(str(s.model) for s in versions)
        return InvalidRequest(
            f"head {name!r} is bound to {bound}, not {model}: a head works only on the embedding of its own "
            f"model version (retrain it for {model}, or ask for its version)",
            param="heads",
            code="head_version_mismatch",
        )

    def visible(self, client: str, model: ModelRef | None = None) -> list[HeadSpec]:
        specs = [s for s in self._index.values() if s.visible_to(client) and (model is None or s.model == model)]
        return sorted(specs, key=lambda s: (s.owner, s.name, str(s.model)))

    def own(self, client: str, name: str, model: ModelRef | None = None) -> HeadSpec:
        """``resolve`` for changes: only the owner may retrain, share or delete a head."""
        spec = self.resolve(client, name, model)
        if spec.owner != client:
            raise Forbidden(
                f"head {name!r} belongs to client {spec.owner!r}; only its owner can change it",
                param="head",
                code="not_head_owner",
            )
        return spec

    # -- management ------------------------------------------------------------------------
    async def create(
        self,
        client: str,
        name: str,
        kind: str,
        model: str,
        records: Sequence[object],
        options: Mapping[str, object] | None = None,
    ) -> HeadSpec:
        """Check everything that can be checked now, store the head pending and queue its training."""
        check_head_name(name)
        try:
            head_kind = HeadKind(kind)
        except ValueError:
            kinds = ", ".join(k.value for k in HeadKind)
            raise InvalidRequest(
                f"unknown head kind {kind!r}; kinds: {kinds}", param="kind", code="invalid_head_kind"
            ) from None
        ref = self.engine.resolve(model)
        opts = TrainOptions.from_mapping(head_kind, options, dim_in=self.dims.get(ref))
        examples = parse_examples(head_kind, records, opts)
        rows = [(e.text, _label_json(e)) for e in examples]
        spec = await asyncio.to_thread(self.store.create, client, name, head_kind, ref, opts.as_dict(), rows)
        await self._reload()
        self._schedule(spec.head_id)
        return spec

    async def retrain(self, client: str, name: str, model: str, source_model: str | None = None) -> HeadSpec:
        """A new head of the same name bound to ``model``, trained from the stored examples; a
        failed head retrained on its own version is queued again in place (after a quota ran out)."""
        source = self.own(client, name, self.engine.resolve(source_model) if source_model else None)
        ref = self.engine.resolve(model)
        if source.model == ref and source.status is HeadStatus.FAILED:
            await asyncio.to_thread(self.store.set_progress, source.head_id, HeadStatus.PENDING, 0.0)
            await self._reload()
            self._schedule(source.head_id)
            return await asyncio.to_thread(self.store.get, source.head_id)
        rows = await asyncio.to_thread(self.store.examples, source.head_id)
        records = [{"text": text, "label": label} for text, label in rows]
        return await self.create(client, source.name, source.kind.value, str(ref), records, dict(source.options))

    async def share(self, client: str, name: str, clients: Sequence[str], share: bool = True) -> HeadSpec:
        spec = self.own(client, name)
        method = self.store.share if share else self.store.unshare
        updated = await asyncio.to_thread(method, spec.head_id, clients)
        await self._reload()
        return updated

    async def delete(self, client: str, name: str, model: str | None = None) -> HeadSpec:
        spec = self.own(client, name, self.engine.resolve(model) if model else None)
        await asyncio.to_thread(self.store.delete, spec.head_id)
        await self._reload()
        return spec

    async def get(self, client: str, name: str, model: str | None = None) -> HeadSpec:
        """The head as stored now (progress included), after the caller's visibility check."""
        spec = self.resolve(client, name, self.engine.resolve(model) if model else None)
        return await asyncio.to_thread(self.store.get, spec.head_id)

    # -- inference -------------------------------------------------------------------------
    async def infer(
        self, client: str, model: str, texts: Sequence[str], names: Sequence[str], truncate: bool = True
    ) -> HeadInference:
        """Embed ``texts`` once (cache, dedup, batching as any request) and apply every named head."""
        ref = self.engine.resolve(model)
        unique = tuple(dict.fromkeys(names))
        specs = [self.resolve(client, name, ref) for name in unique]  # refuse before spending compute
        if any(spec.status is not HeadStatus.READY for spec in specs):
            # Maybe finished a moment ago (here or on another replica): look once more before refusing.
            await self._reload()
            specs = [self.resolve(client, name, ref) for name in unique]
        for name, spec in zip(unique, specs, strict=True):
            if spec.status is not HeadStatus.READY:
                detail = f": {spec.error}" if spec.error else f" ({spec.progress:.0%} done)"
                raise InvalidRequest(
                    f"head {name!r} is {spec.status.value}{detail}", param="heads", code="head_not_ready"
                )
        stack = await self._stack(specs) if specs else None
        embedded = await self.engine.embed(EmbedRequest(str(ref), tuple(texts), client=client, truncate=truncate))
        if stack is None:
            return HeadInference(embedded, unique, [[] for _ in texts], 0)
        started_ns = time.perf_counter_ns()
        outputs = stack.apply(embedded.vectors)
        heads_ns = time.perf_counter_ns() - started_ns
        self.measured_heads_ns += heads_ns
        self.accounts.charge(client, ref, heads_ns)
        return HeadInference(embedded, unique, outputs, heads_ns)

    async def _stack(self, specs: Sequence[HeadSpec]) -> HeadStack:
        key = tuple(s.head_id for s in specs)
        stack = self._stacks.get(key)
        if stack is not None:
            self._stacks.move_to_end(key)
            return stack
        params = [await self._load(spec) for spec in specs]
        stack = HeadStack(list(zip(specs, params, strict=True)))
        self._stacks[key] = stack
        while len(self._stacks) > MAX_STACKS:
            self._stacks.popitem(last=False)
        return stack

    async def _load(self, spec: HeadSpec) -> HeadParams:
        cached = self._params.get(spec.head_id)
        if cached is not None and cached[0] == spec.updated_at:
            return cached[1]
        params = load_params(await asyncio.to_thread(self.store.load_artifact, spec.head_id))
        self._params[spec.head_id] = (spec.updated_at, params)
        return params

    # -- training --------------------------------------------------------------------------
    def _schedule(self, head_id: str) -> None:
        if head_id not in self._queued:
            self._queued.add(head_id)
            self._jobs.put_nowait(head_id)

    async def wait_idle(self) -> None:
        """Until every queued training job has finished (tests, benchmarks)."""
        await self._jobs.join()

    async def _train_loop(self) -> None:
        while True:
            head_id = await self._jobs.get()
            try:
                await self._train(head_id)
            except asyncio.CancelledError:
                raise
            except NotFound:
                log.info("head %s was deleted while it trained", head_id)
            except Exception as exc:  # a failed job fails its head, never the loop
                log.warning("training head %s failed", head_id, exc_info=not isinstance(exc, PolyrayError))
                message = exc.message if isinstance(exc, PolyrayError) else f"training failed: {exc}"
                with contextlib.suppress(NotFound):  # deleted meanwhile
                    await asyncio.to_thread(self.store.fail, head_id, message)
            finally:
                self._queued.discard(head_id)
                with contextlib.suppress(Exception):  # the refresh loop retries
                    await self._reload()
                self._jobs.task_done()

    async def _train(self, head_id: str) -> None:
        spec = await asyncio.to_thread(self.store.get, head_id)
        if spec.status not in (HeadStatus.PENDING, HeadStatus.TRAINING):
            return
        await asyncio.to_thread(self.store.set_progress, head_id, HeadStatus.TRAINING, 0.0)
        rows = await asyncio.to_thread(self.store.examples, head_id)
        options = TrainOptions.from_mapping(spec.kind, spec.options)
        examples = parse_examples(spec.kind, [{"text": t, "label": label} for t, label in rows], options)
        embeddings = await self._embed_examples(spec, [e.text for e in examples])
        last_write_s = [0.0]

        def on_progress(fraction: float) -> None:
            # On the fitting thread, synchronously: a write still in flight could land after ``finish``.
            now_s = time.monotonic()
            if now_s - last_write_s[0] >= PROGRESS_INTERVAL_S:
                last_write_s[0] = now_s
                progress = EMBED_PROGRESS + (1 - EMBED_PROGRESS) * fraction
                self.store.set_progress(head_id, HeadStatus.TRAINING, min(progress, 0.99))

        def fit() -> tuple[Any, int]:
            started_ns = time.perf_counter_ns()
            trained = train_head(spec.kind, embeddings, examples, options, on_progress)
            return trained, time.perf_counter_ns() - started_ns

        trained, fit_ns = await asyncio.to_thread(fit)
        self.measured_heads_ns += fit_ns
        self.accounts.charge(spec.owner, spec.model, fit_ns)
        artifact = dump_params(trained.params)
        await asyncio.to_thread(
            self.store.finish,
            head_id,
            artifact,
            sha256(artifact),
            trained.params.dim_in,
            trained.params.dim_out,
            trained.labels,
            {**trained.metrics, "num_train": trained.num_train, "num_validation": trained.num_validation},
        )
        log.info("head %s (%s, %s) trained: %s", spec.ref, spec.kind.value, spec.model, trained.metrics)

    async def _embed_examples(self, spec: HeadSpec, texts: list[str]) -> np.ndarray:
        """The examples' embeddings, requested as the owner in chunks. A full server is waited
        out; the owner's own limits only within ``max_quota_wait_s`` (module docstring)."""
        parts: list[np.ndarray] = []
        last_write_s = time.monotonic()
        quota_wait_s = 0.0  # waited so far on the owner's limits
        for start in range(0, len(texts), TRAIN_CHUNK_TEXTS):
            chunk = tuple(texts[start : start + TRAIN_CHUNK_TEXTS])
            while True:
                try:
                    result = await self.engine.embed(EmbedRequest(str(spec.model), chunk, client=spec.owner))
                    break
                except RateLimited as exc:  # the owner's own limit: fail its job rather than hold the queue
                    wait_s = exc.retry_after_s or 1.0
                    if exc.code in _LONG_TERM_LIMITS or quota_wait_s + wait_s > self.max_quota_wait_s:
                        raise _quota_exhausted(exc, quota_wait_s, start, len(texts)) from exc
                    quota_wait_s += wait_s
                    await asyncio.sleep(wait_s)
                except Overloaded as exc:  # the whole server is full: every job would wait the same
                    await asyncio.sleep(exc.retry_after_s or 1.0)
            parts.append(result.vectors)
            now_s = time.monotonic()
            if now_s - last_write_s >= PROGRESS_INTERVAL_S:
                last_write_s = now_s
                progress = EMBED_PROGRESS * (start + len(chunk)) / len(texts)
                await asyncio.to_thread(self.store.set_progress, spec.head_id, HeadStatus.TRAINING, progress)
        return np.concatenate(parts).astype(np.float32, copy=False)


def _quota_exhausted(exc: RateLimited, waited_s: float, num_done: int, num_texts: int) -> RateLimited:
    """The failure a job stores when its owner's quota stops it (``quota_exhausted (<limit>): ...``)."""
    if exc.code in _LONG_TERM_LIMITS:
        when = "after 00:00 UTC, when the daily budget resets"
    else:
        when = f"when the limit allows (it asked for a {exc.retry_after_s or 1.0:.1f} s wait after {waited_s:.1f} s waited)"
    return RateLimited(
        f"quota_exhausted ({exc.code}): {exc.message}; training stopped after embedding {num_done} of {num_texts} "
        f"examples so that other clients' jobs can run; retrain the head on the same model {when}",
        code="quota_exhausted",
        retry_after_s=exc.retry_after_s or 1.0,
    )
