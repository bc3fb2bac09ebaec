"""What an idle server's cache tuning says in the log: once, and not as if the cache were off."""

from __future__ import annotations

import logging

import pytest

from polyray.cache.config import CacheConfig
from polyray.cache.service import EngineCache
from polyray.types import ModelRef

REF = ModelRef("minilm", "1")


async def test_an_idle_retune_logs_its_decision_once_and_not_as_cache_off(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    cache = EngineCache(CacheConfig(retune_interval_s=60.0), [REF], clock=lambda: now[0])
    with caplog.at_level(logging.DEBUG, logger="polyray.cache.service"):
        for minute in range(1, 4):  # three retunes over a trickle of distinct texts: nothing to keep
            await cache.lookup(REF, [EngineCache.key(REF, "unit", f"text {minute} {i}") for i in range(5)])
            now[0] = 60.0 * minute
            decisions = await cache.retune()
            assert decisions[REF].capacity_bytes == 0
    records = [r for r in caplog.records if "retuned" in r.getMessage()]
    assert len(records) == 3
    assert [r.levelno for r in records] == [logging.INFO, logging.DEBUG, logging.DEBUG]
    message = records[0].getMessage()
    assert "no cache" not in message
    assert "local tier 0.0 MB" in message and "kept empty for now" in message
    await cache.stop()
