"""LocalCache: the byte bound, LRU order, sliding TTL, admission filters, runtime reconfiguration."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyray.cache.local import BloomFilter, FrequencySketch, LocalCache, hash64


def k(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()


VALUE = bytes(84)  # with a 16-byte key and no overhead: 100 bytes an entry
ENTRY = 100


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def lru(capacity_entries: int, **kwargs: object) -> LocalCache:
    return LocalCache(capacity_entries * ENTRY, entry_overhead_bytes=0, expected_entry_bytes=ENTRY, **kwargs)  # type: ignore[arg-type]


def test_lru_evicts_the_least_recently_used() -> None:
    c = lru(3)
    for i in range(3):
        assert c.put(k(i), VALUE)
    assert c.get(k(0)) == VALUE  # 0 is now most recent; 1 is the LRU
    c.put(k(3), VALUE)
    assert k(1) not in c
    assert all(k(i) in c for i in (0, 2, 3))
    s = c.stats()
    assert (s.num_hits, s.num_misses, s.num_evictions, s.num_entries, s.bytes_used) == (1, 0, 1, 3, 300)


def test_entry_overhead_is_charged() -> None:
    c = LocalCache(1000, entry_overhead_bytes=400)
    c.put(k(0), VALUE)
    assert c.bytes_used == 16 + len(VALUE) + 400
    c.put(k(1), VALUE)
    assert len(c) == 2
    c.put(k(2), VALUE)  # 3 x 500 > 1000
    assert len(c) == 2 and k(0) not in c


def test_a_value_larger_than_the_cache_is_rejected() -> None:
    c = lru(2)
    assert not c.put(k(0), bytes(500))
    assert len(c) == 0 and c.stats().num_rejected == 1


def test_ttl_is_sliding_and_expired_entries_miss() -> None:
    clock = FakeClock()
    c = lru(10, ttl_s=10.0, clock=clock)
    c.put(k(0), VALUE)
    c.put(k(1), VALUE)
    clock.now_s = 8.0
    assert c.get(k(0)) == VALUE  # refreshes k(0) to expire at 18
    clock.now_s = 12.0
    assert c.get(k(1)) is None  # expired at 10
    assert c.get(k(0)) == VALUE
    s = c.stats()
    assert s.num_expired == 1 and s.num_misses == 1 and s.num_hits == 2
    clock.now_s = 100.0
    c.put(k(2), VALUE)  # a put purges expired entries from the LRU end
    assert len(c) == 1 and c.bytes_used == ENTRY


def test_doorkeeper_admits_on_the_second_sighting() -> None:
    c = lru(100, admission="doorkeeper")
    assert not c.put(k(1), VALUE)
    assert c.get(k(1)) is None
    assert c.put(k(1), VALUE)
    assert c.get(k(1)) == VALUE
    assert c.stats().num_rejected == 1


def test_tinylfu_keeps_frequent_items_through_a_scan() -> None:
    """A scan of one-hit wonders flushes LRU but not W-TinyLFU's main segment."""
    hot = [k(i) for i in range(50)]
    scan = [k(1000 + i) for i in range(2000)]

    def run(admission: str) -> int:
        c = lru(100, admission=admission)
        for _ in range(5):
            for key in hot:
                if c.get(key) is None:
                    c.put(key, VALUE)
        for key in scan:
            if c.get(key) is None:
                c.put(key, VALUE)
        return sum(key in c for key in hot)

    assert run("always") == 0
    assert run("tinylfu") >= 45
    assert run("doorkeeper") == 50


def test_filters_are_charged_inside_the_capacity() -> None:
    plain = lru(1000)
    filtered = lru(1000, admission="tinylfu")
    assert filtered.filter_bytes > 0
    for cache in (plain, filtered):
        for rep in range(3):
            for i in range(3000):
                key = k(i % 1500)
                if cache.get(key) is None:
                    cache.put(key, VALUE)
            del rep
        assert cache.bytes_used + cache.filter_bytes <= cache.capacity_bytes
    assert len(filtered) < len(plain) == 1000


def test_reconfigure_keeps_the_most_recent_entries_that_fit() -> None:
    c = lru(10)
    for i in range(10):
        c.put(k(i), VALUE)
    for i in reversed(range(10)):
        c.get(k(i))  # recency order 9..0, 0 most recent
    c.reconfigure(capacity_bytes=4 * ENTRY)
    assert c.capacity_bytes == 4 * ENTRY and len(c) == 4
    assert all(k(i) in c for i in (0, 1, 2, 3))
    c.reconfigure(ttl_s=5.0)
    assert c.ttl_s == 5.0 and len(c) == 4
    with pytest.raises(ValueError):
        c.reconfigure(admission="sometimes")


def test_switching_policy_keeps_entries_and_filters_follow() -> None:
    c = lru(100, admission="tinylfu")
    for _ in range(2):  # the doorkeeper in front admits a key on its second miss
        for i in range(50):
            if c.get(k(i)) is None:
                c.put(k(i), VALUE)
    before = {k(i) for i in range(50) if k(i) in c}
    assert len(before) == 50
    c.reconfigure(admission="always")
    assert c.filter_bytes == 0 and {k(i) for i in range(50) if k(i) in c} == before
    c.reconfigure(admission="doorkeeper")
    assert c.filter_bytes > 0 and len(c) == 50
    assert not c.put(k(999), VALUE)  # a new key now needs a second sighting


