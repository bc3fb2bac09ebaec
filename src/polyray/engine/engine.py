"""The engine front: resolve the model, tokenize, admit, queue, await, assemble the result.

``Engine`` is the in-process ``EngineClient``: the HTTP layer and the CLI call ``embed`` and
``models`` and know nothing else about it.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from polyray.backends.base import Backend, Tokenized
from polyray.config import ServerConfig
from polyray.engine.batcher import BatchPolicy
from polyray.engine.observer import EngineObserver, NullObserver
from polyray.engine.queue import Entry, EntryResult
from polyray.engine.runner import FairnessPolicy, ModelRunner
from polyray.errors import DeadlineExceeded, InvalidRequest, NotFound, Overloaded
from polyray.tenancy.accounts import Accounts
from polyray.tenancy.model import PriorityClass
from polyray.tenancy.quotas import Ticket
from polyray.types import EmbedRequest, EmbedResult, ModelRef, Usage

WARMUP_TEXTS = ("warm up", "a somewhat longer sentence to warm up the model with more than a handful of tokens in it")
# Texts per request tokenized on the event loop; larger requests go to a thread so the loop stays responsive.
INLINE_TOKENIZE_MAX_TEXTS = 8
# How long past its deadline a caller waits for the runner's own verdict before giving up itself.
DEADLINE_GRACE_S = 1.0


@dataclass(frozen=True)
class ModelInfo:
    ref: ModelRef
    dim: int
    max_seq_tokens: int
    backend: str
    ready: bool


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
    ) -> None:
        if not backends:
            raise ValueError("the engine needs at least one model")
        self.server = server
        self.clock = clock
        self.accounts = accounts or Accounts()
        self.measured_tokenize_ns = 0
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
            )
            for ref, backend in backends.items()
        }
        self._started = False

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, warmup: bool = True) -> None:
        if self._started:
            return
        self._started = True
        for runner in self.runners.values():
            await runner.start(WARMUP_TEXTS if warmup else ())

    async def stop(self) -> None:
        await asyncio.gather(*(runner.stop() for runner in self.runners.values()))

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
            ModelInfo(ref, r.backend.dim, r.backend.max_seq_tokens, r.backend.description, r.ready)
            for ref, r in sorted(self.runners.items(), key=lambda item: (item[0].name, _version_key(item[0])))
        ]

    @property
    def measured_compute_ns(self) -> int:
        """Σ of all measured compute: every batch's forward pass plus every tokenization."""
        return self.measured_tokenize_ns + sum(r.measured_compute_ns for r in self.runners.values())

    def _charge_batch_share(self, ref: ModelRef, client: str, compute_ns: int) -> None:
        self.accounts.charge(client, ref, compute_ns)

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
        deadline_s = request.deadline_s if request.deadline_s is not None else now_s + self.server.request_timeout_s
        loop = asyncio.get_running_loop()
        entries = [
            Entry(t.ids, now_s, deadline_s, loop.create_future(), client_name, weight, interactive) for t in tokenized
        ]
        runner.submit(entries)
        futures = [e.future for e in entries]
        try:
            results: list[EntryResult] = await asyncio.wait_for(
                asyncio.gather(*futures), timeout=max(0.0, deadline_s - now_s) + DEADLINE_GRACE_S
            )
        except TimeoutError:
            raise DeadlineExceeded() from None
        finally:
            for fut in futures:  # caller cancelled or one entry failed: the rest must not compute
                if not fut.done():
                    fut.cancel()
        batches = {r.batch_id: r.inference_ms for r in results}
        usage = Usage(
            num_tokens=num_tokens,
            queue_ms=max(r.queue_ms for r in results),
            inference_ms=sum(batches.values()),
            num_batches=len(batches),
            compute_ns=tokenize_ns + sum(r.compute_ns for r in results),
        )
        self.accounts.record_request(client_name, ref, len(tokenized), num_tokens)
        return EmbedResult(ref, np.stack([r.vector for r in results]), usage, truncated)

    async def _tokenize(self, backend: Backend, texts: Sequence[str]) -> list[Tokenized]:
        if len(texts) <= INLINE_TOKENIZE_MAX_TEXTS:
            return backend.tokenize(texts)
        return await asyncio.to_thread(backend.tokenize, texts)


def _version_key(ref: ModelRef) -> tuple[int, int | str]:
    """Numeric versions sort numerically and after non-numeric ones."""
    return (1, int(ref.version)) if ref.version.isdigit() else (0, ref.version)
