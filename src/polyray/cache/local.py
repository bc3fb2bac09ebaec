"""The in-process tier: byte-bounded, O(1) get/put, per-entry TTL, optional admission filter.

Three admission policies, chosen (and changed at runtime) by the tuner:

- ``always``: plain LRU; every computed result is admitted.
- ``doorkeeper``: a key is admitted on its second miss within the doorkeeper's aging period.
  One-hit wonders (a large share of an embedding service's inputs) then never displace
  anything; the price is one extra miss for every key that does come back. Admitted keys go
  to a segmented LRU (probation, then protected after a hit), so a wave of newly admitted
  keys cannot flush keys that have proven themselves (measured: +2.6 points on Zipf).
- ``tinylfu``: W-TinyLFU (Einziger, Friedman, Manes, TOS 2017) behind the doorkeeper. A key
  seen a second time enters a small LRU *window*; an entry leaving the window enters the
  *main* segmented LRU only if a frequency sketch says it was used more often than main's
  eviction victim. The window keeps bursts of new items (hits soon after first use); the
  frequency filter keeps one-hit wonders and scans out of main. (Measured on the bench traces:
  the doorkeeper in front of the window adds 0.5-2 points of hit ratio over plain W-TinyLFU.)

Memory: ``capacity_bytes`` bounds everything the tier holds. Each entry is charged
``len(key) + len(value) + entry_overhead_bytes`` (the overhead approximates CPython's cost of
the dict node, the entry tuple and two bytes headers), and the admission filters' own bytes are
taken off the top, so a cache with a filter gets the same memory as one without.

TTL is sliding (expires ``ttl_s`` after the last access): with one TTL for all entries, LRU
order is then also expiry order and a hit under LRU with TTL is exactly "reuse distance below
capacity and re-reference interval within TTL", which is what the tuner models.

Not thread-safe: owned by the event loop.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

from polyray.cache.config import ADMISSIONS

Admission = Literal["always", "doorkeeper", "tinylfu"]

# CPython's cost of one entry beyond key and value bytes: OrderedDict node and hash slot (~100),
# the entry tuple (~64), the float expiry (24), minus sharing. An estimate; it is the same for
# every policy, so comparisons at equal memory are unaffected by its exact value.
ENTRY_OVERHEAD_BYTES = 160
# Size the filters for this many bytes per entry until the cache knows better (16-byte key,
# 384-d fp16 vector, overhead).
DEFAULT_EXPECTED_ENTRY_BYTES = 16 + 1 + 768 + ENTRY_OVERHEAD_BYTES
# Filters age (halve counts, clear the doorkeeper) after this many recorded accesses per entry
# of capacity: TinyLFU's "sample size" W = 10 C.
SAMPLE_FACTOR = 10
DEFAULT_WINDOW_FRACTION = 0.01
PROTECTED_FRACTION = 0.8
_M64 = (1 << 64) - 1
_HALVE = bytes(i >> 1 for i in range(256))
_COUNTER_MAX = 15  # 4-bit counters, as in TinyLFU; stored one per byte for speed
_UNSET: object = object()


def hash64(key: bytes) -> int:
    """64 uniform bits of a key, for the filters and for SHARDS sampling.

    Keys of 16 bytes or more are taken to be digests (``cache_key`` makes them): their first 8
    bytes are used as they are, which is what keeps the hot path cheap. Shorter keys (tests,
    simulations) go through the splitmix64 finalizer.
    """
    if len(key) >= 16:
        return int.from_bytes(key[:8], "little")
    return mix64(int.from_bytes(key, "little"))


def mix64(x: int) -> int:
    """splitmix64's finalizer: a bijection on 64-bit ints that spreads every input bit."""
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _pow2_at_least(n: float) -> int:
    return 1 << max(4, math.ceil(math.log2(max(n, 1.0))))


