"""EngineCache applies the tuner's decisions to the local tiers it serves from."""

from __future__ import annotations

import hashlib

from polyray.cache import sim
from polyray.cache.config import CacheConfig
from polyray.cache.service import EngineCache
from polyray.types import ModelRef

REF = ModelRef("minilm", "1")


async def test_a_retune_applies_the_chosen_window() -> None:
    cache = EngineCache(CacheConfig(local_max_bytes=500 * 945, admission="tinylfu", sample_max_keys=2048), [REF])
    cache.tuner.admissions = ("tinylfu",)  # so the choice is the window alone
    keys, times = sim.burst_trace(40_000, 20_000, 0.9, 0.5, first_gap_s=0.5, gap_growth=1.3, seed=8)
    for key, t in zip(keys.tolist(), times.tolist(), strict=True):
        cache.tuner.observe(REF, hashlib.blake2b(int(key).to_bytes(8, "little"), digest_size=16).digest(), t)
    cache.clock = lambda: float(times[-1])
    decision = (await cache.retune())[REF]
    assert decision.admission == "tinylfu" and decision.window_fraction >= 0.3
    local = cache.tiers[REF].local
    assert (local.capacity_bytes, local.admission) == (decision.capacity_bytes, "tinylfu")
    assert local.window_fraction == decision.window_fraction
    await cache.stop()
