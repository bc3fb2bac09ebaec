"""Budget fitting, in one place: choose the batch token budget and maximum wait from measured points.

The measurement (``backends.calibrate.measure_budget_curve``) runs the real backend on batches
the planner would form at each candidate budget and reports, per budget, the throughput and how
long one batch takes; it lives with the backends because it only runs and times a backend. The
decision functions here are arithmetic on those points, so they are tested on synthetic curves
without clocks, threads or models (DESIGN.md: decisions as pure functions). ``BudgetFitter``, at
the end, is the stateful part the runner holds: measure (or reuse a kept curve) → decide, then
watch served batches for drift; ``build_budget_fitter`` makes one from a model's config.

The decision:

1. ``compute_s = overhead_s + s_per_token × cost_tokens`` per forward call. The fixed cost is
   measured directly when the caller has it (the time of a minimal call: a least-squares
   intercept overstates it, because small batches also run their arithmetic less efficiently),
   else it is the intercept of a least-squares fit over the batches; the slope is fitted over the
   batches. ``overhead_s / s_per_token`` is that cost in token-equivalents, which is what
   ``BatchPolicy.overhead_tokens`` means to the planner.
2. ``max_wait_ms`` = that fixed cost (capped): holding a lone request for up to the price of a
   separate forward call is the ski-rental rule - never worse than twice the better of "wait"
   and "go now", whatever arrives next (``should_wait`` says when not to wait at all).
3. A budget is *feasible* when a request's worst latency under saturation, ``max_wait + 2 × p90
   batch time`` (it just missed a batch, waits for it, then rides the next full one), is within
   the latency target.
4. Among feasible budgets, take the smallest whose throughput is within ``tolerance`` of the best
   feasible one: past the knee of the curve a bigger budget buys noise, not throughput, and costs
   latency. When none is feasible, take the one with the least worst latency and say so. (Served
   over HTTP, budgets 1,024 and 4,096 ran int8 at 1.83x and 1.76-1.85x sentence-transformers in
   ``polyray bench`` runs minutes apart: no sign that larger batches pay beyond the knee.)

Drift: ``observe_drift`` compares each served batch's compute time with the fitted line. When the
smoothed ratio leaves ``[1 / drift_ratio, drift_ratio]`` (other tenants on the host, thermal
limits, a different length mix) it returns the factor; ``rescale`` then scales the measured curve
by it and ``choose_budget`` decides again, without stopping the worker to re-measure.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from polyray.backends.base import Backend
from polyray.backends.calibrate import (
    DEFAULT_BUDGETS,
    MEASURE_SEED,
    FitCache,
    measure_budget_curve,
    measure_fixed_cost_s,
)
from polyray.backends.factory import fit_cache
from polyray.backends.probe_corpus import make_corpus
from polyray.config import ModelConfig
from polyray.errors import PolyrayError
from polyray.policies import BatchPolicy, CurvePoint, FitPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearCost:
    """``compute_s = overhead_s + s_per_token × cost_tokens`` for one forward call."""

    overhead_s: float
    s_per_token: float

    def predict_s(self, cost_tokens: float) -> float:
        return self.overhead_s + self.s_per_token * cost_tokens

    @property
    def overhead_tokens(self) -> int:
        if self.s_per_token <= 0:
            return 0
        return max(0, min(4096, round(self.overhead_s / self.s_per_token)))


@dataclass(frozen=True)
class BudgetDecision:
    budget_tokens: int
    max_wait_ms: float
    overhead_tokens: int
    expected_tokens_per_s: float
    expected_sequences_per_s: float
    expected_batch_ms: float  # p90 of one batch at the chosen budget
    worst_latency_ms: float  # max_wait + 2 × expected_batch_ms
    latency_target_ms: float
    meets_target: bool
    reason: str
    cost: LinearCost
    points: tuple[CurvePoint, ...]
    drift_factor: float = 1.0  # the measured curve was scaled by this (1.0: as measured)

    def apply(self, policy: BatchPolicy) -> BatchPolicy:
        """``policy`` with this decision's budget, wait and per-call overhead."""
        return replace(
            policy, budget_tokens=self.budget_tokens, max_wait_ms=self.max_wait_ms, overhead_tokens=self.overhead_tokens
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for ``/v1/models`` or an admin route: the decision and the curve behind it."""
        out = asdict(self)
        out["points"] = [
            {
                **asdict(p),
                "tokens_per_s": round(p.tokens_per_s, 1),
                "sequences_per_s": round(p.sequences_per_s, 1),
                "mean_batch_ms": round(p.mean_batch_ms, 3),
            }
            for p in self.points
        ]
        return out

    def table(self) -> str:
        """The curve and the choice as text lines, for the log."""
        lines = [f"{'budget':>7} {'batches':>7} {'tokens/s':>9} {'seq/s':>7} {'p90 ms':>8} {'worst ms':>9}"]
        for p in self.points:
            mark = " <" if p.budget_tokens == self.budget_tokens else ""
            worst = self.max_wait_ms + 2 * p.p90_batch_ms
            lines.append(
                f"{p.budget_tokens:>7} {p.num_batches:>7} {p.tokens_per_s:>9.0f} {p.sequences_per_s:>7.1f} "
                f"{p.p90_batch_ms:>8.2f} {worst:>9.1f}{mark}"
            )
        lines.append(
            f"chosen: budget {self.budget_tokens} tokens, max_wait {self.max_wait_ms:.2f} ms, overhead "
            f"{self.overhead_tokens} tokens ({self.reason})"
        )
        return "\n".join(lines)


def fit_cost(points: Sequence[CurvePoint], fixed_cost_s: float | None = None) -> LinearCost:
    """Least-squares line through (mean cost tokens, mean seconds) per batch, weighted by batch count.

    Weighting by batches makes it the fit over every measured batch: the small budgets (many
    short batches) pin the intercept, the large ones the slope. With ``fixed_cost_s`` (measured)
    the intercept is that and only the slope is fitted. A negative intercept (noise) is clamped to
    zero and the slope refitted through the origin.
    """
    rows = [
        (p.num_batches, p.cost_tokens / p.num_batches, p.compute_s / p.num_batches) for p in points if p.num_batches
    ]
    if not rows:
        raise ValueError("no measured batches to fit")
    if fixed_cost_s is not None:
        sum_xx = sum(w * x * x for w, x, _ in rows)
        slope = sum(w * x * (y - fixed_cost_s) for w, x, y in rows) / sum_xx if sum_xx else 0.0
        return LinearCost(overhead_s=max(0.0, fixed_cost_s), s_per_token=max(0.0, slope))
    total = sum(w for w, _, _ in rows)
    mean_x = sum(w * x for w, x, _ in rows) / total
    mean_y = sum(w * y for w, _, y in rows) / total
    var_x = sum(w * (x - mean_x) ** 2 for w, x, _ in rows)
    if var_x > 0:
        slope = sum(w * (x - mean_x) * (y - mean_y) for w, x, y in rows) / var_x
        intercept = mean_y - slope * mean_x
    else:
        slope, intercept = (mean_y / mean_x if mean_x else 0.0), 0.0
    if intercept < 0 or slope <= 0:
        sum_xx = sum(w * x * x for w, x, _ in rows)
        slope = sum(w * x * y for w, x, y in rows) / sum_xx if sum_xx else 0.0
        intercept = 0.0
    return LinearCost(overhead_s=max(0.0, intercept), s_per_token=max(0.0, slope))


def choose_budget(
    points: Sequence[CurvePoint], policy: FitPolicy, drift_factor: float = 1.0, fixed_cost_s: float | None = None
) -> BudgetDecision:
    """The budget and wait for ``points`` under ``policy`` (see the module docstring).

    ``fixed_cost_s``: the measured time of a minimal forward call, when known.
    """
    measured = sorted((p for p in points if p.num_batches > 0 and p.compute_s > 0), key=lambda p: p.budget_tokens)
    if not measured:
        raise ValueError("choose_budget needs at least one measured point")
    cost = fit_cost(measured, fixed_cost_s)
    max_wait_ms = round(min(policy.max_wait_cap_ms, 1000.0 * cost.overhead_s), 3)

    def worst_ms(p: CurvePoint) -> float:
        return max_wait_ms + 2.0 * p.p90_batch_ms

    feasible = [p for p in measured if worst_ms(p) <= policy.latency_target_ms]
    if feasible:
        best = max(p.tokens_per_s for p in feasible)
        chosen = next(p for p in feasible if p.tokens_per_s >= (1.0 - policy.tolerance) * best)
        reason = (
            f"smallest budget within {policy.tolerance:.0%} of the best throughput ({best:.0f} tokens/s) "
            f"whose worst latency {worst_ms(chosen):.1f} ms meets the {policy.latency_target_ms:g} ms target"
        )
    else:
        chosen = min(measured, key=lambda p: (worst_ms(p), p.budget_tokens))
        reason = (
            f"no budget meets the {policy.latency_target_ms:g} ms target; least worst latency {worst_ms(chosen):.1f} ms"
        )
    return BudgetDecision(
        budget_tokens=chosen.budget_tokens,
        max_wait_ms=max_wait_ms,
        overhead_tokens=cost.overhead_tokens,
        expected_tokens_per_s=chosen.tokens_per_s,
        expected_sequences_per_s=chosen.sequences_per_s,
        expected_batch_ms=chosen.p90_batch_ms,
        worst_latency_ms=worst_ms(chosen),
        latency_target_ms=policy.latency_target_ms,
        meets_target=bool(feasible),
        reason=reason,
        cost=cost,
        points=tuple(measured),
        drift_factor=drift_factor,
    )


def should_wait(num_waiting: int, arrivals_per_s: float, cost: LinearCost) -> bool:
    """Hold a batch that is not full for up to ``max_wait_ms``, or run it now?

    Waiting ``w`` costs each of the ``num_waiting`` entries ``w``; it saves one forward call's fixed
    cost (``cost.overhead_s``) for each of the ``arrivals_per_s × w`` entries expected to join.
    Both grow with ``w``, so the answer does not depend on it: wait iff ``arrivals_per_s ×
    overhead_s >= num_waiting``. A lone request at low load (one sequential client: a few hundred
    arrivals per second against a ~1 ms call cost) therefore runs at once instead of paying the
    wait, while a busy queue still fills its batches.
    """
    return arrivals_per_s * cost.overhead_s >= max(1, num_waiting)


def rescale(points: Sequence[CurvePoint], factor: float) -> list[CurvePoint]:
    """The curve as it would measure if every batch took ``factor`` times as long."""
    if factor <= 0:
        raise ValueError("factor must be > 0")
    return [replace(p, compute_s=p.compute_s * factor, p90_batch_ms=p.p90_batch_ms * factor) for p in points]


@dataclass(frozen=True)
class DriftState:
    """Smoothed log(observed / predicted) compute time since the decision made at ``decided_s``."""

    decided_s: float
    log_ratio: float = 0.0
    num_batches: int = 0


def observe_drift(
    state: DriftState, cost: LinearCost, cost_tokens: int, compute_s: float, now_s: float, policy: FitPolicy
) -> tuple[DriftState, float | None]:
    """Fold one served batch in; returns (state, drift factor when the decision should be redone)."""
    predicted_s = cost.predict_s(cost_tokens)
    if predicted_s <= 0 or compute_s <= 0:
        return state, None
    weight = 1.0 - 0.5 ** (1.0 / policy.drift_halflife_batches)
    sample = math.log(compute_s / predicted_s)
    # The first batch seeds the average, so one slow batch right after a decision counts once.
    log_ratio = sample if state.num_batches == 0 else (1 - weight) * state.log_ratio + weight * sample
    state = replace(state, log_ratio=log_ratio, num_batches=state.num_batches + 1)
    if (
        state.num_batches >= policy.drift_min_batches
        and now_s - state.decided_s >= policy.min_refit_interval_s
        and abs(state.log_ratio) > math.log(policy.drift_ratio)
    ):
        return state, math.exp(state.log_ratio)
    return state, None


@dataclass(frozen=True)
class ArrivalRate:
    """Exponentially decayed arrivals per second (time constant ``tau_s``); feeds ``should_wait``.

    Each arrival adds ``1 / tau_s`` and the sum decays by ``exp(-Δt / tau_s)``, so a steady stream
    of ``r`` arrivals per second reads ``r`` and a stream that stops fades within a few ``tau_s``.
    Immutable: ``observe`` returns the next state (the runner keeps the latest).
    """

    tau_s: float = 1.0
    rate_per_s: float = 0.0
    at_s: float = float("-inf")

    def rate_at(self, now_s: float) -> float:
        if self.at_s == float("-inf"):
            return 0.0
        return self.rate_per_s * math.exp(-max(0.0, now_s - self.at_s) / self.tau_s)

    def observe(self, now_s: float, count: int = 1) -> ArrivalRate:
        return replace(self, rate_per_s=self.rate_at(now_s) + count / self.tau_s, at_s=now_s)


class BudgetFitter:
    """Measure → decide at start and on demand; watch served batches for drift (one per runner).

    ``fit`` blocks for ``len(budgets) × time_per_budget_s`` seconds or more - each budget runs at least one
    whole queue window per round, 10-15 s for MiniLM on 2 cores - and must run where the backend's
    ``encode`` runs (the runner's worker thread). ``observe_batch`` is cheap and safe to call after
    every batch; it returns a new decision when the measured speed has drifted.
    """

    def __init__(
        self,
        policy: FitPolicy | None = None,
        budgets: Sequence[int] = DEFAULT_BUDGETS,
        time_per_budget_s: float = 0.4,
        corpus: Sequence[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
        cache: FitCache | None = None,
        reuse_cached: bool = True,
    ) -> None:
        self.policy = policy or FitPolicy()
        self.budgets = tuple(budgets)
        self.time_per_budget_s = time_per_budget_s
        self.corpus = list(corpus) if corpus is not None else make_corpus(256, seed=MEASURE_SEED)
        self.clock = clock
        self.name = name
        self.decision: BudgetDecision | None = None
        self._measured: list[CurvePoint] = []
        self._fixed_cost_s: float | None = None
        self._padding_free = False
        self._drift: DriftState | None = None
        self.cache = cache
        # False: the first fit measures even when the cache holds a curve (the model's
        # ``reuse_budget_fit``, or ``$POLYRAY_REFIT=1`` read by ``polyray.config``).
        self.reuse_cached = reuse_cached
        self.from_cache = False  # the decision in force was made from a cached curve
        self._num_fits = 0
        self._key: dict[str, Any] | None = None

    def fit(self, backend: Backend, base_policy: BatchPolicy | None = None) -> BudgetDecision:
        """Measure and decide. The first call (at start) reuses a cached curve for this machine and
        build when there is one and ``reuse_cached`` (``$POLYRAY_REFIT`` unset); later calls (a refit on demand)
        always measure, and every measurement replaces the cached one."""
        first = self._num_fits == 0
        self._num_fits += 1
        # Keyed by the start's (configured) policy: a refit runs on the fitted policy, and its
        # measurement must be found by the next start, which again begins from the configured one.
        if first and self.cache is not None:
            self._key = self._cache_key(backend, base_policy)
        key = self._key
        if self.cache is not None and key is not None and first and self.reuse_cached:
            cached = self.cache.load(key)
            if cached is not None:
                self._measured, self._fixed_cost_s, measured_at = cached
                self._padding_free = backend.padding_free
                self.from_cache = True
                decision = self._decide(1.0)
                log.info(
                    "batch budget for %s from the fit measured %s on this machine and build (%s); "
                    "POLYRAY_REFIT=1 or POST /v1/admin/models/{model}/fit measures again:\n%s",
                    self.name or backend.description,
                    measured_at,
                    self.cache.path(key),
                    decision.table(),
                )
                return decision
        corpus_ids = [t.ids for t in backend.tokenize(self.corpus)]
        started = time.perf_counter()
        self._measured = measure_budget_curve(backend, corpus_ids, self.budgets, base_policy, self.time_per_budget_s)
        shortest = min(corpus_ids, key=len)
        self._fixed_cost_s = measure_fixed_cost_s(backend, (shortest[0], shortest[-1]))
        self._padding_free = backend.padding_free
        self.from_cache = False
        decision = self._decide(1.0)
        kept = self.cache.store(key, self._measured, self._fixed_cost_s) if self.cache and key is not None else None
        log.info(
            "batch budget fit for %s in %.1f s (%s)%s:\n%s",
            self.name or backend.description,
            time.perf_counter() - started,
            backend.description,
            f"; kept in {kept} for the next start" if kept else "",
            decision.table(),
        )
        return decision

    def _cache_key(self, backend: Backend, base_policy: BatchPolicy | None) -> dict[str, Any] | None:
        """Everything besides the machine and build that shapes the measured curve (None: do not cache)."""
        assert self.cache is not None
        policy = base_policy or BatchPolicy()
        try:
            self.cache.key({})  # hashes the weights once
        except (OSError, PolyrayError) as exc:
            log.warning("batch budget fit for %s is not cached: cannot hash the weights (%s)", self.name, exc)
            return None
        return self.cache.key(
            {
                "backend_class": type(backend).__name__,
                "backend_precision": backend.precision,
                "padding_free": backend.padding_free,
                "budgets": list(self.budgets),
                "time_per_budget_s": self.time_per_budget_s,
                "corpus_sha256": hashlib.sha256("\0".join(self.corpus).encode()).hexdigest(),
                "window": policy.window,
                "max_batch_size": policy.max_batch_size,
                "overhead_tokens": policy.overhead_tokens,
            }
        )

    def observe_batch(self, lengths: Sequence[int], compute_s: float) -> BudgetDecision | None:
        """Fold one served batch in (token lengths of its entries, its measured compute seconds)."""
        if self.decision is None or self._drift is None or not lengths:
            return None
        cost_tokens = sum(lengths) if self._padding_free else max(lengths) * len(lengths)
        self._drift, factor = observe_drift(
            self._drift, self.decision.cost, cost_tokens, compute_s, self.clock(), self.policy
        )
        if factor is None:
            return None
        previous = self.decision
        decision = self._decide(previous.drift_factor * factor)
        log.warning(
            "batch compute for %s runs at %.2fx the fitted speed; re-decided (budget %d -> %d tokens, "
            "max_wait %.2f -> %.2f ms):\n%s",
            self.name,
            1 / factor,
            previous.budget_tokens,
            decision.budget_tokens,
            previous.max_wait_ms,
            decision.max_wait_ms,
            decision.table(),
        )
        return decision

    def _decide(self, drift_factor: float) -> BudgetDecision:
        points = rescale(self._measured, drift_factor) if drift_factor != 1.0 else self._measured
        fixed = self._fixed_cost_s * drift_factor if self._fixed_cost_s is not None else None
        self.decision = choose_budget(points, self.policy, drift_factor, fixed)
        self._drift = DriftState(decided_s=self.clock())
        return self.decision


def build_budget_fitter(config: ModelConfig) -> BudgetFitter | None:
    """The batch-budget fitter for one model version, or None when ``fit_batch_budget`` is off.

    The runner calls ``fit(backend, policy)`` on its worker thread before serving and applies
    ``decision.apply(policy)``; see ``BudgetFitter``. The dummy backend is not
    fitted: its speed is no hardware's, and tests start many servers on it.
    """
    if not config.fit_batch_budget or config.backend == "dummy":
        return None
    return BudgetFitter(
        FitPolicy(latency_target_ms=config.batch_latency_target_ms),
        name=f"{config.name}@{config.version}",
        cache=fit_cache(config),
        reuse_cached=config.reuse_budget_fit,
    )