class BloomFilter:
    """Bit array with ``num_hashes`` probes by double hashing; ``add`` says whether it was there."""

    __slots__ = ("_bits", "_mask", "num_hashes")

    def __init__(self, num_bits: int, num_hashes: int = 4) -> None:
        num_bits = _pow2_at_least(num_bits)
        self._bits = bytearray(num_bits // 8)
        self._mask = num_bits - 1
        self.num_hashes = num_hashes

    @property
    def nbytes(self) -> int:
        return len(self._bits)

    def __contains__(self, h: int) -> bool:
        h1, h2 = h & 0xFFFFFFFF, (h >> 32) | 1
        bits, mask = self._bits, self._mask
        for i in range(self.num_hashes):
            idx = (h1 + i * h2) & mask
            if not bits[idx >> 3] & (1 << (idx & 7)):
                return False
        return True

    def add(self, h: int) -> bool:
        """Set the key's bits; True when all were already set (seen before, or a false positive)."""
        h1, h2 = h & 0xFFFFFFFF, (h >> 32) | 1
        bits, mask = self._bits, self._mask
        present = True
        for i in range(self.num_hashes):
            idx = (h1 + i * h2) & mask
            byte, bit = idx >> 3, 1 << (idx & 7)
            if not bits[byte] & bit:
                present = False
                bits[byte] |= bit
        return present

    def clear(self) -> None:
        self._bits = bytearray(len(self._bits))


class FrequencySketch:
    """TinyLFU's frequency estimate: a doorkeeper Bloom filter in front of a count-min sketch.

    The first access in a sample period only sets doorkeeper bits; later ones count in the
    sketch (4 rows, saturating at 15). After ``sample_size`` accesses every counter is halved and
    the doorkeeper cleared, so the estimate follows recent popularity rather than all history.
    """

    __slots__ = ("_additions", "_mask", "_table", "_width", "doorkeeper", "sample_size")

    ROWS = 4

    def __init__(self, expected_entries: int) -> None:
        self._width = _pow2_at_least(expected_entries)
        self._mask = self._width - 1
        self._table = bytearray(self.ROWS * self._width)
        self.sample_size = max(16, SAMPLE_FACTOR * expected_entries)
        self.doorkeeper = BloomFilter(8 * self.sample_size)
        self._additions = 0

    @property
    def nbytes(self) -> int:
        return len(self._table) + self.doorkeeper.nbytes

    def _slots(self, h: int) -> list[int]:
        h1, h2 = h & 0xFFFFFFFF, (h >> 32) | 1
        w, mask = self._width, self._mask
        return [r * w + ((h1 + r * h2 + r * r) & mask) for r in range(self.ROWS)]

    def increment(self, h: int) -> None:
        if self.doorkeeper.add(h):
            table = self._table
            for s in self._slots(h):
                if table[s] < _COUNTER_MAX:
                    table[s] += 1
        self._additions += 1
        if self._additions >= self.sample_size:
            self._table = self._table.translate(_HALVE)
            self.doorkeeper.clear()
            self._additions //= 2

    def estimate(self, h: int) -> int:
        table = self._table
        return min(table[s] for s in self._slots(h)) + (1 if h in self.doorkeeper else 0)


@dataclass(frozen=True)
class LocalStats:
    """Counters since construction, and the current shape; plain data for metrics."""

    num_hits: int
    num_misses: int
    num_expired: int  # misses that found an entry past its TTL (also counted in num_misses)
    num_evictions: int
    num_rejected: int  # puts the admission policy turned away
    num_entries: int
    bytes_used: int  # entries only
    filter_bytes: int  # admission filters, inside capacity_bytes
    capacity_bytes: int
    admission: str
    ttl_s: float | None
    window_fraction: float  # of the entries' memory, for tinylfu's window


# One entry: (value, charged bytes, expiry on the injected clock).
_Entry = tuple[bytes, int, float]
_Segment = OrderedDict[bytes, _Entry]


class LocalCache:
    """Byte-bounded in-process cache of encoded values; see the module docstring for policies."""

    def __init__(
        self,
        capacity_bytes: int,
        *,
        admission: Admission | str = "always",
        ttl_s: float | None = None,
        window_fraction: float = DEFAULT_WINDOW_FRACTION,
        clock: Callable[[], float] = time.monotonic,
        entry_overhead_bytes: int = ENTRY_OVERHEAD_BYTES,
        expected_entry_bytes: int = DEFAULT_EXPECTED_ENTRY_BYTES,
    ) -> None:
        self._clock = clock
        self.entry_overhead_bytes = entry_overhead_bytes
        self._expected_entry_bytes = max(1, expected_entry_bytes)
        # Segments. always uses _probation alone as its one LRU list; doorkeeper uses probation and
        # protected (segmented LRU); tinylfu all three.
        self._window: _Segment = OrderedDict()
        self._probation: _Segment = OrderedDict()
        self._protected: _Segment = OrderedDict()
        self._index: dict[bytes, _Segment] = {}
        self._window_bytes = 0
        self._probation_bytes = 0
        self._protected_bytes = 0
        self._sketch: FrequencySketch | None = None
        self._doorkeeper: BloomFilter | None = None
        self._doorkeeper_additions = 0
        self._doorkeeper_reset = 0
        self.num_hits = self.num_misses = self.num_expired = self.num_evictions = self.num_rejected = 0
        self.capacity_bytes = 0
        self.admission: Admission = "always"
        self.ttl_s: float | None = None
        self.window_fraction = window_fraction
        self._configure(capacity_bytes, admission, ttl_s, window_fraction)

    # -- configuration ---------------------------------------------------------------------
    def _configure(
        self,
        capacity_bytes: int,
        admission: str,
        ttl_s: float | None,
        window_fraction: float,
        keep_filters: bool = False,
    ) -> None:
        if admission not in ADMISSIONS:
            raise ValueError(f"admission {admission!r} is not one of {', '.join(ADMISSIONS)}")
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError("ttl_s must be > 0 or None")
        if not 0.0 < window_fraction < 1.0:
            raise ValueError("window_fraction must be in (0, 1)")
        self.capacity_bytes = capacity_bytes
        self.admission = cast(Admission, admission)
        self.ttl_s = ttl_s
        self.window_fraction = window_fraction
        if not keep_filters:
            expected_entries = max(1, capacity_bytes // self._expected_entry_bytes)
            self._sketch = FrequencySketch(expected_entries) if admission == "tinylfu" else None
            if admission == "doorkeeper":
                self._doorkeeper_reset = max(16, SAMPLE_FACTOR * expected_entries)
                self._doorkeeper = BloomFilter(8 * self._doorkeeper_reset)
                self._doorkeeper_additions = 0
            else:
                self._doorkeeper = None
        entries_bytes = max(0, capacity_bytes - self.filter_bytes)
        if admission == "tinylfu":
            self._window_max = int(entries_bytes * window_fraction)
            self._main_max = entries_bytes - self._window_max
            self._protected_max = int(self._main_max * PROTECTED_FRACTION)
        else:
            self._window_max = 0
            self._main_max = entries_bytes
            self._protected_max = int(self._main_max * PROTECTED_FRACTION) if admission == "doorkeeper" else 0

    def reconfigure(
        self,
        *,
        capacity_bytes: int | None = None,
        admission: Admission | str | None = None,
        ttl_s: float | object | None = _UNSET,
        window_fraction: float | None = None,
    ) -> None:
        """Change shape at runtime, keeping entries (most recent first) that still fit.

        The frequency filters are rebuilt empty when capacity or policy changes: their size
        follows capacity, and counts from another policy's period would mislead admission.
        A new TTL or window fraction alone keeps the filters and the entries' segments (the
        window's oldest entries move to main when it shrinks; main's oldest leave when it does).
        A new TTL applies from each entry's next access.
        """
        new_capacity = self.capacity_bytes if capacity_bytes is None else capacity_bytes
        new_admission = self.admission if admission is None else admission
        new_ttl = self.ttl_s if ttl_s is _UNSET else cast("float | None", ttl_s)
        new_window = self.window_fraction if window_fraction is None else window_fraction
        if (new_capacity, new_admission, new_ttl, new_window) == (
            self.capacity_bytes,
            self.admission,
            self.ttl_s,
            self.window_fraction,
        ):
            return
        if (new_capacity, new_admission) == (self.capacity_bytes, self.admission):
            self._configure(new_capacity, new_admission, new_ttl, new_window, keep_filters=True)
            self._rebalance()
            return
        # Recency order, least recent first: protected and probation are older than the window.
        entries = [*self._protected.items(), *self._probation.items(), *self._window.items()]
        for seg in (self._window, self._probation, self._protected):
            seg.clear()
        self._index.clear()
        self._window_bytes = self._probation_bytes = self._protected_bytes = 0
        self._configure(new_capacity, new_admission, new_ttl, new_window)
        # Everything goes to main (probation); the oldest leave first when it does not fit.
        budget = self._main_max
        kept: list[tuple[bytes, _Entry]] = []
        for key, entry in reversed(entries):
            if entry[1] > budget:
                self.num_evictions += 1
                continue
            budget -= entry[1]
            kept.append((key, entry))
        for key, entry in reversed(kept):
            self._probation[key] = entry
            self._index[key] = self._probation
            self._probation_bytes += entry[1]

    def _rebalance(self) -> None:
        """Fit the segments to their (new) maxima without losing more than the bytes demand."""
        while self._window_bytes > self._window_max and self._window:
            key, entry = self._window.popitem(last=False)
            self._window_bytes -= entry[1]
            self._probation[key] = entry
            self._index[key] = self._probation
            self._probation_bytes += entry[1]
        while self._protected_bytes > self._protected_max and self._protected:
            key, entry = self._protected.popitem(last=False)
            self._protected_bytes -= entry[1]
            self._probation[key] = entry
            self._index[key] = self._probation
            self._probation_bytes += entry[1]
        while self._probation_bytes + self._protected_bytes > self._main_max:
            seg = self._probation if self._probation else self._protected
            key, entry = seg.popitem(last=False)
            del self._index[key]
            if seg is self._probation:
                self._probation_bytes -= entry[1]
            else:
                self._protected_bytes -= entry[1]
            self.num_evictions += 1

    # -- the hot path ----------------------------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        """The value, or None (a miss). Records the access for admission frequency."""
        sketch = self._sketch
        if sketch is not None:
            sketch.increment(hash64(key))
        seg = self._index.get(key)
        if seg is None:
            self.num_misses += 1
            return None
        value, size, expires_s = seg[key]
        ttl_s = self.ttl_s
        if ttl_s is not None:
            now_s = self._clock()
            if now_s >= expires_s:
                self._remove(key)
                self.num_expired += 1
                self.num_misses += 1
                return None
            expires_s = now_s + ttl_s  # sliding: the TTL runs from the last access
        self.num_hits += 1
        if seg is self._probation and self.admission != "always":
            # Second use while in main: promote to protected; overflow goes back to probation.
            del seg[key]
            self._probation_bytes -= size
            self._protected[key] = (value, size, expires_s)
            self._index[key] = self._protected
            self._protected_bytes += size
            while self._protected_bytes > self._protected_max and self._protected:
                k, e = self._protected.popitem(last=False)
                self._protected_bytes -= e[1]
                self._probation[k] = e
                self._probation_bytes += e[1]
                self._index[k] = self._probation
        else:
            if ttl_s is not None:
                seg[key] = (value, size, expires_s)
            seg.move_to_end(key)
        return value

    def put(self, key: bytes, value: bytes) -> bool:
        """Offer a computed (or shared-tier) value; False when admission turned it away."""
        size = len(key) + len(value) + self.entry_overhead_bytes
        expires_s = math.inf if self.ttl_s is None else self._clock() + self.ttl_s
        seg = self._index.get(key)
        if seg is not None:  # refresh in place (a racing fill, or a newer value)
            self._remove(key)
        if self.ttl_s is not None:
            self._purge_expired()
        if self.admission == "tinylfu":
            return self._put_tinylfu(key, (value, size, expires_s))
        if size > self._main_max:
            self.num_rejected += 1
            return False
        if self.admission == "doorkeeper" and seg is None:
            door = self._doorkeeper
            assert door is not None
            seen = door.add(hash64(key))
            self._doorkeeper_additions += 1
            if self._doorkeeper_additions >= self._doorkeeper_reset:
                door.clear()
                self._doorkeeper_additions = 0
            if not seen:
                self.num_rejected += 1
                return False
        probation = self._probation
        while self._probation_bytes + self._protected_bytes + size > self._main_max:
            victim_seg = probation if probation else self._protected
            k, e = victim_seg.popitem(last=False)
            del self._index[k]
            if victim_seg is probation:
                self._probation_bytes -= e[1]
            else:
                self._protected_bytes -= e[1]
            self.num_evictions += 1
        probation[key] = (value, size, expires_s)
        self._index[key] = probation
        self._probation_bytes += size
        return True

    def _put_tinylfu(self, key: bytes, entry: _Entry) -> bool:
        size = entry[1]
        if size > self._main_max:
            self.num_rejected += 1
            return False
        sketch = self._sketch
        assert sketch is not None
        # The doorkeeper in front of the window: a key seen for the first time in this sample
        # period (its get() just set its doorkeeper bits, so its estimate is 1) is not admitted.
        # One-hit wonders then never push a returning key out of the window.
        if sketch.estimate(hash64(key)) < 2:
            self.num_rejected += 1
            return False
        self._window[key] = entry
        self._index[key] = self._window
        self._window_bytes += size
        admitted = True
        while self._window_bytes > self._window_max and self._window:
            cand_key, cand = self._window.popitem(last=False)
            self._window_bytes -= cand[1]
            del self._index[cand_key]
            if not self._admit_to_main(cand_key, cand) and cand_key == key:
                admitted = False
        return admitted

    def _admit_to_main(self, key: bytes, entry: _Entry) -> bool:
        """Window overflow: the candidate enters probation if it is used more than main's victim."""
        size = entry[1]
        if size > self._main_max:
            self.num_rejected += 1
            return False
        sketch = self._sketch
        assert sketch is not None
        if self._probation_bytes + self._protected_bytes + size > self._main_max:
            victim_seg = self._probation if self._probation else self._protected
            victim_key = next(iter(victim_seg))
            if sketch.estimate(hash64(key)) <= sketch.estimate(hash64(victim_key)):
                self.num_rejected += 1
                return False
            while self._probation_bytes + self._protected_bytes + size > self._main_max:
                victim_seg = self._probation if self._probation else self._protected
                k, e = victim_seg.popitem(last=False)
                del self._index[k]
                if victim_seg is self._probation:
                    self._probation_bytes -= e[1]
                else:
                    self._protected_bytes -= e[1]
                self.num_evictions += 1
        self._probation[key] = entry
        self._index[key] = self._probation
        self._probation_bytes += size
        return True

    def _remove(self, key: bytes) -> None:
        seg = self._index.pop(key)
        _, size, _ = seg.pop(key)
        if seg is self._window:
            self._window_bytes -= size
        elif seg is self._probation:
            self._probation_bytes -= size
        else:
            self._protected_bytes -= size

    def _purge_expired(self) -> None:
        """Drop expired entries from each segment's least recent end (sliding TTL keeps it ordered)."""
        now_s = self._clock()
        for seg in (self._window, self._probation, self._protected):
            while seg:
                key = next(iter(seg))
                if seg[key][2] > now_s:
                    break
                self._remove(key)
                self.num_expired += 1

    # -- inspection ------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        """Presence without counting an access (expired entries still count until touched)."""
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def bytes_used(self) -> int:
        return self._window_bytes + self._probation_bytes + self._protected_bytes

    @property
    def filter_bytes(self) -> int:
        sketch_bytes = self._sketch.nbytes if self._sketch is not None else 0
        door_bytes = self._doorkeeper.nbytes if self._doorkeeper is not None else 0
        return sketch_bytes + door_bytes

    def stats(self) -> LocalStats:
        return LocalStats(
            num_hits=self.num_hits,
            num_misses=self.num_misses,
            num_expired=self.num_expired,
            num_evictions=self.num_evictions,
            num_rejected=self.num_rejected,
            num_entries=len(self._index),
            bytes_used=self.bytes_used,
            filter_bytes=self.filter_bytes,
            capacity_bytes=self.capacity_bytes,
            admission=self.admission,
            ttl_s=self.ttl_s,
            window_fraction=self.window_fraction,
        )
