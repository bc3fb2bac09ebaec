"""Choose local-tier capacity, TTL and admission from a SHARDS sample: compute vs storage cost.

Everything here but ``CacheTuner`` is pure (no clock, no I/O): ``tune`` takes a snapshot and
prices and returns a ``CacheDecision``, so it runs in a worker thread and in tests alike.

Cost per second of one model's cache, for capacity ``c``, admission ``a`` (for W-TinyLFU with
its window fraction, one of ``WINDOW_FRACTIONS``) and TTL ``t``::

    cost = λ · (1 - hit(c, a, t)) · price_per_miss  +  storage_price_per_byte_s · occupancy(c, t)

- ``λ`` is the model's request rate; ``price_per_miss`` = compute seconds per text × price per
  compute second.
- ``hit(c, a, t)`` comes from miniature simulations: the recent sampled references are replayed
  through the very ``LocalCache`` that serves, scaled down by the sampling rate (capacity
  ``c · R``), once per admission policy (W-TinyLFU once per window fraction) and capacity on a
  doubling grid; the first half of the replay warms the cache, the second half is measured.
  While every key is sampled (``R = 1``) the replay is the cache at its real size, and small
  caches are simulated too. A TTL scales that by LRU's
  ``hit(c, t) / hit(c, ∞)`` from the SHARDS histogram (exact for LRU with a sliding TTL, an
  approximation for the filtered policies).
- ``occupancy(c, t)`` = ``min(c, λ · E[min(next-use interval, t)] · entry_bytes)``: with no TTL
  the cache fills to capacity; a short TTL frees memory of keys that are not coming back soon.

Across models the memory ceiling is split by a small dynamic programme over each model's
per-capacity best options (``allocate``), so memory goes where it saves most compute.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from polyray.cache.config import ADMISSIONS, CacheConfig
from polyray.cache.local import DEFAULT_EXPECTED_ENTRY_BYTES, DEFAULT_WINDOW_FRACTION, LocalCache, mix64
from polyray.cache.shards import (
    SampleStats,
    ShardsSampler,
    estimate_lru_hit_ratio,
    interval_quantiles_s,
    mean_residency_s,
    stack_distances,
)

GIB = 1024**3
# Simulate only where the scaled-down cache holds at least this many entries: below, the
# miniature is too coarse to rank policies, and LRU's histogram answers alone.
MIN_SIM_ENTRIES = 100  # W-TinyLFU's 1 % window holds one entry
# ... unless nothing was scaled down: while every key is sampled (rate 1) the replay runs the
# cache at its real size over the real recent references, and small caches are ranked as they
# will behave. (A recorded live trace of 742 keys at 5 % memory, 37 entries: LRU 0.371,
# doorkeeper 0.469; the tuner could only pick LRU while this was gated on MIN_SIM_ENTRIES.)
MIN_FULL_SIZE_SIM_ENTRIES = 16
MIN_SIM_REFS = 256
WARMUP_FRACTION = 0.5  # of the replay, before hits are counted
WARMUP_PER_ENTRY = 4  # warm-up references per entry of the scaled-down cache
MIN_GRID_ENTRIES = 64
TTL_QUANTILES = (0.5, 0.9, 0.99)
# A filtered policy must beat plain LRU by this much hit ratio to be chosen: simpler wins ties,
# and sampling noise does not flip the policy back and forth.
ADMISSION_MARGIN = 0.005
ALLOCATION_UNITS = 512
# W-TinyLFU window sizes the miniatures try (fraction of the entries' memory). 1 % is the paper's
# default for stable popularity; bursts of new items want room to prove themselves (measured on
# the bench's bursts trace at 5 % memory, fixed policy: 0.430 at 1 %, 0.440 at 10 %, 0.461 at
# 30 %, 0.470 at 50 %; on plain Zipf 0.518 at 1 % falling to 0.511 at 50 %).
WINDOW_FRACTIONS = (0.01, 0.1, 0.3, 0.5)
WINDOW_SIM_POINTS = 1  # the largest simulated capacities, where the other windows are tried

K = TypeVar("K", bound=Hashable)
Policy = tuple[str, float]  # (admission, window fraction); the window matters to tinylfu only


@dataclass(frozen=True)
class Prices:
    compute_price_per_s: float
    storage_price_per_gib_hour: float
    compute_s_per_miss: float  # measured model time per text

    @property
    def price_per_miss(self) -> float:
        return self.compute_price_per_s * self.compute_s_per_miss

    @property
    def storage_price_per_byte_s(self) -> float:
        return self.storage_price_per_gib_hour / GIB / 3600.0


@dataclass(frozen=True)
class MissCurvePoint:
    """One capacity on the cache's miss-ratio curve (named apart from ``policies.CurvePoint``, a
    point of the model's batch-cost curve)."""

    capacity_bytes: int
    capacity_entries: int
    lru_miss_ratio: float  # long-run, from the SHARDS histogram (no TTL)
    sim_hit_ratios: tuple[tuple[str, float], ...]  # per admission, from the miniature simulations