def test_bloom_and_sketch_basics() -> None:
    bloom = BloomFilter(1024)
    assert not bloom.add(hash64(k(1)))
    assert bloom.add(hash64(k(1)))
    assert hash64(k(1)) in bloom and hash64(k(2)) not in bloom
    sketch = FrequencySketch(64)
    h = hash64(k(7))
    for _ in range(5):
        sketch.increment(h)
    assert sketch.estimate(h) == 5  # 1 in the doorkeeper + 4 counted
    assert sketch.estimate(hash64(k(8))) == 0
    for i in range(sketch.sample_size):  # one aging period of other keys halves the counts
        sketch.increment(hash64(k(10_000 + i)))
    assert sketch.estimate(h) <= 2


ops = st.lists(st.tuples(st.sampled_from(["get", "put"]), st.integers(0, 40), st.integers(0, 300)), max_size=300)


@settings(max_examples=60, deadline=None)
@given(ops, st.sampled_from(["always", "doorkeeper", "tinylfu"]), st.integers(0, 3000), st.booleans())
def test_never_above_capacity_and_gets_return_what_was_put(
    operations: list[tuple[str, int, int]], admission: str, capacity_bytes: int, with_ttl: bool
) -> None:
    clock = FakeClock()
    c = LocalCache(
        capacity_bytes, admission=admission, entry_overhead_bytes=8, ttl_s=3.0 if with_ttl else None, clock=clock
    )
    last: dict[bytes, bytes] = {}
    for step, (op, i, size) in enumerate(operations):
        clock.now_s = step * 0.1
        key = k(i)
        if op == "put":
            value = bytes([i % 256]) * size
            c.put(key, value)
            last[key] = value
        else:
            got = c.get(key)
            assert got is None or got == last[key]
        assert c.bytes_used + c.filter_bytes <= max(c.capacity_bytes, c.filter_bytes)
        # The accounting is the entries held: every held key was put, and charges key + value + overhead.
        held = [key for key in last if key in c]
        assert len(c) == len(held)
        assert c.bytes_used == sum(len(key) + len(last[key]) + 8 for key in held)
    s = c.stats()
    assert s.num_hits + s.num_misses == sum(1 for op, _, _ in operations if op == "get")


def test_doorkeeper_protects_keys_that_were_hit_from_a_wave_of_admissions() -> None:
    c = lru(100, admission="doorkeeper")
    hot = [k(i) for i in range(20)]
    for key in hot:
        c.put(key, VALUE)  # first sighting: rejected
        c.put(key, VALUE)  # second: admitted to probation
        assert c.get(key) == VALUE  # hit: promoted to protected
    for i in range(300):  # 300 keys that each come twice: all admitted, more than the cache holds
        c.put(k(1000 + i), VALUE)
        c.put(k(1000 + i), VALUE)
    assert all(key in c for key in hot)
    assert sum(k(1000 + i) in c for i in range(300)) == len(c) - 20 > 40  # the wave filled the rest


def test_changing_only_the_window_keeps_filters_and_entries() -> None:
    c = lru(100, admission="tinylfu", window_fraction=0.5)
    for _ in range(2):  # second sightings: admitted to the (big) window
        for i in range(40):
            if c.get(k(i)) is None:
                c.put(k(i), VALUE)
    assert c._window_bytes > 30 * ENTRY  # most of them still in the window
    sketch = c._sketch
    assert sketch is not None
    counted = sketch.estimate(hash64(k(3)))
    c.reconfigure(window_fraction=0.01)
    assert c.window_fraction == 0.01 and c.stats().window_fraction == 0.01
    assert c._sketch is sketch and sketch.estimate(hash64(k(3))) == counted  # frequencies survive
    assert len(c) == 40 and all(k(i) in c for i in range(40))  # the window's overflow moved to main
    assert c._window_bytes <= c._window_max
    assert c._probation_bytes + c._protected_bytes <= c._main_max
    # Growing the window shrinks main: main's least recent entries leave, nothing overflows.
    full = lru(20, admission="tinylfu", window_fraction=0.01)
    for _ in range(3):
        for i in range(40):
            if full.get(k(i)) is None:
                full.put(k(i), VALUE)
    before = {i for i in range(40) if k(i) in full}
    evictions = full.num_evictions
    full.reconfigure(window_fraction=0.9)
    assert full._probation_bytes + full._protected_bytes <= full._main_max
    assert full.bytes_used + full.filter_bytes <= full.capacity_bytes
    after = {i for i in range(40) if k(i) in full}
    assert after < before and full.num_evictions - evictions == len(before) - len(after)


def test_a_ttl_change_alone_keeps_the_filters() -> None:
    c = lru(50, admission="doorkeeper")
    c.put(k(1), VALUE)  # first sighting: remembered by the doorkeeper, not admitted
    door = c._doorkeeper
    c.reconfigure(ttl_s=30.0)
    assert c._doorkeeper is door
    assert c.put(k(1), VALUE)  # the second sighting still counts as second


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["get", "put", "window"]), st.integers(0, 40), st.sampled_from([0.01, 0.1, 0.3, 0.5])
        ),
        max_size=300,
    ),
    st.integers(500, 3000),
)
def test_window_changes_mid_stream_keep_the_bounds(
    operations: list[tuple[str, int, float]], capacity_bytes: int
) -> None:
    c = LocalCache(capacity_bytes, admission="tinylfu", entry_overhead_bytes=8)
    value = bytes(50)
    for op, i, window in operations:
        if op == "put":
            c.put(k(i), value)
        elif op == "get":
            assert c.get(k(i)) in (None, value)
        else:
            c.reconfigure(window_fraction=window)
        assert c._window_bytes <= max(c._window_max, 0) or not c._window
        assert c._probation_bytes + c._protected_bytes <= c._main_max
        assert c.bytes_used + c.filter_bytes <= c.capacity_bytes
        assert c.bytes_used == sum(e[1] for seg in (c._window, c._probation, c._protected) for e in seg.values())
        assert len(c._index) == len(c._window) + len(c._probation) + len(c._protected)
