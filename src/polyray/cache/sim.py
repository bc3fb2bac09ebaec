"""Trace-driven cache simulation: synthetic traces, recorded traces, and three caches at equal memory.

A trace is ``(keys, times_s)``: integer key ids in reference order and their arrival times.

Generators (seeded, documented parameters; none is shaped to favour one policy):

- ``zipf_trace``: independent references, popularity ∝ 1 / rank^α over a fixed catalogue.
  Stationary: LRU is already decent, frequency-based policies do a little better.
- ``one_hit_trace``: Zipf plus a share of references to keys never seen before or again
  (unique texts: an embedding service sees many).
- ``burst_trace``: Zipf background plus a stream of new items, each referenced several times
  soon after it appears, with gaps that grow until it fades (news, a trending document):
  recency matters and a purely frequency-based cache would miss the bursts.
- ``mixed_trace``: all three at once.

Caches compared at equal memory, in entries of one size: plain LRU, the tuned ``LocalCache``
(driven by ``CacheTuner`` re-tuning periodically from the stream, as in production, its filter
bytes charged against its memory), and Belady's offline optimum with bypass (evict, or do not
admit, whatever is next used farthest in the future).
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polyray.cache.config import CacheConfig
from polyray.cache.local import ENTRY_OVERHEAD_BYTES, LocalCache
from polyray.cache.tuner import CacheDecision, CacheTuner

KEY_BYTES = 16
VALUE_BYTES = 1 + 2 * 384  # a 384-d fp16 vector and its codec header
ENTRY_BYTES = KEY_BYTES + VALUE_BYTES + ENTRY_OVERHEAD_BYTES

Trace = tuple[np.ndarray, np.ndarray]  # (int64 key ids, float64 times in seconds)


def _zipf_probabilities(num_items: int, alpha: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, num_items + 1, dtype=np.float64) ** alpha
    probabilities: np.ndarray = weights / weights.sum()
    return probabilities


def _poisson_times(rng: np.random.Generator, num_refs: int, requests_per_s: float) -> np.ndarray:
    return np.cumsum(rng.exponential(1.0 / requests_per_s, size=num_refs))


def zipf_trace(num_refs: int, num_items: int, alpha: float, *, requests_per_s: float = 500.0, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    ranks = rng.choice(num_items, size=num_refs, p=_zipf_probabilities(num_items, alpha))
    ids = rng.permutation(num_items)[ranks]  # popularity unrelated to the id
    return ids.astype(np.int64), _poisson_times(rng, num_refs, requests_per_s)


def one_hit_trace(
    num_refs: int,
    num_items: int,
    alpha: float,
    one_hit_fraction: float,
    *,
    requests_per_s: float = 500.0,
    seed: int = 0,
) -> Trace:
    """Zipf, with each reference replaced with probability ``one_hit_fraction`` by a fresh key."""
    keys, times = zipf_trace(num_refs, num_items, alpha, requests_per_s=requests_per_s, seed=seed)
    rng = np.random.default_rng(seed + 1)
    fresh = rng.random(num_refs) < one_hit_fraction
    keys = keys.copy()
    keys[fresh] = num_items + np.arange(int(fresh.sum()), dtype=np.int64)
    return keys, times


def burst_trace(
    num_refs: int,
    num_items: int,
    alpha: float,
    burst_fraction: float,
    *,
    mean_burst_refs: float = 6.0,
    first_gap_s: float = 2.0,
    gap_growth: float = 1.6,
    one_hit_fraction: float = 0.0,
    requests_per_s: float = 500.0,
    seed: int = 0,
) -> Trace:
    """Zipf background; a share ``burst_fraction`` of references go to bursts of new items.

    Each new item gets 1 + Poisson(mean_burst_refs - 1) references: at its birth, then after
    gaps drawn from an exponential whose mean starts at ``first_gap_s`` and grows by
    ``gap_growth`` per reference (interest fades). Births are Poisson, at the rate that makes
    the burst references the requested share. A further ``one_hit_fraction`` of references go
    to keys seen once.
    """
    rng = np.random.default_rng(seed)
    duration_s = num_refs / requests_per_s
    num_burst_refs = int(num_refs * burst_fraction)
    # Births start before the trace (items already trending when it begins) and its references
    # past the end are cut: both ends are in steady state and the burst share is as requested.
    mean_life_s = first_gap_s * (gap_growth ** (mean_burst_refs - 1.0) - 1.0) / (gap_growth - 1.0)
    lead_s = 2.0 * mean_life_s
    num_items_new = max(1, int(num_burst_refs / mean_burst_refs * (duration_s + lead_s) / duration_s))
    births = rng.uniform(-lead_s, duration_s, size=num_items_new)
    counts = 1 + rng.poisson(mean_burst_refs - 1.0, size=num_items_new)
    burst_keys: list[np.ndarray] = []
    burst_times: list[np.ndarray] = []
    max_count = int(counts.max())
    gap_means = first_gap_s * gap_growth ** np.arange(max_count - 1)
    for i in range(num_items_new):
        gaps = rng.exponential(gap_means[: counts[i] - 1])
        burst_times.append(births[i] + np.concatenate(([0.0], np.cumsum(gaps))))
        burst_keys.append(np.full(counts[i], num_items + i, dtype=np.int64))
    b_keys = np.concatenate(burst_keys)
    b_times = np.concatenate(burst_times)
    inside = (b_times >= 0.0) & (b_times < duration_s)
    b_keys, b_times = b_keys[inside], b_times[inside]
    num_background = max(0, num_refs - len(b_keys))
    z_keys, _ = zipf_trace(num_background, num_items, alpha, seed=seed + 2)
    z_times = rng.uniform(0.0, duration_s, size=num_background)
    keys = np.concatenate((z_keys, b_keys))
    times = np.concatenate((z_times, b_times))
    order = np.argsort(times, kind="stable")
    keys, times = keys[order][:num_refs], times[order][:num_refs]
    if one_hit_fraction > 0:
        fresh = np.random.default_rng(seed + 3).random(len(keys)) < one_hit_fraction
        keys = keys.copy()
        keys[fresh] = num_items + num_items_new + np.arange(int(fresh.sum()), dtype=np.int64)
    return keys, times


def read_trace(path: str | Path) -> Trace:
    """A recorded trace: one hex key per line, or ``t_s key`` per line. Blank lines and lines
    starting with ``#`` are skipped; without times, references are spaced 1 ms apart."""
    ids: dict[str, int] = {}
    keys: list[int] = []
    times: list[float] = []
    with open(path, encoding="ascii") as fh:
        for line_no, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) == 1:
                t_s, key = len(keys) * 1e-3, parts[0]
            elif len(parts) == 2:
                t_s, key = float(parts[0]), parts[1]
            else:
                raise ValueError(f"{path}:{line_no}: expected 'key' or 't_s key', got {line!r}")
            bytes.fromhex(key)  # validate
            keys.append(ids.setdefault(key.lower(), len(ids)))
            times.append(t_s)
    return np.array(keys, dtype=np.int64), np.array(times, dtype=np.float64)


