"""SHARDS sampling, the miss-ratio curve, the tuner's decisions, and the simulators."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyray.cache import sim
from polyray.cache.local import LocalCache
from polyray.cache.shards import (
    ShardsSampler,
    dist_bucket,
    estimate_lru_hit_ratio,
    mean_residency_s,
    miss_ratio_curve,
    stack_distances,
)
from polyray.cache.tuner import WINDOW_FRACTIONS, CacheTuner, Prices, allocate, plan, tune


def naive_distances(keys: list[int]) -> list[int]:
    out = []
    for i, key in enumerate(keys):
        prev = max((j for j in range(i) if keys[j] == key), default=None)
        out.append(-1 if prev is None else len(set(keys[prev + 1 : i]) - {key}))
    return out


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 12), max_size=60))
def test_stack_distances_match_the_definition(keys: list[int]) -> None:
    assert stack_distances(keys) == naive_distances(keys)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=200))
def test_shards_at_rate_one_records_exact_lru_distances(keys: list[int]) -> None:
    """With room for every key the sample is the whole stream: the histogram holds exactly the
    LRU stack distances (bucketed) and the cold count is the number of distinct keys."""
    sampler = ShardsSampler(max_keys=64)
    for t, key in enumerate(keys):
        sampler.observe(key.to_bytes(4, "little"), float(t))
    stats = sampler.snapshot()
    assert stats.rate == 1.0
    expected = np.zeros(stats.hist.shape[0])
    for d in naive_distances(keys):
        if d >= 0:
            expected[dist_bucket(d)] += 1
    assert np.array_equal(stats.hist.sum(axis=1), expected)
    assert stats.cold == len(set(keys))
    # LRU simulated directly agrees with the curve at every whole capacity.
    for capacity in (1, 2, 4, 8):
        assert estimate_lru_hit_ratio(stats, capacity) == pytest.approx(sim.lru_hit_ratio(keys, capacity), abs=1e-9)


def test_compaction_keeps_distances_exact() -> None:
    """Many references with few keys force the Fenwick positions to be renumbered."""
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 20, size=2000).tolist()
    sampler = ShardsSampler(max_keys=32)
    for t, key in enumerate(keys):
        sampler.observe(key.to_bytes(4, "little"), float(t))
    expected = np.zeros(sampler.snapshot().hist.shape[0])
    for d in stack_distances(keys):
        if d >= 0:
            expected[dist_bucket(d)] += 1
    assert np.array_equal(sampler.snapshot().hist.sum(axis=1), expected)


def zipf_keys(n: int, seed: int) -> tuple[list[int], np.ndarray]:
    keys, times = sim.zipf_trace(n, 20_000, 0.9, seed=seed)
    return keys.tolist(), times


def test_fixed_size_sample_is_bounded_and_estimates_the_curve() -> None:
    keys, times = zipf_keys(60_000, seed=5)
    sampler = ShardsSampler(max_keys=512)
    for key, t in zip(keys, times.tolist(), strict=True):
        sampler.observe(hashlib.blake2b(key.to_bytes(8, "little"), digest_size=16).digest(), t)
    stats = sampler.snapshot()
    assert stats.num_sampled_keys <= 512 and len(stats.ref_hashes) <= sampler.max_refs
    assert stats.rate < 0.2
    assert stats.requests_per_s == pytest.approx(500.0, rel=0.2)
    for capacity in (500, 2000, 5000):
        assert estimate_lru_hit_ratio(stats, capacity) == pytest.approx(sim.lru_hit_ratio(keys, capacity), abs=0.05)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=300), st.integers(16, 64))
def test_the_miss_ratio_curve_never_increases(keys: list[int], max_keys: int) -> None:
    sampler = ShardsSampler(max_keys=max_keys)
    for t, key in enumerate(keys):
        sampler.observe(key.to_bytes(4, "little"), t * 0.5)
    curve = miss_ratio_curve(sampler.snapshot(), [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 1e6])
    assert all(0.0 <= m <= 1.0 for m in curve)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(curve))


def test_residency_under_a_ttl() -> None:
    sampler = ShardsSampler(max_keys=64)
    for t in range(100):  # one key every 1 s
        sampler.observe(b"k", float(t))
    stats = sampler.snapshot()
    # 99 re-references 1 s apart, one last reference that never recurs (held for the whole TTL).
    assert mean_residency_s(stats, 10.0) == pytest.approx((99 * 1.0 + 10.0) / 100, rel=0.1)
    assert mean_residency_s(stats, None) == float("inf")
    assert estimate_lru_hit_ratio(stats, 10, ttl_s=0.5) == 0.0
    assert estimate_lru_hit_ratio(stats, 10, ttl_s=2.0) == pytest.approx(0.99)


CHEAP_STORAGE = Prices(compute_price_per_s=1.2e-5, storage_price_per_gib_hour=0.005, compute_s_per_miss=0.01)
ENTRY_BYTES = 1000


def sampled(trace: sim.Trace, max_keys: int = 1024) -> ShardsSampler:
    sampler = ShardsSampler(max_keys=max_keys)
    for key, t in zip(trace[0].tolist(), trace[1].tolist(), strict=True):
        sampler.observe(hashlib.blake2b(int(key).to_bytes(8, "little"), digest_size=16).digest(), t)
    return sampler


@pytest.fixture(scope="module")
def one_hit_stats() -> ShardsSampler:
    return sampled(sim.one_hit_trace(40_000, 20_000, 0.9, 0.5, seed=7), max_keys=4096)


def test_cheap_storage_buys_the_ceiling_and_filters_one_hit_wonders(one_hit_stats: ShardsSampler) -> None:
    stats = one_hit_stats.snapshot()
    decision = tune(stats, CHEAP_STORAGE, ceiling_bytes=1000 * ENTRY_BYTES, entry_bytes=ENTRY_BYTES)
    assert decision.capacity_bytes == 1000 * ENTRY_BYTES
    assert decision.admission in ("doorkeeper", "tinylfu")  # half the references are one-hit wonders
    assert 0.0 < decision.expected_hit_ratio < 0.5
    assert decision.expected_saving_per_s > 0
    assert len(decision.curve) >= 3 and decision.reason


def test_expensive_storage_buys_nothing(one_hit_stats: ShardsSampler) -> None:
    pricey = Prices(compute_price_per_s=1e-9, storage_price_per_gib_hour=1e6, compute_s_per_miss=0.01)
    decision = tune(one_hit_stats.snapshot(), pricey, ceiling_bytes=1000 * ENTRY_BYTES, entry_bytes=ENTRY_BYTES)
    assert decision.capacity_bytes == 0 and decision.expected_saving_per_s == 0.0


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 5_000_000),
    st.floats(1e-9, 1e-3),
    st.floats(1e-6, 1e3),
)
def test_capacity_never_exceeds_the_ceiling(ceiling_bytes: int, compute_price: float, storage_price: float) -> None:
    sampler = ShardsSampler(max_keys=64)
    rng = np.random.default_rng(ceiling_bytes % 97)
    for t, key in enumerate(rng.integers(0, 300, size=800).tolist()):
        sampler.observe(int(key).to_bytes(4, "little"), t * 0.01)
    prices = Prices(compute_price, storage_price, 0.01)
    options = plan(sampler.snapshot(), prices, ceiling_bytes, ENTRY_BYTES)
    assert all(d.capacity_bytes <= ceiling_bytes for d in options)
    assert options[0].capacity_bytes == 0
    best = tune(sampler.snapshot(), prices, ceiling_bytes, ENTRY_BYTES)
    assert best.capacity_bytes <= ceiling_bytes
    assert best.expected_cost_per_s <= options[0].expected_cost_per_s


def test_allocate_gives_memory_where_it_saves_most() -> None:
    busy = sampled(sim.zipf_trace(20_000, 5_000, 1.0, requests_per_s=1000.0, seed=1), 512).snapshot()
    quiet = sampled(sim.zipf_trace(2_000, 5_000, 1.0, requests_per_s=10.0, seed=2), 512).snapshot()
    ceiling = 1000 * ENTRY_BYTES
    plans = {
        "busy": plan(busy, CHEAP_STORAGE, ceiling, ENTRY_BYTES),
        "quiet": plan(quiet, CHEAP_STORAGE, ceiling, ENTRY_BYTES),
    }
    chosen = allocate(plans, ceiling)
    assert sum(d.capacity_bytes for d in chosen.values()) <= ceiling
    assert chosen["busy"].capacity_bytes > chosen["quiet"].capacity_bytes


def test_cache_tuner_retunes_when_due() -> None:
    tuner: CacheTuner[str] = CacheTuner(
        ceiling_bytes=500 * ENTRY_BYTES,
        compute_price_per_s=1.2e-5,
        storage_price_per_gib_hour=0.005,
        retune_interval_s=5.0,
        sample_max_keys=256,
    )
    keys, times = sim.zipf_trace(5_000, 2_000, 1.0, seed=3)
    assert not tuner.due(0.0)
    for key, t in zip(keys.tolist(), times.tolist(), strict=True):
        tuner.observe("m", int(key).to_bytes(8, "little"), t)
    tuner.note_compute("m", compute_s=0.2, num_items=10)
    assert tuner.due(float(times[-1]))
    decisions = tuner.retune(float(times[-1]))
    assert set(decisions) == {"m"} and tuner.num_retunes == 1
    assert 0 < decisions["m"].capacity_bytes <= 500 * ENTRY_BYTES
    assert not tuner.due(float(times[-1]) + 1.0)


# -- simulators ------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 15), max_size=120), st.integers(1, 8))
def test_belady_is_never_worse_than_lru(keys: list[int], capacity: int) -> None:
    assert sim.belady_hit_ratio(keys, capacity) >= sim.lru_hit_ratio(keys, capacity)


def test_belady_on_a_known_sequence() -> None:
    # capacity 2: a b c a b c ... LRU never hits; OPT never admits c and hits a, b every cycle.
    keys = [0, 1, 2] * 4
    assert sim.lru_hit_ratio(keys, 2) == 0.0
    assert sim.belady_hit_ratio(keys, 2) == pytest.approx(6 / 12)  # bypass 2, keep 0 and 1


def test_traces_are_seeded_and_shaped() -> None:
    a = sim.zipf_trace(1000, 100, 0.9, seed=1)
    b = sim.zipf_trace(1000, 100, 0.9, seed=1)
    assert np.array_equal(a[0], b[0]) and np.all(np.diff(a[1]) > 0)
    keys, _ = sim.one_hit_trace(10_000, 1000, 0.9, 0.3, seed=1)
    _, counts = np.unique(keys, return_counts=True)
    assert (counts == 1).sum() >= 0.25 * len(keys)
    keys, times = sim.burst_trace(10_000, 1000, 0.9, 0.3, seed=1)
    assert len(keys) == 10_000 and np.all(np.diff(times) >= 0)
    assert (keys >= 1000).mean() == pytest.approx(0.3, abs=0.05)


def test_recorded_trace_formats(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("# comment\naa\nbb\n\nAA\n")
    keys, times = sim.read_trace(plain)
    assert keys.tolist() == [0, 1, 0] and times.tolist() == pytest.approx([0.0, 1e-3, 2e-3])
    timed = tmp_path / "timed.txt"
    sim.write_trace(timed, (np.array([5, 6, 5]), np.array([0.5, 1.0, 2.0])))
    keys, times = sim.read_trace(timed)
    assert keys.tolist() == [0, 1, 0] and times.tolist() == [0.5, 1.0, 2.0]
    bad = tmp_path / "bad.txt"
    bad.write_text("1.0 zz\n")
    with pytest.raises(ValueError):
        sim.read_trace(bad)


def test_tuned_cache_beats_lru_with_one_hit_wonders() -> None:
    trace = sim.one_hit_trace(30_000, 10_000, 0.9, 0.4, seed=11)
    distinct = len(np.unique(trace[0]))
    entries = distinct // 20
    value_bytes = 769
    entry_bytes = 16 + value_bytes + 160
    result = sim.tuned_hit_ratio(trace, entries * entry_bytes, value_bytes, num_retunes=3)
    lru = sim.lru_hit_ratio(trace[0].tolist(), entries)
    opt = sim.belady_hit_ratio(trace[0].tolist(), entries)
    assert lru < result.hit_ratio <= opt
    assert len(result.decisions) >= 2
    assert all(d.capacity_bytes <= entries * entry_bytes for d in result.decisions)


# -- the W-TinyLFU window ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_bursts() -> sim.Trace:
    """Half the references to new items used a few times within seconds of appearing."""
    return sim.burst_trace(40_000, 20_000, 0.9, 0.5, first_gap_s=0.5, gap_growth=1.3, seed=8)


def test_bursts_of_new_items_get_a_bigger_window(short_bursts: sim.Trace) -> None:
    entries = len(np.unique(short_bursts[0])) // 20
    stats = sampled(short_bursts, 2048).snapshot()
    decision = tune(stats, CHEAP_STORAGE, entries * ENTRY_BYTES, ENTRY_BYTES, ("tinylfu",), "tinylfu")
    assert decision.admission == "tinylfu" and decision.window_fraction >= 0.3
    assert "tinylfu/w0.01" in decision.reason and f"tinylfu/w{decision.window_fraction:g}" in decision.reason
    # The miniatures' ranking holds at full size: the chosen window beats the 1 % one on the trace.
    keys = short_bursts[0].tolist()

    def full_size(window: float) -> float:
        cache = LocalCache(entries * ENTRY_BYTES, admission="tinylfu", window_fraction=window)
        hits = 0
        for key in keys:
            digest = hashlib.blake2b(int(key).to_bytes(8, "little"), digest_size=16).digest()
            if cache.get(digest) is not None:
                hits += 1
            else:
                cache.put(digest, bytes(ENTRY_BYTES - 16 - cache.entry_overhead_bytes))
        return hits / len(keys)

    assert full_size(decision.window_fraction) > full_size(0.01) + 0.02


def test_a_stable_popular_set_keeps_the_small_window() -> None:
    trace = sim.zipf_trace(40_000, 20_000, 0.9, seed=9)
    entries = len(np.unique(trace[0])) // 20
    stats = sampled(trace, 2048).snapshot()
    decision = tune(stats, CHEAP_STORAGE, entries * ENTRY_BYTES, ENTRY_BYTES, ("tinylfu",), "tinylfu")
    assert decision.admission == "tinylfu" and decision.window_fraction <= 0.1


def test_windows_are_only_tried_for_tinylfu(short_bursts: sim.Trace) -> None:
    stats = sampled(short_bursts, 2048).snapshot()
    options = plan(stats, CHEAP_STORAGE, 1000 * ENTRY_BYTES, ENTRY_BYTES, ("always", "doorkeeper"))
    assert {d.window_fraction for d in options} == {0.01}
    top = plan(stats, CHEAP_STORAGE, 1000 * ENTRY_BYTES, ENTRY_BYTES)[-1]
    labels = {label for label, _ in top.curve[-1].sim_hit_ratios}
    assert labels == {"always", "doorkeeper", *(f"tinylfu/w{w:g}" for w in WINDOW_FRACTIONS)}


def test_the_tuner_moves_to_a_better_window_and_keeps_a_near_equal_one(short_bursts: sim.Trace) -> None:
    tuner: CacheTuner[str] = CacheTuner(
        ceiling_bytes=500 * ENTRY_BYTES,
        compute_price_per_s=1.2e-5,
        storage_price_per_gib_hour=0.005,
        retune_interval_s=10.0,
        sample_max_keys=2048,
        admissions=("tinylfu",),
        initial_admission="tinylfu",
    )
    keys, times = short_bursts
    for key, t in zip(keys.tolist(), times.tolist(), strict=True):
        tuner.observe("m", hashlib.blake2b(int(key).to_bytes(8, "little"), digest_size=16).digest(), t)
    assert tuner.retune(float(times[-1]))["m"].window_fraction >= 0.3  # from the initial 1 %
    # Two windows within the margin of each other: whichever runs now stays.
    stats = sampled(short_bursts, 2048).snapshot()
    near = (0.5, 0.51)
    top = plan(stats, CHEAP_STORAGE, 500 * ENTRY_BYTES, ENTRY_BYTES, ("tinylfu",), "tinylfu", near, 0.5)[-1]
    hits = dict(top.curve[-1].sim_hit_ratios)
    assert hits["tinylfu/w0.5"] != hits["tinylfu/w0.51"] and abs(hits["tinylfu/w0.5"] - hits["tinylfu/w0.51"]) < 0.005
    for current in near:
        chosen = tune(stats, CHEAP_STORAGE, 500 * ENTRY_BYTES, ENTRY_BYTES, ("tinylfu",), "tinylfu", near, current)
        assert chosen.window_fraction == current


def test_a_small_key_population_is_simulated_at_full_size() -> None:
    """Few distinct keys (every one sampled, rate 1) and a cache far below the miniatures'
    minimum: the replay is the cache itself, so the filters are still ranked and chosen."""
    trace = sim.zipf_trace(3000, 1500, 1.0, seed=12)
    cmp = sim.compare_at_equal_memory(trace, 0.05)
    assert cmp.memory_entries < 100  # below MIN_SIM_ENTRIES
    assert all(d.sample_rate == 1.0 for d in cmp.tuned.decisions)
    assert {d.admission for d in cmp.tuned.decisions[1:]} <= {"doorkeeper", "tinylfu"}
    assert cmp.tuned.hit_ratio > 1.1 * cmp.lru
    assert cmp.tuned.hit_ratio <= cmp.belady
