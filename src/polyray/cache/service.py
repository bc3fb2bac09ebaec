"""The engine's cache: one tiered cache per model version, the tuner, and the periodic retune.

Per model version a ``LocalCache`` (sized by the tuner within ``local_max_bytes``) in front of
the shared ``RedisTier`` (one client for all versions; keys carry the version). Every looked-up
key feeds the tuner's SHARDS sampler; every ``retune_interval_s`` the tuner's miniature
simulations run in a worker thread and the decision (capacity, TTL, admission) is applied to
the local tiers on the event loop. ``report`` is what ``GET /v1/admin/cache`` and the metrics
show.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import IO, Any

import numpy as np

from polyray.cache.config import CacheConfig
from polyray.cache.keys import cache_key, key_hex
from polyray.cache.local import LocalCache
from polyray.cache.redis_tier import RedisTier
from polyray.cache.tiered import FillPolicy, Tier, TieredCache
from polyray.cache.tuner import CacheDecision, CacheTuner
from polyray.types import ModelRef

log = logging.getLogger(__name__)


class EngineCache:
    def __init__(
        self,
        config: CacheConfig,
        refs: Sequence[ModelRef],
        clock: Callable[[], float] = time.monotonic,
        shared: RedisTier | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        if shared is None and config.redis_url:
            shared = RedisTier(
                config.redis_url,
                key_prefix=config.key_prefix,
                connect_timeout_s=config.redis_connect_timeout_s,
                op_timeout_s=config.redis_op_timeout_s,
            )
        self.shared = shared
        per_model_bytes = config.local_max_bytes // max(1, len(refs))
        self.tiers = {
            ref: TieredCache(
                LocalCache(per_model_bytes, admission=config.admission, ttl_s=config.ttl_s, clock=clock),
                shared,
                FillPolicy(shared_ttl_s=config.redis_ttl_s),
            )
            for ref in refs
        }
        self.tuner: CacheTuner[ModelRef] = CacheTuner.from_config(config)
        self._trace: IO[str] | None = open(config.trace_path, "a", encoding="utf-8") if config.trace_path else None  # noqa: SIM115 - open for the service's life
        self._task: asyncio.Task[None] | None = None
        self.num_computed = 0
        self.num_deduplicated = 0
        self._logged_shapes: dict[ModelRef, tuple[int, float | None, str, float]] = {}

    @staticmethod
    def key(ref: ModelRef, normalization: str, text: str) -> bytes:
        return cache_key(ref, normalization, text)

    async def lookup(self, ref: ModelRef, keys: Sequence[bytes]) -> list[tuple[np.ndarray | None, Tier | None]]:
        now_s = self.clock()
        for key in keys:
            self.tuner.observe(ref, key, now_s)
        if self._trace is not None:
            self._trace.write("".join(f"{now_s:.6f} {key_hex(k)}\n" for k in keys))
        return await self.tiers[ref].get_many(keys)

    async def fill(self, ref: ModelRef, keys: Sequence[bytes], vectors: Sequence[np.ndarray]) -> None:
        await self.tiers[ref].put_many(keys, vectors)

    def note_compute(self, ref: ModelRef, compute_s: float, num_items: int) -> None:
        self.num_computed += num_items
        self.tuner.note_compute(ref, compute_s, num_items)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._retune_loop(), name="cache-tuner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.shared is not None:
            await self.shared.close()
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    async def retune(self) -> dict[ModelRef, CacheDecision]:
        """Snapshot on the loop, simulate in a thread, apply on the loop."""
        snapshot = self.tuner.snapshot(self.clock())
        decisions = await asyncio.to_thread(self.tuner.decide, snapshot)
        self.tuner.apply(decisions)
        for ref, decision in decisions.items():
            self.tiers[ref].local.reconfigure(
                capacity_bytes=decision.capacity_bytes,
                admission=decision.admission,
                ttl_s=decision.ttl_s,
                window_fraction=decision.window_fraction,
            )
            # Logged at INFO when the shape changes, not every retune: an idle server would
            # otherwise repeat the same line every minute.
            shape = (decision.capacity_bytes, decision.ttl_s, decision.admission, decision.window_fraction)
            changed = self._logged_shapes.get(ref) != shape
            self._logged_shapes[ref] = shape
            log.log(
                logging.INFO if changed else logging.DEBUG,
                "cache %s retuned: local tier %.1f MB, ttl %s, admission %s, expected hit ratio %.3f, saving %.3g/s (%s)",
                ref,
                decision.capacity_bytes / 1e6,
                "none" if decision.ttl_s is None else f"{decision.ttl_s:.0f} s",
                decision.admission,
                decision.expected_hit_ratio,
                decision.expected_saving_per_s,
                decision.reason,
            )
        return decisions

    async def _retune_loop(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.config.retune_interval_s))
            if self._trace is not None:
                self._trace.flush()
            if not self.tuner.due(self.clock()):
                continue
            try:
                await self.retune()
            except Exception:  # a failed retune keeps the current shape; serving goes on
                log.exception("cache retune failed; keeping the current settings")

    # -- what operators see --------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for ref, tiered in self.tiers.items():
            stats = tiered.stats()
            decision = self.tuner.decisions.get(ref)
            lookups = stats.num_lookups or 1
            models[str(ref)] = {
                "lookups": stats.num_lookups,
                "local_hits": stats.num_local_hits,
                "shared_hits": stats.num_shared_hits,
                "misses": stats.num_misses,
                "hit_ratio": (stats.num_local_hits + stats.num_shared_hits) / lookups,
                "local": asdict(stats.local),
                "decision": asdict(decision) if decision is not None else None,
            }
        return {
            "enabled": True,
            "retunes": self.tuner.num_retunes,
            "retune_interval_s": self.config.retune_interval_s,
            "local_max_bytes": self.config.local_max_bytes,
            "computed_texts": self.num_computed,
            "deduplicated_texts": self.num_deduplicated,
            "shared": asdict(self.shared.stats()) if self.shared is not None else None,
            "models": models,
        }