def write_trace(path: str | Path, trace: Trace) -> None:
    """Write ``t_s key`` lines (keys as 16-byte hex digests of the ids)."""
    keys, times = trace
    with open(path, "w", encoding="ascii") as fh:
        for k, t in zip(keys.tolist(), times.tolist(), strict=True):
            fh.write(f"{t:.6f} {hashlib.blake2b(int(k).to_bytes(8, 'little'), digest_size=16).hexdigest()}\n")


# -- the three caches -------------------------------------------------------------------------------
def lru_hit_ratio(keys: Iterable[int], capacity_entries: int) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    for k in keys:
        total += 1
        if k in cache:
            hits += 1
            cache.move_to_end(k)
        elif capacity_entries > 0:
            cache[k] = None
            if len(cache) > capacity_entries:
                cache.popitem(last=False)
    return hits / total if total else 0.0


def next_use_indices(keys: list[int]) -> list[int]:
    """For each reference, the index of the key's next reference (len(keys) + i when none)."""
    n = len(keys)
    out = [0] * n
    seen: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        out[i] = seen.get(keys[i], n + i)
        seen[keys[i]] = i
    return out


def belady_hit_ratio(keys: Iterable[int], capacity_entries: int) -> float:
    """Offline optimum (MIN) with bypass: a missed key is not admitted when it is next used
    later than every cached key; otherwise the cached key used farthest in the future leaves.
    A max-heap of next uses with lazy deletion: O(log n) per reference."""
    ks = list(keys)
    n = len(ks)
    if n == 0 or capacity_entries <= 0:
        return 0.0
    nxt = next_use_indices(ks)
    cached: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), stale entries skipped
    hits = 0
    for i, k in enumerate(ks):
        nu = nxt[i]
        if k in cached:
            hits += 1
            cached[k] = nu
            heapq.heappush(heap, (-nu, k))
            continue
        if nu >= n:  # never used again: caching it cannot help
            continue
        if len(cached) >= capacity_entries:
            while True:
                neg, victim = heap[0]
                if cached.get(victim) == -neg:
                    break
                heapq.heappop(heap)
            if -neg <= nu:
                continue  # bypass: everything cached is needed sooner
            heapq.heappop(heap)
            del cached[victim]
        cached[k] = nu
        heapq.heappush(heap, (-nu, k))
    return hits / n


