"""Pure batch forming over a token budget.

A batch's cost is what the padded forward pass computes: ``longest sequence × number of
sequences`` tokens, plus a fixed ``overhead_tokens`` per forward call (framework dispatch and
thread wake-ups; measured ≈ 50-70 token-equivalents for MiniLM on this project's 2-core CPU).
A padding-free backend (``padding_free``) computes only real tokens; the budget still bounds the
padded size, but planning then counts the sum of lengths.
Padding is wasted compute (length-sorted batches waste ~10 % of positions, unsorted ones ~45 %),
so ``form_batch`` plans how to cut the waiting entries into batches, not only the next one:

1. it looks at a bounded window of the oldest entries, sorted by length;
2. it splits that sorted run into contiguous groups, each within the budget (``budget_tokens``
   padded tokens and ``max_batch_size`` entries), minimizing total cost
   ``Σ (overhead_tokens + longest × count)`` by dynamic programming (``policies.plan_groups``);
3. the next batch is the group that holds the oldest entry, so no entry waits behind later
   arrivals for ever (the oldest always goes next) and within the window nobody is skipped:
   a batch is a contiguous run by length.

The entry that would push a batch over its budget waits for the next batch; an entry that alone
exceeds the budget runs alone. The batch leaves when it is full (no neighbour by length can join
within the budget or size) or when its oldest entry has waited ``max_wait_ms``; otherwise the
decision says how long to wait. The function keeps no state and reads no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from polyray.policies import BatchPolicy, plan_groups


@dataclass(frozen=True)
class Candidate:
    """A waiting entry as the batcher sees it: its length and when it arrived."""

    num_tokens: int
    enqueued_s: float


@dataclass(frozen=True)
class BatchDecision:
    """``indices`` point into the candidate sequence, in increasing order.

    ``ready`` False means: do not run yet, look again at ``ready_at_s`` or on a new arrival.
    ``full`` says the batch cannot grow within its budget: waiting would not improve it.
    """

    indices: tuple[int, ...]
    ready: bool
    full: bool
    ready_at_s: float
    cost_tokens: int


def padded_cost(lengths: Sequence[int]) -> int:
    """Tokens a padded forward pass over these sequences computes."""
    return max(lengths) * len(lengths) if lengths else 0


def form_batch(
    candidates: Sequence[Candidate],
    policy: BatchPolicy,
    now_s: float,
    hold_until_s: float = float("-inf"),
    min_fill: int = 0,
) -> BatchDecision:
    """Choose the next batch from ``candidates`` (oldest first); see the module docstring.

    ``hold_until_s`` and ``min_fill`` let the caller wait a bounded moment for entries it expects:
    while fewer than ``min_fill`` entries wait, a batch that is not full is held until
    ``hold_until_s`` (the runner uses this for the callers of the batch that just finished, who
    typically send their next request within milliseconds; see ``ModelRunner``).
    """
    if not candidates:
        return BatchDecision((), ready=False, full=False, ready_at_s=float("inf"), cost_tokens=0)
    window = min(len(candidates), policy.window)
    # Sorting by (length, arrival) makes ties resolve towards older entries.
    by_length = sorted(range(window), key=lambda i: (candidates[i].num_tokens, i))
    lengths = [candidates[i].num_tokens for i in by_length]
    anchor_pos = by_length.index(0)
    lo, hi = next((s, e) for s, e in plan_groups(lengths, policy) if s <= anchor_pos < e)
    count = hi - lo
    longest = lengths[hi - 1]
    # Full: no neighbour by length can join within the budget (or the window hides more entries).
    if count >= policy.max_batch_size:
        full = True
    else:
        neighbours = ([lengths[lo - 1]] if lo > 0 else []) + ([lengths[hi]] if hi < window else [])
        if neighbours:
            full = min(max(longest, n) for n in neighbours) * (count + 1) > policy.budget_tokens
        else:
            full = len(candidates) > window
    indices = tuple(sorted(by_length[lo:hi]))
    ready_at_s = candidates[0].enqueued_s + policy.max_wait_ms / 1000.0
    if len(candidates) < min_fill:
        ready_at_s = max(ready_at_s, hold_until_s)
    ready = full or now_s >= ready_at_s
    return BatchDecision(indices, ready=ready, full=full, ready_at_s=ready_at_s, cost_tokens=longest * count)
