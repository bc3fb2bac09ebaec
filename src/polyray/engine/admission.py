"""Admission by expected waiting time: refuse at once what cannot be served in time.

A queue bounded only in texts lets a request wait far past any useful deadline (at 4x overload,
admitted requests waited 45 s behind one client's 4,096 queued texts while its 429s said
``Retry-After: 1``). So a new request is compared, before it is queued, with what it can accept:

    expected_wait_s = running_left_s + drain_s(work ahead of it in fair order)
    allowed_wait_s  = min(its deadline - now, the queueing bound of its client's class)

and refused when ``expected_wait_s > allowed_wait_s``. ``drain_s`` comes from ``ServiceCost``, a
line ``compute_s = overhead_s + s_per_token × tokens`` per forward pass fitted to recently served
batches (seeded with the start-up budget fit), so the estimate follows the machine as it is now.
Compute time is not all of a wait: under load the event loop's HTTP work takes the same cores,
batches form between passes, newcomers go ahead in fair order. ``WaitCalibration`` therefore
compares each admitted request's predicted wait with the wait it then had, and scales the
prediction by the measured ratio (measured 2-3x at 4x overload on 2 cores).
A client whose *own* backlog (in seconds of compute) would exceed its share of the bound, while it
already has work queued and another client's work is queued too, is refused with 429
``fair_share_queue`` instead: it is the one overloading the queue, and the others keep their room.
Alone in the queue a client has nobody to make room for, so only the bound applies to it (a
burst of 40 one-sentence requests from one SDK client on an idle server is then served, not
told it is over a share nobody else wants). Retry-After is computed from the same
estimate: how long until the work ahead has drained enough for the request to fit, plus the work
of the requests refused just before it (``RefusedDemand``): refused callers come back when told,
so telling 64 of them "1 s" at once brings all 64 back at once (measured: a flood's synchronized
retries stalled the event loop ~130 ms each second); spreading them by the work they carry
brings them back about as fast as the server can take them.

Everything here is a pure function of numbers (no clock, no queue, no I/O), so it is tested
exhaustively; the runner gathers the numbers and raises the refusal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from polyray.policies import AdmissionPolicy

# A refusal never asks the caller to come back sooner than this: a retry in less than a forward
# pass would find the same queue.
MIN_RETRY_AFTER_S = 0.05


@dataclass(frozen=True)
class ServiceCost:
    """``compute_s = overhead_s + s_per_token × tokens`` per forward pass, from recent batches.

    Exponentially weighted least squares over served batches (weight halves every
    ``halflife_batches``), seeded with the budget fit's line as ``prior_weight`` pseudo-batches, so
    it starts sane and follows drift (other tenants, a different length mix). ``tokens`` are real
    tokens: queued work is counted in them, and padding shows up in the slope. Immutable:
    ``observe`` returns the next state.
    """

    halflife_batches: float = 32.0
    sum_w: float = 0.0
    sum_x: float = 0.0
    sum_y: float = 0.0
    sum_xx: float = 0.0
    sum_xy: float = 0.0

    @classmethod
    def seeded(
        cls, overhead_s: float, s_per_token: float, budget_tokens: int, prior_weight: float = 4.0
    ) -> ServiceCost:
        """Start from a known line: pseudo-batches at one small and one full batch."""
        cost = cls()
        for x in (16.0, float(max(32, budget_tokens))):
            cost = cost._add(prior_weight / 2, x, overhead_s + s_per_token * x)
        return cost

    def _add(self, w: float, x: float, y: float) -> ServiceCost:
        return replace(
            self,
            sum_w=self.sum_w + w,
            sum_x=self.sum_x + w * x,
            sum_y=self.sum_y + w * y,
            sum_xx=self.sum_xx + w * x * x,
            sum_xy=self.sum_xy + w * x * y,
        )

    def observe(self, num_tokens: int, compute_s: float) -> ServiceCost:
        if num_tokens <= 0 or compute_s <= 0:
            return self
        keep = 0.5 ** (1.0 / self.halflife_batches)
        decayed = replace(
            self,
            sum_w=self.sum_w * keep,
            sum_x=self.sum_x * keep,
            sum_y=self.sum_y * keep,
            sum_xx=self.sum_xx * keep,
            sum_xy=self.sum_xy * keep,
        )
        return decayed._add(1.0, float(num_tokens), compute_s)

    @property
    def known(self) -> bool:
        return self.sum_w > 0 and self.sum_x > 0

    def line(self) -> tuple[float, float]:
        """(overhead_s, s_per_token); a negative intercept or slope (noise) falls back to a line
        through the origin, as ``budget_fit.fit_cost`` does."""
        if not self.known:
            return 0.0, 0.0
        mean_x = self.sum_x / self.sum_w
        mean_y = self.sum_y / self.sum_w
        var_x = self.sum_xx / self.sum_w - mean_x * mean_x
        if var_x > 1e-9 * max(1.0, mean_x * mean_x):
            slope = (self.sum_xy / self.sum_w - mean_x * mean_y) / var_x
            intercept = mean_y - slope * mean_x
            if slope > 0 and intercept >= 0:
                return intercept, slope
        return 0.0, (self.sum_xy / self.sum_xx if self.sum_xx > 0 else 0.0)

    def predict_s(self, num_tokens: float) -> float:
        overhead_s, s_per_token = self.line()
        return overhead_s + s_per_token * num_tokens

    def drain_s(self, work_tokens: float, budget_tokens: int) -> float:
        """Compute time to serve ``work_tokens`` of queued work in batches of ``budget_tokens``."""
        if work_tokens <= 0:
            return 0.0
        overhead_s, s_per_token = self.line()
        return s_per_token * work_tokens + overhead_s * math.ceil(work_tokens / max(1, budget_tokens))

    def tokens_within_s(self, budget_s: float, min_tokens: int = 1) -> int:
        """The most tokens one forward pass can hold and still end within ``budget_s``."""
        overhead_s, s_per_token = self.line()
        if s_per_token <= 0:
            return min_tokens
        return max(min_tokens, math.floor((budget_s - overhead_s) / s_per_token + 1e-9))  # 1e-9: float noise


@dataclass(frozen=True)
class Waiting:
    """What the runner knows when a request arrives, in tokens and seconds."""

    work_ahead_tokens: float  # queued work served before this request's last entry (fair order)
    client_backlog_tokens: float  # this client's own queued work (part of ``work_ahead_tokens``)
    request_tokens: float  # the work this request adds
    running_left_s: float  # expected rest of the forward pass in progress (0 when idle)
    deadline_left_s: float  # the request's deadline, from now
    interactive: bool


@dataclass(frozen=True)
class Verdict:
    """``admit``; otherwise ``kind`` ("overloaded" 503 or "rate_limited" 429), ``code``, and the
    Retry-After derived from the same estimate."""

    admit: bool
    expected_wait_s: float
    allowed_wait_s: float
    kind: str = ""
    code: str = ""
    retry_after_s: float = 0.0

    def message(self) -> str:
        if self.admit:
            return "admitted"
        wait_ms, allowed_ms, retry_ms = (
            1000 * self.expected_wait_s,
            1000 * self.allowed_wait_s,
            1000 * self.retry_after_s,
        )
        if self.code == "fair_share_queue":
            return (
                f"this client's queued work would take {wait_ms:.0f} ms of compute, over its share of the queue "
                f"({allowed_ms:.0f} ms); retry in about {retry_ms:.0f} ms"
            )
        what = "its deadline" if self.code == "deadline_unmeetable" else "the queueing bound of its class"
        return (
            f"the server is overloaded: expected wait {wait_ms:.0f} ms exceeds {what} ({allowed_ms:.0f} ms); "
            f"retry in about {retry_ms:.0f} ms"
        )


def admit(
    waiting: Waiting, cost: ServiceCost, budget_tokens: int, policy: AdmissionPolicy, factor: float = 1.0
) -> Verdict:
    """Admit or refuse one request (see the module docstring). Pure.

    Order: the client's own share first (429: it is the one filling the queue), then the expected
    wait against min(deadline, class bound) (503). Retry-After is when the work ahead will have
    drained enough for this request to fit, never less than ``MIN_RETRY_AFTER_S``. ``factor``
    (``WaitCalibration.factor``) scales the queue's compute time into waiting time.
    """
    if not cost.known:
        return Verdict(True, 0.0, max(0.0, min(waiting.deadline_left_s, policy.bound_s(waiting.interactive))))
    bound_s = policy.bound_s(waiting.interactive, factor * cost.drain_s(waiting.request_tokens, budget_tokens))
    allowed_s = max(0.0, min(waiting.deadline_left_s, bound_s))
    client_s = factor * cost.drain_s(waiting.client_backlog_tokens + waiting.request_tokens, budget_tokens)
    share_s = policy.max_client_queue_fraction * bound_s
    others_queued = waiting.work_ahead_tokens > waiting.client_backlog_tokens
    if waiting.client_backlog_tokens > 0 and others_queued and client_s > share_s:
        retry_s = client_s - share_s
        return Verdict(False, client_s, share_s, "rate_limited", "fair_share_queue", max(MIN_RETRY_AFTER_S, retry_s))
    # The pass in progress is measured compute already; the factor corrects the queue's drain.
    expected_s = waiting.running_left_s + factor * cost.drain_s(waiting.work_ahead_tokens, budget_tokens)
    if expected_s <= allowed_s:
        return Verdict(True, expected_s, allowed_s)
    code = "deadline_unmeetable" if waiting.deadline_left_s < bound_s else "queue_full"
    retry_s = expected_s - allowed_s
    return Verdict(False, expected_s, allowed_s, "overloaded", code, max(MIN_RETRY_AFTER_S, retry_s))


@dataclass(frozen=True)
class RefusedDemand:
    """Compute time the recently refused requests will bring back, draining at one second per second.

    A fluid queue of refused work: each refusal is told to come back after the work already
    promised to earlier refusals (``pending_s``), then adds its own work to it; with no refusals
    it drains to zero as the server computes. Immutable: ``refuse`` returns the next state.
    """

    pending_s: float = 0.0
    at_s: float = float("-inf")
    # Callers that retry before their Retry-After are refused again and would count twice: the
    # spread never exceeds this, so an impatient crowd cannot push well-behaved callers out for minutes.
    max_pending_s: float = 5.0

    def pending_at(self, now_s: float) -> float:
        return max(0.0, self.pending_s - max(0.0, now_s - self.at_s))

    def refuse(self, now_s: float, retry_after_s: float, request_s: float) -> tuple[RefusedDemand, float]:
        """(next state, the Retry-After to send): ``retry_after_s`` pushed back by the pending work."""
        pending_s = self.pending_at(now_s)
        grown = min(self.max_pending_s, pending_s + max(0.0, request_s))
        return replace(self, pending_s=grown, at_s=now_s), retry_after_s + pending_s


@dataclass(frozen=True)
class WaitCalibration:
    """Measured wait / predicted wait of admitted requests, exponentially weighted (ratio of sums).

    Only predictions of at least ``min_predicted_s`` count: below it the "wait" is the batcher's
    own timing, not queueing. The factor is clamped to ``[min_factor, max_factor]`` so one odd
    stretch cannot shut admission (or open it) entirely. Immutable: ``observe`` returns the next.
    """

    halflife: float = 64.0
    min_predicted_s: float = 0.005
    min_factor: float = 0.5
    max_factor: float = 4.0
    sum_predicted_s: float = 0.0
    sum_actual_s: float = 0.0

    def observe(self, predicted_s: float, actual_s: float) -> WaitCalibration:
        if predicted_s < self.min_predicted_s or actual_s < 0:
            return self
        keep = 0.5 ** (1.0 / self.halflife)
        return replace(
            self,
            sum_predicted_s=self.sum_predicted_s * keep + predicted_s,
            sum_actual_s=self.sum_actual_s * keep + actual_s,
        )

    @property
    def factor(self) -> float:
        if self.sum_predicted_s <= 0:
            return 1.0
        return min(self.max_factor, max(self.min_factor, self.sum_actual_s / self.sum_predicted_s))