@dataclass(frozen=True)
class CacheDecision:
    capacity_bytes: int
    ttl_s: float | None
    admission: str
    window_fraction: float
    expected_hit_ratio: float
    expected_cost_per_s: float
    expected_saving_per_s: float  # versus no cache at all
    requests_per_s: float
    sample_rate: float
    curve: tuple[MissCurvePoint, ...]
    reason: str


def capacity_grid_entries(ceiling_entries: int) -> list[int]:
    """0, then doubling from MIN_GRID_ENTRIES, then the ceiling itself."""
    grid = [0]
    c = MIN_GRID_ENTRIES
    while c < ceiling_entries:
        grid.append(c)
        c *= 2
    if ceiling_entries > 0:
        grid.append(ceiling_entries)
    return grid


def simulate_hit_ratio(
    hashes: Sequence[int],
    capacity_entries: float,
    entry_bytes: int,
    admission: str,
    window_fraction: float = DEFAULT_WINDOW_FRACTION,
    warmup_fraction: float = 0.5,
) -> float:
    """Replay references through a ``LocalCache`` of ``capacity_entries`` entries (no TTL);
    hit ratio over the references after the warm-up prefix."""
    value = bytes(max(0, entry_bytes - 16))
    cache = LocalCache(
        int(capacity_entries * entry_bytes),
        admission=admission,
        window_fraction=window_fraction,
        entry_overhead_bytes=0,
        expected_entry_bytes=entry_bytes,
    )
    # Sampled hashes all lie below the SHARDS threshold (their top bits are zero): re-mix them
    # into 16-byte digests so the cache's filters see uniform bits, as they do in production.
    keys: dict[int, bytes] = {}
    start = int(len(hashes) * warmup_fraction)
    hits = 0
    get, put = cache.get, cache.put
    for i, h in enumerate(hashes):
        key = keys.get(h)
        if key is None:
            key = keys[h] = mix64(h).to_bytes(8, "little") + h.to_bytes(8, "little")
        if get(key) is not None:
            if i >= start:
                hits += 1
        else:
            put(key, value)
    measured = len(hashes) - start
    return hits / measured if measured > 0 else 0.0


def _lru_hits_from_distances(distances: Sequence[int], capacity_entries: float, start: int) -> float:
    measured = len(distances) - start
    if measured <= 0:
        return 0.0
    return sum(1 for d in distances[start:] if 0 <= d < capacity_entries) / measured


def _policy(admission: str, window_fraction: float) -> Policy:
    """Only W-TinyLFU has a window: the other policies carry the default so they compare equal."""
    return (admission, window_fraction if admission == "tinylfu" else DEFAULT_WINDOW_FRACTION)


def policy_label(policy: Policy) -> str:
    admission, window = policy
    return f"tinylfu/w{window:g}" if admission == "tinylfu" else admission


