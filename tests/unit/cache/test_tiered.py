"""In-flight dedup and the tiered lookup (with an in-memory stand-in for the shared tier)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from polyray.cache.codec import encode_vector
from polyray.cache.local import LocalCache
from polyray.cache.redis_tier import RedisTierStats
from polyray.cache.tiered import FillPolicy, TieredCache


class MemoryShared:
    """Stands in for RedisTier: a dict, optionally 'down'."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.down = False
        self.ttls: list[float] = []

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [None if self.down else self.data.get(k) for k in keys]

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl_s: float) -> bool:
        if self.down:
            return False
        self.ttls.append(ttl_s)
        self.data.update(items)
        return True

    async def close(self) -> None:
        pass

    def stats(self) -> RedisTierStats:
        return RedisTierStats(0, 0, 0, 0, 0, 0, 0, 0, not self.down, 0.0)


def vec(i: int) -> np.ndarray:
    v = np.random.default_rng(i).standard_normal(8).astype(np.float32)
    return v / np.linalg.norm(v)


async def test_lookup_goes_local_then_shared_then_miss() -> None:
    shared = MemoryShared()
    cache = TieredCache(LocalCache(1 << 20), shared, FillPolicy(shared_ttl_s=60.0))
    await cache.put_many([b"a" * 16], [vec(1)])
    shared.data[b"b" * 16] = encode_vector(vec(2))
    found = await cache.get_many([b"a" * 16, b"b" * 16, b"c" * 16])
    assert [tier for _, tier in found] == ["local", "shared", None]
    first, second = found[0][0], found[1][0]
    assert first is not None and second is not None
    assert np.allclose(first, vec(1), atol=1e-3) and np.allclose(second, vec(2), atol=1e-3)
    assert found[2][0] is None
    assert shared.ttls == [60.0] and b"a" * 16 in shared.data  # write-through
    again = await cache.get_many([b"b" * 16])
    assert again[0][1] == "local"  # the shared hit filled the local tier
    s = cache.stats()
    assert (s.num_lookups, s.num_local_hits, s.num_shared_hits, s.num_misses) == (4, 2, 1, 1)


async def test_update_policies_and_corrupt_shared_values() -> None:
    shared = MemoryShared()
    local_only = TieredCache(LocalCache(1 << 20), shared, FillPolicy(update="local_only"))
    await local_only.put_many([b"x" * 16], np.stack([vec(3)]))
    assert shared.data == {} and b"x" * 16 in local_only.local
    shared_only = TieredCache(LocalCache(1 << 20), shared, FillPolicy(update="shared_only"))
    await shared_only.put_many([b"y" * 16], [vec(4)])
    assert b"y" * 16 in shared.data and b"y" * 16 not in shared_only.local
    shared.data[b"z" * 16] = b"\x09garbage"
    found = await shared_only.get_many([b"z" * 16])
    assert found == [(None, None)] and shared_only.stats().num_corrupt == 1
    with pytest.raises(ValueError):
        await shared_only.put_many([b"q" * 16], [])


async def test_a_down_shared_tier_is_a_miss_not_an_error() -> None:
    shared = MemoryShared()
    cache = TieredCache(LocalCache(1 << 20), shared)
    shared.down = True
    await cache.put_many([b"a" * 16], [vec(1)])
    found = await cache.get_many([b"a" * 16, b"b" * 16])
    assert [tier for _, tier in found] == ["local", None]
