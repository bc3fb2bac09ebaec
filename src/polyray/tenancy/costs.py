"""Split one batch's measured compute over the entries that shared it, exactly.

Rule: an entry's share is proportional to the tokens the forward pass computed for it, its
*padded* tokens: the batch's longest length on a padded backend (every row pays for the padding
the batch needed), its own length on a padding-free (packed) backend. Time is split in integer
nanoseconds by the largest-remainder method, so the shares of a batch add up to the measured
compute *exactly* (no floating-point drift over millions of batches) and the split is
deterministic (ties go to the earlier entry).

Deduplicated requests and cache hits (the cache plugs in here):
- an entry computed once for several identical requests (in-flight dedup) has its share split
  again, the same way, equally over the requests that received it;
- a cache hit caused no compute and is charged no compute-seconds (it is counted in usage as a
  cached text, so a client sees how much it saved).
"""

from __future__ import annotations

from collections.abc import Sequence


def split_exact(total_ns: int, weights: Sequence[int]) -> list[int]:
    """Shares of ``total_ns`` proportional to ``weights`` (non-negative ints), summing to ``total_ns``.

    All-zero weights split equally. Largest remainder: each share is floor(total × w / W), and
    the leftover nanoseconds go one each to the largest remainders (earlier entry first on ties).
    """
    if total_ns < 0:
        raise ValueError(f"total_ns must be >= 0, got {total_ns}")
    if not weights:
        if total_ns:
            raise ValueError("cannot split compute over no entries")
        return []
    if any(w < 0 for w in weights):
        raise ValueError("weights must be >= 0")
    if sum(weights) == 0:
        weights = [1] * len(weights)
    weight_sum = sum(weights)
    shares = [total_ns * w // weight_sum for w in weights]
    remainders = [total_ns * w % weight_sum for w in weights]
    leftover = total_ns - sum(shares)
    for i in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[:leftover]:
        shares[i] += 1
    return shares


def padded_tokens(lengths: Sequence[int], padding_free: bool) -> list[int]:
    """Tokens the forward pass computed per row: own length (packed) or the batch's longest (padded)."""
    if padding_free:
        return list(lengths)
    longest = max(lengths, default=0)
    return [longest] * len(lengths)


def split_batch_compute(compute_ns: int, lengths: Sequence[int], padding_free: bool) -> list[int]:
    """One batch's compute split over its rows by their padded-token share."""
    return split_exact(compute_ns, padded_tokens(lengths, padding_free))
