"""One model version's loop: form a batch, run it on the worker thread, hand results back.

The loop is the queue's only consumer. Each turn it drops entries whose caller left or whose
deadline passed (before they cost compute), asks the pure ``form_batch`` for the next batch, and
runs it on a dedicated worker thread so the event loop never blocks on the model. While one batch
computes, a *full* next batch is formed and held, so the worker starts it the moment it is free; a
partial batch instead keeps absorbing arrivals until the worker frees up.

If a batch raises, its entries are retried one by one on the worker: only the entries that fail
alone get ``BackendError``, and the loop keeps serving.

Fair share: the queue is in weighted-fair order across clients (``queue``). A forward pass cannot
be preempted, so an interactive client's request that arrives during a batch waits for it; while
interactive traffic is recent (``interactive_window_s``), batches led by batch-class entries are
capped at what one forward pass computes in ``interactive_budget_ms`` (converted to tokens with the
measured cost line, ``admission.ServiceCost``; ``interactive_budget_tokens`` until a batch has
been measured) to bound that wait in milliseconds whatever the hardware, and while interactive
entries are within the batcher's window a batch holds interactive entries only (full budget), so
they run as fast as with no flood at all (``EntryQueue.candidates``).

Admission (``admission``): before a request's entries are queued, its expected wait (the work
ahead of it in fair order, drained at the measured cost line, plus the rest of the pass in
progress) is compared with min(its deadline, its class's queueing bound); over it, the request is
refused at once with a Retry-After from the same estimate.

Fitted budget: with a ``fitter`` (``engine.budget_fit.BudgetFitter``) the runner measures the
backend at start, before serving, and on demand (``refit``), and applies the decision (budget,
maximum wait, per-call overhead) to its policy; every served batch is fed to the fitter, which
re-decides when measured speed drifts from the fit. With a fitted cost line the maximum wait is
also skipped when waiting cannot pay (``budget_fit.should_wait``: too few arrivals expected
within one call's fixed cost), so a lone request at low load runs at once.

Cost: each batch's compute (worker wall time, integer ns) is settled as it is measured
(``engine.settlement``): split over its entries by padded tokens (``tenancy.costs``), each share
over the entry's sharers, and charged to their clients through ``charge`` whether or not the
caller is still there, so charged compute always equals measured compute.

The loop reads as its stages: drop the dead, ``_schedule`` (the next batch, or how long to
sleep), ``_when_worker_free``, ``_launch``; a finished batch comes back to ``_deliver``: hold the
next one briefly, ``_learn`` (cost line, fitter), settle, resolve, report.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from polyray.backends.base import Backend
from polyray.engine.admission import RefusedDemand, ServiceCost, WaitCalibration, Waiting, admit
from polyray.engine.batcher import form_batch
from polyray.engine.budget_fit import ArrivalRate, BudgetDecision, BudgetFitter, should_wait
from polyray.engine.observer import EngineObserver
from polyray.engine.queue import Entry, EntryQueue, split_dead
from polyray.engine.settlement import ChargeSink, FinishedBatch, RowOutcome
from polyray.engine.settlement import split as settlement_split
from polyray.errors import BackendError, DeadlineExceeded, Overloaded, RateLimited
from polyray.policies import AdmissionPolicy, BatchPolicy, FairnessPolicy
from polyray.types import ModelRef

log = logging.getLogger(__name__)

# Admission's prediction of a request's wait: (queue drain in compute seconds, before calibration;
# the rest of the pass in progress), in seconds.
Prediction = tuple[float, float]
# The interactive cap never goes below this: a pass of a few short texts, so a slow machine does not
# serve the batch class one text per forward call (a longer entry still runs alone).
MIN_INTERACTIVE_CAP_TOKENS = 16


def compute_rows(backend: Backend, batch: Sequence[Sequence[int]]) -> list[RowOutcome]:
    """Encode ``batch``; on failure retry each row alone so one bad row fails only itself."""
    try:
        vectors = backend.encode(batch)
        if vectors.shape != (len(batch), backend.dim):
            raise BackendError(f"backend returned shape {vectors.shape}, expected {(len(batch), backend.dim)}")
        return list(vectors)
    except Exception as exc:  # noqa: BLE001 - any backend failure is contained to its batch
        if len(batch) == 1:
            return [exc]
        log.warning("batch of %d failed (%s); retrying its entries alone", len(batch), exc)
        return [compute_rows(backend, [row])[0] for row in batch]


class ModelRunner:
    def __init__(
        self,
        ref: ModelRef,
        backend: Backend,
        policy: BatchPolicy,
        max_queue_items: int,
        observer: EngineObserver,
        clock: Callable[[], float] = time.monotonic,
        fairness: FairnessPolicy | None = None,
        charge: ChargeSink | None = None,
        on_compute: Callable[[int, int], None] | None = None,
        fitter: BudgetFitter | None = None,
        admission: AdmissionPolicy | None = None,
    ) -> None:
        self.ref = ref
        self.backend = backend
        self.policy = policy
        self.fairness = fairness or FairnessPolicy()
        self.charge = charge
        self.on_compute = on_compute  # (compute_ns, num_entries) per batch: the cache tuner's cost of a miss
        self.fitter = fitter
        self.configured_policy = policy  # before any fit: what the config said
        self._arrivals = ArrivalRate()
        self.queue = EntryQueue(max_queue_items, self.fairness.max_client_queue_fraction)
        self.admission = admission  # None: only the queue's count bounds apply
        self.cost = ServiceCost()  # the measured cost line (admission, the interactive cap)
        self._running_tokens = 0
        self._running_started_s = 0.0
        self._refused = RefusedDemand()  # spreads the Retry-After of refusals close together
        self.calibration = WaitCalibration()  # measured / predicted wait of admitted requests
        self._last_interactive_s = float("-inf")
        self.measured_compute_ns = 0  # Σ of every batch's measured compute (the conservation check)
        self.observer = observer
        self.clock = clock
        self.ready = False
        self._closing = False
        self._wake = asyncio.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"polyray-{ref.name}-{ref.version}")
        self._task: asyncio.Task[None] | None = None
        self._running: asyncio.Future[list[RowOutcome]] | None = None
        self._next_batch_id = 0
        # After a batch ends: hold a partial next batch until this time while fewer than
        # ``_min_fill`` entries wait (those queued then + the finished batch's callers).
        self._hold_until_s = float("-inf")
        self._min_fill = 0

    async def start(self, warmup_texts: Sequence[str] = ()) -> None:
        """Warm the model up (first calls allocate and pick kernels), then start the loop."""
        loop = asyncio.get_running_loop()
        for text in warmup_texts:
            ids = [t.ids for t in self.backend.tokenize([text])]
            await loop.run_in_executor(self._worker, compute_rows, self.backend, ids * 4)
        if self.fitter is not None:
            await self.refit()
        self._task = asyncio.create_task(self._loop(), name=f"runner-{self.ref}")
        self.ready = True

    async def refit(self) -> BudgetDecision:
        """Measure the budget curve on the worker thread and apply the decision (10-15 s for MiniLM here).

        While serving, batches formed meanwhile wait for the worker like any other batch; the
        measurement uses the fitter's own corpus, not queued requests.
        """
        if self.fitter is None:
            raise ValueError(f"model {self.ref} has no budget fitter (fit_batch_budget = false)")
        loop = asyncio.get_running_loop()
        decision = await loop.run_in_executor(self._worker, self.fitter.fit, self.backend, self.policy)
        self._apply(decision)
        return decision

    def _apply(self, decision: BudgetDecision) -> None:
        self.policy = decision.apply(self.policy)
        if not self.cost.known:  # before any served batch, the fit's line is the best estimate
            self.cost = ServiceCost.seeded(decision.cost.overhead_s, decision.cost.s_per_token, decision.budget_tokens)
        log.info(
            "%s serves with budget %d tokens, max_wait %.2f ms, overhead %d tokens",
            self.ref,
            self.policy.budget_tokens,
            self.policy.max_wait_ms,
            self.policy.overhead_tokens,
        )

    def batching_report(self) -> dict[str, Any]:
        """The policy in force and, when fitted, the decision with the measured curve behind it."""
        decision = self.fitter.decision if self.fitter is not None else None
        return {
            "budget_tokens": self.policy.budget_tokens,
            "max_wait_ms": self.policy.max_wait_ms,
            "overhead_tokens": self.policy.overhead_tokens,
            "max_batch_size": self.policy.max_batch_size,
            "fitted": decision is not None,
            "arrivals_per_s": round(self._arrivals.rate_at(self.clock()), 1),
            "measured_cost": {
                "overhead_ms": round(1000 * self.cost.line()[0], 3),
                "ms_per_token": round(1000 * self.cost.line()[1], 5),
            }
            if self.cost.known
            else None,
            "interactive_cap_tokens": self.interactive_cap_tokens(),
            "decision": decision.as_dict() if decision is not None else None,
        }

    def submit(self, entries: list[Entry]) -> Prediction | None:
        """Queue a request's new entries (all of one client, class and deadline), or refuse them
        (``Overloaded`` 503, ``RateLimited`` 429) before anything is queued.

        Returns admission's prediction of the request's wait (None without admission); the
        engine reports the wait it then had (``observe_wait``)."""
        if self._closing:
            raise Overloaded("the server is shutting down", code="shutting_down", retry_after_s=5.0)
        now_s = self.clock()
        if entries and entries[0].interactive:
            self._last_interactive_s = now_s  # refused or not, interactive traffic is present
        if entries and self.admission is not None:
            num_tokens = sum(e.num_tokens for e in entries)
            deadline_s = min(e.deadline_s for e in entries)
            first = entries[0]
            prediction: Prediction | None = self._admit(
                first.client, first.weight, first.interactive, deadline_s, num_tokens, num_tokens, now_s
            )
        else:
            prediction = None
        drain = functools.partial(self.cost.drain_s, budget_tokens=self.policy.budget_tokens)
        self.queue.push(entries, drain if self.cost.known else None)
        self._arrivals = self._arrivals.observe(now_s, len(entries))
        self.observer.on_queue_depth(self.ref, len(self.queue))
        self._wake.set()
        return prediction

    def precheck(self, client: str, interactive: bool, deadline_s: float, estimated_tokens: int) -> None:
        """Refuse before tokenizing when the queue alone already rules a request out: under overload
        most requests are refused, so a refusal must be cheap. The full check runs at ``submit``;
        ``estimated_tokens`` only sizes the refused demand (``RefusedDemand``), never the verdict."""
        if self.admission is not None and not self._closing:
            self._admit(client, 1.0, interactive, deadline_s, 0, estimated_tokens, self.clock())

    def observe_wait(self, prediction: Prediction, waited_s: float) -> None:
        """A request admitted with ``prediction`` (from ``submit``) waited ``waited_s`` for its
        last entry to start computing (its ``queue_ms``): calibrate the queue-drain part only, so
        a misjudged pass in progress cannot inflate the factor for everyone."""
        drain_s, running_left_s = prediction
        self.calibration = self.calibration.observe(drain_s, max(0.0, waited_s - running_left_s))

    def _admit(
        self,
        client: str,
        weight: float,
        interactive: bool,
        deadline_s: float,
        request_tokens: int,
        refused_tokens: int,
        now_s: float,
    ) -> Prediction:
        """Raise the refusal, or return the prediction: (queue drain in compute seconds, before
        calibration; the rest of the pass in progress)."""
        assert self.admission is not None
        running_left_s = 0.0
        if self._running is not None and not self._running.done():
            predicted_s = self.cost.predict_s(self._running_tokens)
            running_left_s = max(0.0, predicted_s - (now_s - self._running_started_s))
        waiting = Waiting(
            work_ahead_tokens=self.queue.work_ahead(client, request_tokens, weight),
            client_backlog_tokens=self.queue.tokens_waiting(client),
            request_tokens=request_tokens,
            running_left_s=running_left_s,
            deadline_left_s=deadline_s - now_s,
            interactive=interactive,
        )
        factor = self.calibration.factor
        verdict = admit(waiting, self.cost, self.policy.budget_tokens, self.admission, factor)
        if verdict.admit:
            return self.cost.drain_s(waiting.work_ahead_tokens, self.policy.budget_tokens), running_left_s
        request_s = factor * self.cost.drain_s(refused_tokens, self.policy.budget_tokens)
        self._refused, retry_after_s = self._refused.refuse(now_s, verdict.retry_after_s, request_s)
        verdict = replace(verdict, retry_after_s=retry_after_s)
        if verdict.kind == "rate_limited":
            raise RateLimited(verdict.message(), code=verdict.code, retry_after_s=retry_after_s)
        raise Overloaded(verdict.message(), code=verdict.code, retry_after_s=retry_after_s)

    async def stop(self) -> None:
        """Stop accepting, finish what was accepted, then release the worker."""
        self._closing = True
        self.ready = False
        self._wake.set()
        if self._task is not None:
            await self._task
        self._worker.shutdown(wait=True)

    def _drop_dead(self) -> None:
        cancelled, expired = self.queue.remove_dead(self.clock())
        self._report_dead(cancelled, expired)
        if cancelled or expired:  # the depth gauge must not keep the pre-drop value
            self.observer.on_queue_depth(self.ref, len(self.queue))

    def _report_dead(self, cancelled: list[Entry], expired: list[Entry]) -> None:
        for entry in expired:
            entry.future.set_exception(DeadlineExceeded())
        if cancelled:
            self.observer.on_dropped(self.ref, "cancelled", len(cancelled))
        if expired:
            self.observer.on_dropped(self.ref, "deadline", len(expired))

    async def _loop(self) -> None:
        """Each turn: drop the dead, pick the next batch (or sleep until one is due), wait for the
        worker to be free, start the batch on it. Closing: finish what was accepted, then stop."""
        while True:
            self._drop_dead()
            if self._running is not None and self._running.done():
                self._running = None
            if self._closing and not len(self.queue):
                break
            batch, wait_s = self._schedule(self.clock())
            if batch is None:
                await self._wait(wait_s)
                continue
            batch = await self._when_worker_free(batch)
            if batch:
                self._launch(batch)
        if self._running is not None:
            await asyncio.wait([self._running])

    def _schedule(self, now_s: float) -> tuple[list[Entry] | None, float | None]:
        """The batch to take off the queue now, or (None, how long to sleep: None until woken).

        While the worker is busy, only a full batch is held; a partial one keeps growing. A capped
        batch-class batch is not held: an interactive request arriving meanwhile goes first."""
        policy = self._policy_now(now_s)
        candidates, positions = self.queue.candidates(policy.window + 1)
        decision = form_batch(candidates, policy, now_s, self._hold_until_s, self._min_fill)
        busy = self._running is not None
        capped = policy.budget_tokens < self.policy.budget_tokens
        take = (
            (decision.full and not capped) if busy else (decision.ready or (self._closing and bool(decision.indices)))
        )
        if not take:
            return None, (None if busy or not decision.indices else max(0.0, decision.ready_at_s - now_s))
        batch = self.queue.take(tuple(positions[i] for i in decision.indices))
        self.observer.on_queue_depth(self.ref, len(self.queue))
        return batch, None

    async def _when_worker_free(self, batch: list[Entry]) -> list[Entry]:
        """Wait for the batch in progress, if any; then only the entries of ``batch`` still wanted."""
        if self._running is None:
            return batch
        await asyncio.wait([self._running])
        self._running = None
        return self._live(batch)

    def _launch(self, batch: list[Entry]) -> None:
        """Start ``batch`` on the worker; ``_deliver`` settles it when it finishes."""
        started_s = self.clock()
        self._running_started_s = started_s
        self._running_tokens = sum(e.num_tokens for e in batch)
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(self._worker, self._timed_compute, [e.ids for e in batch])
        running.add_done_callback(functools.partial(self._deliver, batch, started_s, batch_id))
        self._running = running  # type: ignore[assignment]

    def _policy_now(self, now_s: float) -> BatchPolicy:
        """The batch policy now: a batch-class batch is capped while interactive traffic is recent,
        and the maximum wait is dropped when the fitted cost says waiting cannot pay."""
        policy = self.policy
        cap = self.interactive_cap_tokens()
        if (
            cap < policy.budget_tokens
            and now_s - self._last_interactive_s <= self.fairness.interactive_window_s
            and self.queue.head_is_batch_class()
        ):
            policy = replace(policy, budget_tokens=cap)
        decision = self.fitter.decision if self.fitter is not None else None
        if (
            decision is not None
            and policy.max_wait_ms > 0
            and not should_wait(len(self.queue), self._arrivals.rate_at(now_s), decision.cost)
        ):
            policy = replace(policy, max_wait_ms=0.0)
        return policy

    def interactive_cap_tokens(self) -> int:
        """The batch-class cap in tokens: ``interactive_budget_ms`` of compute at the measured cost."""
        budget_ms = self.fairness.interactive_budget_ms
        if budget_ms is None or not self.cost.known:
            return self.fairness.interactive_budget_tokens
        return self.cost.tokens_within_s(budget_ms / 1000.0, MIN_INTERACTIVE_CAP_TOKENS)

    async def _wait(self, timeout_s: float | None) -> None:
        """Sleep until an arrival, the running batch finishing, or ``timeout_s``."""
        self._wake.clear()
        waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(self._wake.wait())]
        if self._running is not None:
            waiters.append(self._running)  # type: ignore[arg-type]
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiters[0].cancel()

    def _live(self, batch: list[Entry]) -> list[Entry]:
        """Entries of a held batch that are still wanted once the worker is free."""
        live, cancelled, expired = split_dead(batch, self.clock())
        self._report_dead(cancelled, expired)
        return live

    def _timed_compute(self, batch: list[tuple[int, ...]]) -> tuple[list[RowOutcome], int]:
        started_ns = time.perf_counter_ns()
        rows = compute_rows(self.backend, batch)
        return rows, time.perf_counter_ns() - started_ns

    def _deliver(self, batch: list[Entry], started_s: float, batch_id: int, fut: asyncio.Future) -> None:  # type: ignore[type-arg]
        """A batch finished on the worker: hold the next one briefly, learn from the measurement,
        settle its compute (charge every sharer), resolve its entries, report it."""
        self._wake.set()
        if fut.cancelled():  # only at interpreter shutdown
            return
        finished = _finished(batch, started_s, batch_id, fut)
        if not finished.failed:
            self._hold_next(finished)
        self._learn(finished)
        settlement = settlement_split(finished, self.backend.padding_free)
        settlement.charge(self.charge)
        if self.on_compute is not None and finished.compute_ns:
            self.on_compute(finished.compute_ns, len(batch))
        num_abandoned = settlement.resolve()
        self._report_batch(finished, num_abandoned)

    def _hold_next(self, finished: FinishedBatch) -> None:
        """After a batch, hold a partial next one briefly so the finished batch's callers can rejoin."""
        compute_s = finished.compute_ns / 1e9
        hold_s = min(self.policy.rejoin_wait_ms / 1000.0, 0.1 * compute_s)
        self._hold_until_s = self.clock() + hold_s
        self._min_fill = len(self.queue) + len(finished.entries)

    def _learn(self, finished: FinishedBatch) -> None:
        """Count the compute (conservation) and feed a real measurement to the cost line and fitter."""
        self.measured_compute_ns += finished.compute_ns
        if not finished.measured:
            return
        compute_s = finished.compute_ns / 1e9
        self.cost = self.cost.observe(sum(finished.lengths), compute_s)
        if self.fitter is not None:
            redecided = self.fitter.observe_batch(finished.lengths, compute_s)
            if redecided is not None:
                self._apply(redecided)

    def _report_batch(self, finished: FinishedBatch, num_abandoned: int) -> None:
        if num_abandoned:
            self.observer.on_dropped(self.ref, "abandoned_after_compute", num_abandoned)
        lengths = finished.lengths
        self.observer.on_batch(
            self.ref,
            len(lengths),
            max(lengths) * len(lengths),
            sum(lengths),
            finished.queue_ms,
            finished.inference_ms,
        )


def _finished(batch: list[Entry], started_s: float, batch_id: int, fut: asyncio.Future) -> FinishedBatch:  # type: ignore[type-arg]
    """The worker's outcome as a ``FinishedBatch``. ``compute_rows`` contains backend errors, so a
    raised future is a bug: fail loudly per entry, with no compute to charge."""
    exc = fut.exception()
    if exc is not None:
        return FinishedBatch(batch, [exc] * len(batch), 0, started_s, batch_id, failed=True)
    rows, compute_ns = fut.result()
    return FinishedBatch(batch, rows, compute_ns, started_s, batch_id)