def plan(
    stats: SampleStats,
    prices: Prices,
    ceiling_bytes: int,
    entry_bytes: int,
    admissions: Sequence[str] = ADMISSIONS,
    current_admission: str | None = None,
    window_fractions: Sequence[float] = WINDOW_FRACTIONS,
    current_window_fraction: float = DEFAULT_WINDOW_FRACTION,
) -> list[CacheDecision]:
    """The cheapest (admission, window, TTL) at each capacity of the grid, capacity 0 first.

    W-TinyLFU is simulated once per window fraction in ``window_fractions``: a small window
    suits a stable popular set (main, guarded by frequency, gets nearly all memory); bursts of
    new items that are used a few times soon after they appear need a window big enough to hold
    them until they have earned their place in main.

    The current policy (``current_admission`` with ``current_window_fraction``) is kept unless
    another beats it by ``ADMISSION_MARGIN``: switching rebuilds or reshapes the filters and
    segments, and sampling noise should not flip the policy back and forth.
    """
    entry_bytes = max(1, entry_bytes)
    ceiling_entries = max(0, ceiling_bytes // entry_bytes)
    grid = capacity_grid_entries(ceiling_entries)
    lam = stats.requests_per_s
    rate = stats.rate
    hashes = stats.ref_hashes
    can_sim = len(hashes) >= MIN_SIM_REFS
    start = int(len(hashes) * WARMUP_FRACTION)
    distances = stack_distances(list(hashes)) if can_sim else []
    distinct_in_replay = len(set(hashes))
    ttl_options: list[float | None] = [None, *sorted(set(interval_quantiles_s(stats, list(TTL_QUANTILES))))]
    policies: list[Policy] = []
    for adm in admissions:
        for w in window_fractions if adm == "tinylfu" else (DEFAULT_WINDOW_FRACTION,):
            if _policy(adm, w) not in policies:
                policies.append(_policy(adm, w))

    # LRU on the replay is exact at every capacity (one pass of stack distances). The filtered
    # policies are simulated at some grid points (the costly part) and elsewhere take their
    # ratio to LRU interpolated between the neighbouring simulated points.
    def replay_lru(c: int) -> float:
        return _lru_hits_from_distances(distances, min(c * rate, distinct_in_replay + 1.0), start)

    # A miniature is trusted only where its warm-up is several times its size: a cache that
    # never fills in the replay ranks filtered policies (which need second sightings) too low.
    min_sim_entries = MIN_FULL_SIZE_SIM_ENTRIES if rate >= 1.0 else MIN_SIM_ENTRIES
    sim_points = [
        c
        for c in grid
        if can_sim and c * rate >= min_sim_entries and c * rate * WARMUP_PER_ENTRY <= len(hashes) * WARMUP_FRACTION
    ]
    # Every point in the top octaves (where the decision usually lands), every other below.
    sim_points = sorted({*sim_points[-3:], *sim_points[-1::-2]})
    # Windows other than the default are simulated at the top point only (where the decision
    # lands; it keeps a retune's cost near that of one window): below them they have no estimate.
    points: dict[Policy, list[int]] = {
        p: sim_points if p[1] == DEFAULT_WINDOW_FRACTION else sim_points[-WINDOW_SIM_POINTS:]
        for p in policies
        if p[0] != "always"
    }
    ratios: dict[Policy, dict[int, float]] = {p: {} for p in points}
    for c in sim_points:
        lru = replay_lru(c)
        # Beyond the replay's distinct keys a bigger cache changes nothing.
        scaled = min(c * rate, distinct_in_replay + 1.0)
        for (adm, window), at in points.items():
            if c in at:
                h = simulate_hit_ratio(hashes, scaled, entry_bytes, adm, window_fraction=window)
                ratios[adm, window][c] = h / lru if lru > 0 else 1.0

    def hit_at(policy: Policy, c: int) -> float | None:
        at = points.get(policy, sim_points)
        if c not in at and not any(p < c for p in at):
            return None  # below the smallest simulated size: no estimate for filtered policies
        if policy[0] == "always":
            return replay_lru(c)
        below = [p for p in at if p <= c]
        above = [p for p in at if p >= c]
        lo = below[-1] if below else above[0]
        hi = above[0] if above else below[-1]
        ratio = ratios[policy][lo]
        if hi != lo:  # log-linear between the neighbouring simulated sizes
            w = math.log(c / lo) / math.log(hi / lo)
            ratio = (1.0 - w) * ratios[policy][lo] + w * ratios[policy][hi]
        return min(1.0, replay_lru(c) * ratio)

    curve: list[MissCurvePoint] = []
    hits_by_capacity: list[dict[Policy, float]] = []
    best_so_far: dict[Policy, float] = {}
    for c in grid:
        base: dict[Policy, float] = {}
        if c > 0:
            for policy in policies:
                estimate = hit_at(policy, c) if sim_points else None
                if estimate is not None:
                    # More memory never hurts these policies: smooth out replay noise (a short
                    # replay can score a small cache above a large one) with a running maximum.
                    best_so_far[policy] = base[policy] = max(estimate, best_so_far.get(policy, 0.0))
        if not base:
            base = {_policy("always", DEFAULT_WINDOW_FRACTION): estimate_lru_hit_ratio(stats, c)}
        hits_by_capacity.append(base)
        curve.append(
            MissCurvePoint(
                c * entry_bytes,
                c,
                1.0 - estimate_lru_hit_ratio(stats, c),
                tuple(sorted((policy_label(p), h) for p, h in base.items())),
            )
        )

    best_per_capacity: list[CacheDecision] = []
    no_cache_cost = lam * prices.price_per_miss
    current = _policy(current_admission or "always", current_window_fraction)
    for c, base in zip(grid, hits_by_capacity, strict=True):
        lru_inf = estimate_lru_hit_ratio(stats, c)
        # The policies in the running: the incumbent (or LRU), and any that beat it by the margin.
        incumbent = current if current in base else _policy("always", DEFAULT_WINDOW_FRACTION)
        if incumbent not in base:
            incumbent = next(iter(base))
        running = [p for p in base if p == incumbent or base[p] >= base[incumbent] + ADMISSION_MARGIN]
        options: list[tuple[float, float, Policy, float | None]] = []  # (cost, hit, policy, ttl)
        for policy in running:
            for ttl in ttl_options:
                factor = estimate_lru_hit_ratio(stats, c, ttl) / lru_inf if (ttl is not None and lru_inf > 0) else 1.0
                hit = min(1.0, base[policy] * factor) if c > 0 else 0.0
                occupancy_bytes = min(float(c * entry_bytes), lam * mean_residency_s(stats, ttl) * entry_bytes)
                cost = lam * (1.0 - hit) * prices.price_per_miss + prices.storage_price_per_byte_s * occupancy_bytes
                options.append((cost, hit, policy, ttl))
        # Cheapest; on equal cost the earlier option (the incumbent or simpler policy, no TTL).
        cost, hit, policy, ttl = min(options, key=lambda o: o[0])
        if c == 0:
            policy = current  # no memory: nothing to choose; keep the current shape
        best_per_capacity.append(
            CacheDecision(
                capacity_bytes=c * entry_bytes,
                ttl_s=ttl,
                admission=policy[0],
                window_fraction=policy[1],
                expected_hit_ratio=hit,
                expected_cost_per_s=cost,
                expected_saving_per_s=no_cache_cost - cost,
                requests_per_s=lam,
                sample_rate=rate,
                curve=tuple(curve),
                reason=_reason(c, policy, ttl, base),
            )
        )
    return best_per_capacity


def _reason(capacity_entries: int, policy: Policy, ttl_s: float | None, base_hits: dict[Policy, float]) -> str:
    if capacity_entries == 0:
        # Not "cache off": lookups, in-flight dedup and Redis go on, and the next retune grows
        # the tier as soon as repeats make keeping vectors cheaper than recomputing them.
        return "local tier kept empty for now: at the traffic sampled, keeping vectors would cost more than recomputing them"
    ranked = ", ".join(f"{policy_label(p)} {h:.3f}" for p, h in sorted(base_hits.items(), key=lambda kv: -kv[1]))
    ttl = "no ttl" if ttl_s is None else f"ttl {ttl_s:.3g} s"
    return f"{policy_label(policy)} at {capacity_entries} entries, {ttl}; simulated hit ratios: {ranked}"


def tune(
    stats: SampleStats,
    prices: Prices,
    ceiling_bytes: int,
    entry_bytes: int,
    admissions: Sequence[str] = ADMISSIONS,
    current_admission: str | None = None,
    window_fractions: Sequence[float] = WINDOW_FRACTIONS,
    current_window_fraction: float = DEFAULT_WINDOW_FRACTION,
) -> CacheDecision:
    """One model: the cheapest plan within the ceiling."""
    options = plan(
        stats,
        prices,
        ceiling_bytes,
        entry_bytes,
        admissions,
        current_admission,
        window_fractions,
        current_window_fraction,
    )
    return min(options, key=lambda d: d.expected_cost_per_s)


def allocate(plans: dict[K, list[CacheDecision]], ceiling_bytes: int) -> dict[K, CacheDecision]:
    """Split the ceiling across models: minimum total cost with sum of capacities <= ceiling.

    Dynamic programme over the budget in ``ALLOCATION_UNITS`` steps (capacities rounded up),
    so the sum never exceeds the ceiling.
    """
    if not plans:
        return {}
    unit = max(1.0, ceiling_bytes / ALLOCATION_UNITS)
    num_units = int(ceiling_bytes // unit)
    inf = math.inf
    # best[u] = (total cost, choices) using at most u units
    best: list[tuple[float, tuple[int, ...]]] = [(0.0, ())] * (num_units + 1)
    models = list(plans)
    for model in models:
        options = plans[model]
        nxt: list[tuple[float, tuple[int, ...]]] = [(inf, ())] * (num_units + 1)
        for u in range(num_units + 1):
            for i, d in enumerate(options):
                need = math.ceil(d.capacity_bytes / unit) if d.capacity_bytes else 0
                if need > u or best[u - need][0] == inf:
                    continue
                total = best[u - need][0] + d.expected_cost_per_s
                if total < nxt[u][0]:
                    nxt[u] = (total, (*best[u - need][1], i))
        best = nxt
    _, choice = best[num_units]
    return {model: plans[model][i] for model, i in zip(models, choice, strict=True)}


@dataclass
class _ModelState:
    sampler: ShardsSampler
    compute_s_per_miss: float
    entry_bytes: int


class CacheTuner(Generic[K]):
    """Per-model samplers fed by the engine, and the periodic decision.

    On the event loop: ``observe(model, key, now_s)`` for every looked-up key (hit or miss,
    O(log n) for sampled keys, one hash otherwise), ``note_compute`` after each batch.
    ``retune(now_s)`` when ``due(now_s)``; it costs up to a few hundred milliseconds of CPU
    (miniature simulations), so run ``decide(snapshot(now_s))`` in a worker thread and
    ``apply`` the result on the loop if that matters.
    """

    def __init__(
        self,
        *,
        ceiling_bytes: int,
        compute_price_per_s: float,
        storage_price_per_gib_hour: float,
        retune_interval_s: float = 60.0,
        sample_max_keys: int = 8192,
        default_compute_s_per_miss: float = 0.01,
        default_entry_bytes: int = DEFAULT_EXPECTED_ENTRY_BYTES,
        decay_per_retune: float = 0.5,
        admissions: Sequence[str] = ADMISSIONS,
        initial_admission: str | None = None,
        window_fractions: Sequence[float] = WINDOW_FRACTIONS,
    ) -> None:
        self.initial_admission = initial_admission  # what the caches run until the first decision
        self.window_fractions = tuple(window_fractions)
        self.ceiling_bytes = ceiling_bytes
        self.compute_price_per_s = compute_price_per_s
        self.storage_price_per_gib_hour = storage_price_per_gib_hour
        self.retune_interval_s = retune_interval_s
        self.sample_max_keys = sample_max_keys
        self.default_compute_s_per_miss = default_compute_s_per_miss
        self.default_entry_bytes = default_entry_bytes
        self.decay_per_retune = decay_per_retune
        self.admissions = tuple(admissions)
        self._models: dict[K, _ModelState] = {}
        self._next_retune_s: float | None = None
        self.decisions: dict[K, CacheDecision] = {}
        self.num_retunes = 0

    @classmethod
    def from_config(cls, config: CacheConfig, **kwargs: float) -> CacheTuner[K]:
        return cls(
            ceiling_bytes=config.local_max_bytes,
            compute_price_per_s=config.compute_price_per_s,
            storage_price_per_gib_hour=config.storage_price_per_gib_hour,
            retune_interval_s=config.retune_interval_s,
            sample_max_keys=config.sample_max_keys,
            initial_admission=config.admission,
            **kwargs,  # type: ignore[arg-type]
        )

    def _state(self, model: K) -> _ModelState:
        state = self._models.get(model)
        if state is None:
            state = _ModelState(
                ShardsSampler(self.sample_max_keys), self.default_compute_s_per_miss, self.default_entry_bytes
            )
            self._models[model] = state
        return state

    def observe(self, model: K, key: bytes, now_s: float) -> None:
        if self._next_retune_s is None:
            self._next_retune_s = now_s + self.retune_interval_s
        self._state(model).sampler.observe(key, now_s)

    def note_compute(self, model: K, compute_s: float, num_items: int) -> None:
        """Measured model time for ``num_items`` texts: an EWMA of seconds per miss."""
        if num_items <= 0:
            return
        state = self._state(model)
        state.compute_s_per_miss = 0.9 * state.compute_s_per_miss + 0.1 * (compute_s / num_items)

    def note_entry_bytes(self, model: K, entry_bytes: int) -> None:
        self._state(model).entry_bytes = max(1, entry_bytes)

    def due(self, now_s: float) -> bool:
        return self._next_retune_s is not None and now_s >= self._next_retune_s

    def snapshot(self, now_s: float) -> dict[K, tuple[SampleStats, Prices, int]]:
        self._next_retune_s = now_s + self.retune_interval_s
        out = {}
        for model, state in self._models.items():
            prices = Prices(self.compute_price_per_s, self.storage_price_per_gib_hour, state.compute_s_per_miss)
            out[model] = (state.sampler.snapshot(), prices, state.entry_bytes)
            state.sampler.decay(self.decay_per_retune)
        return out

    def decide(self, snap: dict[K, tuple[SampleStats, Prices, int]]) -> dict[K, CacheDecision]:
        """Pure given the snapshot: safe in a worker thread."""
        plans = {
            model: plan(
                stats,
                prices,
                self.ceiling_bytes,
                entry_bytes,
                self.admissions,
                self.decisions[model].admission if model in self.decisions else self.initial_admission,
                self.window_fractions,
                self.decisions[model].window_fraction if model in self.decisions else DEFAULT_WINDOW_FRACTION,
            )
            for model, (stats, prices, entry_bytes) in snap.items()
        }
        return allocate(plans, self.ceiling_bytes)

    def apply(self, decisions: dict[K, CacheDecision]) -> None:
        self.decisions = dict(decisions)
        self.num_retunes += 1

    def retune(self, now_s: float) -> dict[K, CacheDecision]:
        decisions = self.decide(self.snapshot(now_s))
        self.apply(decisions)
        return decisions