@dataclass(frozen=True)
class TunedResult:
    hit_ratio: float
    decisions: tuple[CacheDecision, ...]
    num_rejected: int
    filter_bytes: int


def tuned_hit_ratio(
    trace: Trace,
    memory_bytes: int,
    value_bytes: int,
    *,
    config: CacheConfig | None = None,
    compute_s_per_miss: float = 0.01,
    num_retunes: int = 10,
) -> TunedResult:
    """The serving ``LocalCache`` under ``CacheTuner``, re-tuned ``num_retunes`` times over the
    trace (interval = duration / num_retunes; the config's admission until the first retune).
    The memory ceiling is ``memory_bytes``: the tuner may choose less, never more."""
    keys, times = trace
    cfg = config or CacheConfig()
    value = bytes(value_bytes)
    key_bytes = 16
    duration_s = float(times[-1] - times[0]) if len(times) > 1 else 1.0
    tuner: CacheTuner[str] = CacheTuner(
        ceiling_bytes=memory_bytes,
        compute_price_per_s=cfg.compute_price_per_s,
        storage_price_per_gib_hour=cfg.storage_price_per_gib_hour,
        retune_interval_s=max(duration_s / num_retunes, 1e-9),
        sample_max_keys=cfg.sample_max_keys,
        default_compute_s_per_miss=compute_s_per_miss,
        initial_admission=cfg.admission,
    )
    clock_now = [float(times[0]) if len(times) else 0.0]
    cache = LocalCache(memory_bytes, admission=cfg.admission, ttl_s=cfg.ttl_s, clock=lambda: clock_now[0])
    entry_bytes = key_bytes + value_bytes + cache.entry_overhead_bytes
    tuner.note_entry_bytes("m", entry_bytes)
    decisions: list[CacheDecision] = []
    hits = 0
    get, put, observe = cache.get, cache.put, tuner.observe
    # Keys are digests, as cache_key makes them in production (the filters rely on it).
    digests: dict[int, bytes] = {}
    for k, t in zip(keys.tolist(), times.tolist(), strict=True):
        clock_now[0] = t
        key = digests.get(k)
        if key is None:
            key = digests[k] = hashlib.blake2b(k.to_bytes(8, "little", signed=True), digest_size=key_bytes).digest()
        observe("m", key, t)
        if get(key) is not None:
            hits += 1
        else:
            put(key, value)
        if tuner.due(t):
            d = tuner.retune(t)["m"]
            decisions.append(d)
            cache.reconfigure(
                capacity_bytes=d.capacity_bytes, admission=d.admission, ttl_s=d.ttl_s, window_fraction=d.window_fraction
            )
    return TunedResult(hits / len(keys) if len(keys) else 0.0, tuple(decisions), cache.num_rejected, cache.filter_bytes)


def static_top_c_hit_ratio(keys: np.ndarray, capacity_entries: int) -> float:
    """In hindsight, cache the ``capacity_entries`` most referenced keys of the whole trace (each
    misses once): about the best a frequency-based online policy can do on a stationary trace."""
    _, counts = np.unique(keys, return_counts=True)
    top = np.sort(counts)[::-1][:capacity_entries]
    return float((top - 1).sum() / len(keys)) if len(keys) else 0.0


@dataclass(frozen=True)
class Comparison:
    """Hit ratios of the three caches (and the hindsight top-C set) at one memory size."""

    num_refs: int
    num_distinct: int
    memory_entries: int  # for LRU and Belady
    memory_bytes: int  # for the tuned cache, filters included
    lru: float
    tuned: TunedResult
    belady: float
    static_top_c: float


def compare_at_equal_memory(
    trace: Trace,
    memory_fraction: float = 0.05,
    *,
    value_bytes: int = VALUE_BYTES,
    num_retunes: int = 10,
    config: CacheConfig | None = None,
) -> Comparison:
    """LRU, the tuned ``LocalCache`` and Belady given the memory of ``memory_fraction`` of the
    trace's distinct keys (entries of ``KEY_BYTES + value_bytes + ENTRY_OVERHEAD_BYTES``)."""
    keys, _ = trace
    key_list = keys.tolist()
    num_distinct = len(np.unique(keys))
    entries = max(1, int(num_distinct * memory_fraction))
    memory_bytes = entries * (KEY_BYTES + value_bytes + ENTRY_OVERHEAD_BYTES)
    return Comparison(
        num_refs=len(key_list),
        num_distinct=num_distinct,
        memory_entries=entries,
        memory_bytes=memory_bytes,
        lru=lru_hit_ratio(key_list, entries),
        tuned=tuned_hit_ratio(trace, memory_bytes, value_bytes, config=config, num_retunes=num_retunes),
        belady=belady_hit_ratio(key_list, entries),
        static_top_c=static_top_c_hit_ratio(keys, entries),
    )
