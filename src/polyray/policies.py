"""The policy types and pure planners that several parts share: a leaf that imports no other part.

Configuration (``polyray.config``) builds these from the file, the engine decides with them, and
the backends plan their own buckets and measure their speed with them. Kept here rather than in
the engine so that neither the config nor a backend has to import the engine to name a policy:
the layers then run one way (config and backends below the engine, this module below all of
them). Only frozen dataclasses that check their own bounds and pure functions of numbers live
here; the decisions that use them stay with their owners (``engine.batcher.form_batch``,
``engine.budget_fit.choose_budget``, ``engine.admission.admit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPolicy:
    """What one batch may hold and how long its oldest entry may wait (cost model: ``engine.batcher``)."""

    budget_tokens: int = 4096
    max_batch_size: int = 64
    window: int = 64
    max_wait_ms: float = 2.0
    overhead_tokens: int = 64
    # After a batch ends, wait at most this long (and at most 10 % of that batch's compute time)
    # for its callers to send their next request, so closed-loop clients keep forming one large
    # batch instead of drifting into small ones that fight the HTTP work for the cores.
    rejoin_wait_ms: float = 15.0
    # The backend computes no padding (packed execution): a batch's compute is then the sum of
    # its lengths, so planning merges groups; the budget still bounds longest × count.
    padding_free: bool = False

    def __post_init__(self) -> None:
        if self.budget_tokens < 1 or self.max_batch_size < 1 or self.window < 1:
            raise ValueError(f"invalid batch policy {self}: budget, size and window must be >= 1")
        if self.max_wait_ms < 0 or self.overhead_tokens < 0 or self.rejoin_wait_ms < 0:
            raise ValueError(f"invalid batch policy {self}: waits and overhead_tokens must be >= 0")


def plan_groups(lengths: Sequence[int], policy: BatchPolicy) -> list[tuple[int, int]]:
    """Cut ascending ``lengths`` into contiguous groups ``[start, end)`` of least total cost.

    Pure dynamic programming over ``Σ (overhead_tokens + longest × count)`` (or the sum of lengths
    when ``padding_free``), O(n × max_batch_size): the engine's batcher and the backends' length
    buckets both cut with it, so it lives below both.

    A group is allowed when its padded cost fits the budget and its size the maximum, or when it
    is a single entry (which always runs, alone, however long).
    """
    n = len(lengths)
    prefix = [0]
    for length in lengths:
        prefix.append(prefix[-1] + length)
    best = [0] + [-1] * n  # best[i]: least cost of the first i entries
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = lengths[end - 1]  # ascending: the group's last entry is its longest
        for start in range(end - 1, max(-1, end - 1 - policy.max_batch_size), -1):
            size = end - start
            if size > 1 and longest * size > policy.budget_tokens:
                break  # larger groups ending here cost even more
            compute = prefix[end] - prefix[start] if policy.padding_free else longest * size
            cost = best[start] + policy.overhead_tokens + compute
            if best[end] < 0 or cost < best[end]:
                best[end], cut[end] = cost, start
    groups = []
    end = n
    while end > 0:
        groups.append((cut[end], end))
        end = cut[end]
    return groups[::-1]


@dataclass(frozen=True)
class FairnessPolicy:
    """How the runner protects interactive clients from batch-class floods (see ``engine.runner``'s docstring)."""

    # The cap on a batch-class batch while interactive traffic is recent, as compute time: one
    # forward pass an interactive request may have to wait for. Converted to tokens with the
    # measured cost line; ``interactive_budget_tokens`` applies until one is known. Chosen with
    # bench/reliability/flood.py (see its docstring): torch MiniLM on 2 cores pays ~9 ms per call
    # before any token, so 15 ms leaves room for a few sentences per batch-class pass.
    interactive_budget_ms: float | None = 15.0
    interactive_budget_tokens: int = 256
    interactive_window_s: float = 10.0
    max_client_queue_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.interactive_budget_tokens < 1 or self.interactive_window_s < 0:
            raise ValueError(f"invalid fairness policy {self}")
        if self.interactive_budget_ms is not None and self.interactive_budget_ms <= 0:
            raise ValueError(f"interactive_budget_ms must be > 0 (or unset), got {self.interactive_budget_ms}")
        if not 0 < self.max_client_queue_fraction <= 1:
            raise ValueError(f"max_client_queue_fraction must be in (0, 1], got {self.max_client_queue_fraction}")


@dataclass(frozen=True)
class AdmissionPolicy:
    """Queueing bounds per client class: how long a request may be expected to wait before compute.

    An admitted request's latency is about its wait plus its own service, so "admitted p99 within
    2x of unloaded" holds when the bound is at most the unloaded latency. Measured with
    bench/reliability/overload.py on this project's 2-core CPU (torch MiniLM): an unloaded request
    of 16 sentences answers in ~140-270 ms p99, so both classes may wait 100 ms. Not less for
    interactive clients: the forward pass in progress counts, and one 256-token text alone takes
    ~40-60 ms here, so a smaller bound refused one-sentence requests that were next in line
    (bench/reliability/flood.py, 50 ms: 156 of 645 refused). 100 ms is far from the tens of
    seconds an unbounded queue let requests wait, and enough to keep the worker busy between a
    client's requests. A request's deadline can only lower its bound. A very large value turns
    time admission off for a class.

    ``own_work_allowance``: a request may also wait this many times its own compute. A fixed
    bound alone is right for the small requests of interactive traffic but wrong for bulk
    requests: of two teams each sending 512 texts (about 4 s of compute here), the second's texts
    interleave in fair order with the first's, so its expected wait is about the first's whole
    request, far over 100 ms, and it would be refused again and again although nobody is overloaded.
    With an allowance of 1 a request's admitted latency stays within about twice its unloaded
    latency (its own compute plus as much of the others') plus the class bound, whatever its
    size. It is 0 by default, measured: at 1, bench/reliability/overload.py (4x open loop, requests
    of 16 sentences, ~130 ms each) let admitted requests wait the bound plus their own compute
    and their p99 rose to 3.2x unloaded (target 2x; 1.05-1.99x at 0). A fleet whose clients send
    bulk requests side by side should set it to 1; its small requests then wait a little longer
    under overload. With the bound and the allowance both 0 a class is admitted only into an
    empty queue.
    """

    interactive_max_queue_ms: float = 100.0
    batch_max_queue_ms: float = 100.0
    # A client may fill at most this fraction of its class bound with its own queued work while it
    # already has work queued (a client with nothing queued may always send one request).
    max_client_queue_fraction: float = 0.5
    own_work_allowance: float = 0.0

    def __post_init__(self) -> None:
        if self.interactive_max_queue_ms < 0 or self.batch_max_queue_ms < 0:
            raise ValueError(f"queueing bounds must be >= 0 ms, got {self}")
        if self.own_work_allowance < 0:
            raise ValueError(f"own_work_allowance must be >= 0, got {self.own_work_allowance}")
        if not 0 < self.max_client_queue_fraction <= 1:
            raise ValueError(f"max_client_queue_fraction must be in (0, 1], got {self.max_client_queue_fraction}")

    def bound_s(self, interactive: bool, own_s: float = 0.0) -> float:
        """How long a request of this class whose own compute is ``own_s`` may be expected to wait."""
        class_s = (self.interactive_max_queue_ms if interactive else self.batch_max_queue_ms) / 1000.0
        return class_s + self.own_work_allowance * own_s


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
    """How ``engine.budget_fit`` chooses a batch budget from a measured curve, and when it re-decides."""

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
