"""Local tier, then shared tier, then the caller computes: one object the engine talks to.

Values travel encoded (``codec``) between the tiers, so a shared-tier hit fills the local tier
without re-encoding, and callers only ever see float32 vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from polyray.cache.codec import CodecError, decode_vector, encode_vector
from polyray.cache.local import LocalCache, LocalStats
from polyray.cache.redis_tier import RedisTierStats

Tier = Literal["local", "shared"]


class SharedTier(Protocol):
    """What ``TieredCache`` needs of a shared tier (``RedisTier``); never raises on a failure."""

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl_s: float) -> bool: ...

    async def close(self) -> None: ...

    def stats(self) -> RedisTierStats: ...


@dataclass(frozen=True)
class FillPolicy:
    """Where results go.

    ``write_through`` (default): computed results go to both tiers. ``local_only``: the shared
    tier is read but never written by this process (e.g. a canary replica). ``shared_only``:
    computed results go to the shared tier alone (the local tier still fills from shared hits if
    ``fill_local_on_shared_hit``), for replicas whose local memory is better spent elsewhere.
    """

    update: Literal["write_through", "local_only", "shared_only"] = "write_through"
    fill_local_on_shared_hit: bool = True
    shared_ttl_s: float = 24 * 3600.0


@dataclass(frozen=True)
class TieredStats:
    num_lookups: int
    num_local_hits: int
    num_shared_hits: int
    num_misses: int
    num_corrupt: int  # shared values the codec could not read (treated as misses)
    local: LocalStats
    shared: RedisTierStats | None


class TieredCache:
    def __init__(self, local: LocalCache, shared: SharedTier | None = None, policy: FillPolicy | None = None) -> None:
        self.local = local
        self.shared = shared
        self.policy = policy or FillPolicy()
        self.num_lookups = self.num_local_hits = self.num_shared_hits = self.num_misses = self.num_corrupt = 0

    async def get_many(self, keys: Sequence[bytes]) -> list[tuple[np.ndarray | None, Tier | None]]:
        """Per key: (vector, tier that answered) or (None, None) for a miss in every tier."""
        self.num_lookups += len(keys)
        out: list[tuple[np.ndarray | None, Tier | None]] = [(None, None)] * len(keys)
        missing: list[int] = []
        for i, key in enumerate(keys):
            raw = self.local.get(key)
            if raw is not None:
                out[i] = (decode_vector(raw), "local")  # we wrote it: a decode error is a bug
                self.num_local_hits += 1
            else:
                missing.append(i)
        if missing and self.shared is not None:
            values = await self.shared.get_many([keys[i] for i in missing])
            for i, raw in zip(missing, values, strict=True):
                if raw is None:
                    continue
                try:
                    vector = decode_vector(raw)
                except CodecError:
                    self.num_corrupt += 1
                    continue
                out[i] = (vector, "shared")
                self.num_shared_hits += 1
                if self.policy.fill_local_on_shared_hit:
                    self.local.put(keys[i], raw)
        self.num_misses += sum(1 for v, _ in out if v is None)
        return out

    async def put_many(self, keys: Sequence[bytes], vectors: Sequence[np.ndarray] | np.ndarray) -> None:
        """Fill after compute, per the update policy. Never raises for a shared-tier failure."""
        if len(keys) != len(vectors):
            raise ValueError(f"put_many got {len(keys)} keys and {len(vectors)} vectors")
        encoded = [encode_vector(v) for v in vectors]
        if self.policy.update != "shared_only":
            for key, raw in zip(keys, encoded, strict=True):
                self.local.put(key, raw)
        if self.shared is not None and self.policy.update != "local_only":
            await self.shared.set_many(list(zip(keys, encoded, strict=True)), self.policy.shared_ttl_s)

    def stats(self) -> TieredStats:
        return TieredStats(
            num_lookups=self.num_lookups,
            num_local_hits=self.num_local_hits,
            num_shared_hits=self.num_shared_hits,
            num_misses=self.num_misses,
            num_corrupt=self.num_corrupt,
            local=self.local.stats(),
            shared=self.shared.stats() if self.shared is not None else None,
        )

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()
