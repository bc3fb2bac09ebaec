"""SHARDS: a bounded-memory sample of the key stream and what it says about caching.

Spatial hash sampling (Waldspurger et al., "Efficient MRC Construction with SHARDS", FAST'15):
a key is sampled iff ``hash(key) < T``, so every reference to a sampled key is seen and reuse
distances computed on the sample, scaled by ``1 / R`` (``R = T / 2^64``), estimate the full
stream's. The fixed-size variant bounds memory: at most ``max_keys`` sampled keys; when one
more arrives the key with the largest hash leaves, ``T`` drops to that hash, and the counts
gathered at the old rate are rescaled by ``R_new / R_old``.

What it keeps (all bounded, nothing reads a clock; times are passed in):

- a joint histogram of (scaled LRU reuse distance, re-reference interval) per re-reference,
  log-bucketed: LRU with a sliding TTL hits a reference iff distance < capacity and interval
  <= TTL, so this one table gives the miss-ratio curve for every (capacity, TTL);
- the count of first references (cold misses), which also stands for "never referenced again"
  when the tuner estimates how long entries stay under a TTL;
- the last ``max_refs`` sampled references, replayed by the tuner through scaled-down
  simulations of the admission policies (Waldspurger et al., ATC'17, "miniature simulations").

Reuse distances use a Fenwick tree over access positions (O(log n) per reference), compacted
when positions run out so its size stays ``4 * max_keys``.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from polyray.cache.local import hash64

HASH_SPACE = float(1 << 64)
BUCKETS_PER_OCTAVE = 4
NUM_DIST_BUCKETS = 1 + 40 * BUCKETS_PER_OCTAVE  # reuse distances up to 2^40 entries
INTERVAL_BASE_S = 1e-3
NUM_INTERVAL_BUCKETS = 1 + 36 * BUCKETS_PER_OCTAVE  # 1 ms .. 2^36 ms (about two years)


def dist_bucket(distance: float) -> int:
    """Bucket 0 holds distances below 1; bucket b >= 1 holds [2^((b-1)/4), 2^(b/4))."""
    if distance < 1.0:
        return 0
    return min(NUM_DIST_BUCKETS - 1, 1 + int(math.log2(distance) * BUCKETS_PER_OCTAVE))


def dist_bucket_upper(b: int) -> float:
    return float(2.0 ** (b / BUCKETS_PER_OCTAVE))


def interval_bucket(interval_s: float) -> int:
    if interval_s < INTERVAL_BASE_S:
        return 0
    return min(NUM_INTERVAL_BUCKETS - 1, 1 + int(math.log2(interval_s / INTERVAL_BASE_S) * BUCKETS_PER_OCTAVE))


def interval_bucket_upper_s(b: int) -> float:
    return float(INTERVAL_BASE_S * 2.0 ** (b / BUCKETS_PER_OCTAVE))


def interval_bucket_mid_s(b: int) -> float:
    """Geometric middle of a bucket (half the base for bucket 0)."""
    return INTERVAL_BASE_S * (0.5 if b == 0 else 2.0 ** ((b - 0.5) / BUCKETS_PER_OCTAVE))


class _Fenwick:
    __slots__ = ("n", "tree")

    def __init__(self, n: int) -> None:
        self.n = n
        self.tree = [0] * (n + 1)

    def add(self, i: int, delta: int) -> None:
        i += 1
        tree, n = self.tree, self.n
        while i <= n:
            tree[i] += delta
            i += i & -i

    def prefix(self, i: int) -> int:
        """Sum over positions [0, i)."""
        total, tree = 0, self.tree
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total

    def fill_ones(self, count: int) -> None:
        """Positions [0, count) marked, the rest clear: O(n) rebuild."""
        tree = [0] * (self.n + 1)
        for i in range(1, self.n + 1):
            tree[i] = max(0, min(i, count) - (i - (i & -i)))
        self.tree = tree


def stack_distances(hashes: list[int]) -> list[int]:
    """Exact LRU reuse distance of every reference (-1 for a first reference).

    The distance is the number of distinct other keys referenced since the key's previous
    reference: LRU with capacity C entries hits iff it is < C.
    """
    n = len(hashes)
    fen = _Fenwick(max(1, n))
    last: dict[int, int] = {}
    out: list[int] = []
    num_marks = 0
    for pos, h in enumerate(hashes):
        prev = last.get(h)
        if prev is None:
            out.append(-1)
            num_marks += 1
        else:
            out.append(num_marks - fen.prefix(prev + 1))
            fen.add(prev, -1)
        fen.add(pos, 1)
        last[h] = pos
    return out


@dataclass(frozen=True)
class SampleStats:
    """An immutable snapshot of the sampler: all the tuner reads."""

    rate: float  # R: the sampled fraction of the key space
    num_refs_total: int  # every reference observed, sampled or not
    num_sampled_keys: int
    hist: np.ndarray  # (NUM_DIST_BUCKETS, NUM_INTERVAL_BUCKETS) re-references, in sampled units
    cold: float  # first references of sampled keys, in sampled units
    one_hit_fraction: float  # of sampled keys, those referenced exactly once so far
    ref_hashes: tuple[int, ...]  # recent sampled references (all below the current threshold)
    ref_times_s: tuple[float, ...]
    requests_per_s: float  # whole stream, since the previous snapshot

    @property
    def num_re_references(self) -> float:
        return float(self.hist.sum())


class ShardsSampler:
    def __init__(self, max_keys: int = 8192, max_refs: int | None = None) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.max_keys = max_keys
        self.max_refs = max_refs if max_refs is not None else 2 * max_keys
        self._threshold = 1 << 64  # sampled iff hash < threshold
        self.rate = 1.0
        self.num_refs_total = 0
        # per sampled key: [last position, last time, number of references]
        self._keys: dict[int, list[float]] = {}
        self._heap: list[int] = []  # -hash of every sampled key: the largest leaves first
        self._fen = _Fenwick(4 * max_keys + 4)
        self._next_pos = 0
        self._num_marks = 0
        self._hist = np.zeros((NUM_DIST_BUCKETS, NUM_INTERVAL_BUCKETS), dtype=np.float64)
        self._cold = 0.0
        self._refs: deque[tuple[int, float]] = deque(maxlen=self.max_refs)
        # The request rate counts every reference, not the sample: a few popular keys in or out
        # of a small sample would swing an estimate made from sampled references.
        self._rate_first_s: float | None = None
        self._rate_last_s = 0.0
        self._rate_refs = 0

    def observe(self, key: bytes, now_s: float) -> None:
        self.observe_hash(hash64(key), now_s)

    def observe_hash(self, h: int, now_s: float) -> None:
        self.num_refs_total += 1
        if self._rate_first_s is None:
            self._rate_first_s = now_s
        self._rate_last_s = now_s
        self._rate_refs += 1
        if h >= self._threshold:
            return
        self._refs.append((h, now_s))
        state = self._keys.get(h)
        if state is None:
            self._cold += 1.0
            self._keys[h] = [float(self._mark_new()), now_s, 1.0]
            heapq.heappush(self._heap, -h)
            if len(self._keys) > self.max_keys:
                self._evict_largest()
            return
        prev_pos = int(state[0])
        distance = self._num_marks - self._fen.prefix(prev_pos + 1)
        self._hist[dist_bucket(distance / self.rate), interval_bucket(now_s - state[1])] += 1.0
        self._fen.add(prev_pos, -1)
        self._num_marks -= 1
        state[0] = -1.0  # unplaced: a compaction inside _mark_new must not count it
        state[0] = float(self._mark_new())
        state[1] = now_s
        state[2] += 1.0

    def _mark_new(self) -> int:
        if self._next_pos >= self._fen.n:
            self._compact()
        pos = self._next_pos
        self._next_pos += 1
        self._fen.add(pos, 1)
        self._num_marks += 1
        return pos

    def _compact(self) -> None:
        """Renumber live positions 0..n-1 in recency order; O(n log n) every ~3n references."""
        order = sorted((s for s in self._keys.values() if s[0] >= 0), key=lambda s: s[0])
        for i, state in enumerate(order):
            state[0] = float(i)
        self._fen.fill_ones(len(order))
        self._next_pos = len(order)
        self._num_marks = len(order)

    def _evict_largest(self) -> None:
        h = -heapq.heappop(self._heap)
        state = self._keys.pop(h)
        self._fen.add(int(state[0]), -1)
        self._num_marks -= 1
        old_rate = self.rate
        self._threshold = h
        self.rate = h / HASH_SPACE
        scale = self.rate / old_rate
        self._hist *= scale
        self._cold *= scale

    def decay(self, factor: float) -> None:
        """Age the histograms (e.g. halve after each retune) so the tuner follows a changing stream."""
        self._hist *= factor
        self._cold *= factor

    def snapshot(self) -> SampleStats:
        refs = [(h, t) for h, t in self._refs if h < self._threshold]
        hashes = tuple(h for h, _ in refs)
        times = tuple(t for _, t in refs)
        span_s = self._rate_last_s - self._rate_first_s if self._rate_first_s is not None else 0.0
        requests_per_s = (self._rate_refs - 1) / span_s if span_s > 0 else 0.0
        # The next snapshot's rate covers the references from here on.
        self._rate_first_s, self._rate_refs = self._rate_last_s, 1
        num_once = sum(1 for s in self._keys.values() if s[2] == 1.0)
        return SampleStats(
            rate=self.rate,
            num_refs_total=self.num_refs_total,
            num_sampled_keys=len(self._keys),
            hist=self._hist.copy(),
            cold=self._cold,
            one_hit_fraction=num_once / len(self._keys) if self._keys else 0.0,
            ref_hashes=hashes,
            ref_times_s=times,
            requests_per_s=requests_per_s,
        )


# -- reading a snapshot (pure) ------------------------------------------------------------------
def _partial_weights(uppers: np.ndarray, limit: float) -> np.ndarray:
    """Per bucket, the fraction counted below ``limit``: 1 for buckets ending at or below it,
    a log-linear share for the one that straddles it, 0 above."""
    lowers = np.concatenate(([0.0], uppers[:-1]))
    w = np.zeros_like(uppers)
    w[uppers <= limit] = 1.0
    straddle = (lowers < limit) & (uppers > limit)
    if np.any(straddle):
        lo = np.maximum(lowers[straddle], 1e-12)
        w[straddle] = np.log(limit / lo) / np.log(uppers[straddle] / lo)
    return w


_DIST_UPPERS = np.array([dist_bucket_upper(b) for b in range(NUM_DIST_BUCKETS)])
_INTERVAL_UPPERS_S = np.array([interval_bucket_upper_s(b) for b in range(NUM_INTERVAL_BUCKETS)])
_INTERVAL_MIDS_S = np.array([interval_bucket_mid_s(b) for b in range(NUM_INTERVAL_BUCKETS)])


def estimate_lru_hit_ratio(stats: SampleStats, capacity_entries: float, ttl_s: float | None = None) -> float:
    """Long-run hit ratio of LRU with ``capacity_entries`` and a sliding TTL (None: no expiry),
    estimated from the sampled histogram (``sim.lru_hit_ratio`` is the exact replay it is checked against)."""
    total = stats.num_re_references + stats.cold
    if total <= 0:
        return 0.0
    wd = _partial_weights(_DIST_UPPERS, capacity_entries)
    hits_by_interval = wd @ stats.hist
    if ttl_s is None:
        return float(hits_by_interval.sum() / total)
    wi = _partial_weights(_INTERVAL_UPPERS_S, ttl_s)
    return float(hits_by_interval @ wi / total)


def miss_ratio_curve(stats: SampleStats, capacities_entries: list[float]) -> list[float]:
    """LRU miss ratio at each capacity (no TTL): non-increasing in capacity."""
    return [1.0 - estimate_lru_hit_ratio(stats, c) for c in capacities_entries]


def mean_residency_s(stats: SampleStats, ttl_s: float | None) -> float:
    """How long one reference keeps its key resident under a sliding TTL and no capacity limit:
    E[min(time to the key's next reference, TTL)]. Re-references give the next-reference times;
    each key's last reference (as many as first references, ``cold``) never recurs."""
    total = stats.num_re_references + stats.cold
    if total <= 0:
        return 0.0
    if ttl_s is None:
        return math.inf if stats.cold > 0 else float(stats.hist.sum(axis=0) @ _INTERVAL_MIDS_S / total)
    per_interval = stats.hist.sum(axis=0)
    resident = np.minimum(_INTERVAL_MIDS_S, ttl_s)
    return float((per_interval @ resident + stats.cold * ttl_s) / total)


def interval_quantiles_s(stats: SampleStats, quantiles: list[float]) -> list[float]:
    """Re-reference interval at each quantile (bucket upper edges), for TTL candidates."""
    per_interval = stats.hist.sum(axis=0)
    total = float(per_interval.sum())
    if total <= 0:
        return []
    cdf = np.cumsum(per_interval) / total
    out = []
    for q in quantiles:
        b = int(np.searchsorted(cdf, q))
        out.append(float(_INTERVAL_UPPERS_S[min(b, NUM_INTERVAL_BUCKETS - 1)]))
    return out
