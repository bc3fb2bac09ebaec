"""Choose the batch token budget and maximum wait from measured points: a pure function.

The measurement (``backends.calibrate.measure_budget_curve``) runs the real backend on batches
the planner would form at each candidate budget and reports, per budget, the throughput and how
long one batch takes. Everything here is arithmetic on those points, so it is tested on
synthetic curves without clocks, threads or models (DESIGN.md: decisions as pure functions).

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

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from polyray.engine.batcher import BatchPolicy


@dataclass(frozen=True)
class CurvePoint:
    """What batches planned at one budget measured: totals over ``num_batches`` forward calls."""

    budget_tokens: int
    num_batches: int
    num_sequences: int
    num_tokens: int  # real tokens
    cost_tokens: int  # what the backend computes: real tokens (padding-free) or longest × count
    compute_s: float  # summed over the batches
    p90_batch_ms: float  # one batch's compute time, 90th percentile

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.compute_s if self.compute_s > 0 else 0.0

    @property
    def sequences_per_s(self) -> float:
        return self.num_sequences / self.compute_s if self.compute_s > 0 else 0.0

    @property
    def mean_batch_ms(self) -> float:
        return 1000.0 * self.compute_s / self.num_batches if self.num_batches else 0.0


@dataclass(frozen=True)
class FitPolicy:
    latency_target_ms: float = 500.0  # worst case under saturation; typical latency is about half
    tolerance: float = 0.03  # smallest budget within 3 % of the best feasible throughput
    max_wait_cap_ms: float = 10.0
    drift_ratio: float = 1.25  # re-decide when batches run 25 % slower (or faster) than the fit says
    drift_min_batches: int = 32  # batches observed since the last decision before drift counts
    drift_halflife_batches: float = 16.0
    min_refit_interval_s: float = 60.0

    def __post_init__(self) -> None:
        if self.latency_target_ms <= 0 or not 0 <= self.tolerance < 1 or self.max_wait_cap_ms < 0:
            raise ValueError(f"invalid fit policy {self}")
        if self.drift_ratio <= 1 or self.drift_min_batches < 1 or self.drift_halflife_batches <= 0:
            raise ValueError(f"invalid fit policy {self}: drift_ratio > 1, batches >= 1, half-life > 0")


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
