"""Cache settings: one frozen dataclass, wired into ``Settings`` by the config module."""

from __future__ import annotations

from dataclasses import dataclass

ADMISSIONS = ("always", "doorkeeper", "tinylfu")
MIB = 1024 * 1024


@dataclass(frozen=True)
class CacheConfig:
    """What the operator fixes; the tuner chooses capacity, TTL and admission within it.

    ``local_max_bytes`` is a ceiling shared by all models' local tiers: the tuner never goes
    above it. ``redis_url`` None keeps the shared tier off (the embedded default).
    ``compute_price_per_s`` prices one second of model compute and ``storage_price_per_gib_hour``
    one GiB of cache memory held for an hour, in the same currency: the tuner trades one
    against the other.
    """

    enabled: bool = True
    local_max_bytes: int = 256 * MIB
    redis_url: str | None = None
    redis_ttl_s: float = 24 * 3600.0
    ttl_s: float | None = None  # local tier; None: entries leave only by eviction
    # Until the first retune. "always": a text's second request is a hit. The frequency filters
    # (doorkeeper, W-TinyLFU) turn the first repeat away, which costs more than it saves until the
    # tuner has seen enough of the stream to show one-hit wonders crowd the cache.
    admission: str = "always"
    # Defaults near cloud list prices: a CPU core at about $0.043 an hour, RAM at $0.005 per
    # GiB-hour. Only their ratio matters to the tuner.
    compute_price_per_s: float = 1.2e-5
    storage_price_per_gib_hour: float = 0.005
    retune_interval_s: float = 60.0
    sample_max_keys: int = 8192
    key_prefix: str = "polyray:v1:"
    redis_connect_timeout_s: float = 0.05
    redis_op_timeout_s: float = 0.1
    # Append every looked-up key ("t_s hexkey" per line) to this file: a trace of the live service
    # for ``bench/cache/run.py --trace``. Off by default.
    trace_path: str | None = None

    def __post_init__(self) -> None:
        if self.admission not in ADMISSIONS:
            raise ValueError(f"cache admission {self.admission!r} is not one of {', '.join(ADMISSIONS)}")
        if self.local_max_bytes < 0:
            raise ValueError("cache local_max_bytes must be >= 0")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ValueError("cache ttl_s must be > 0 (or unset for no expiry)")
        if self.redis_ttl_s <= 0:
            raise ValueError("cache redis_ttl_s must be > 0")
        if self.retune_interval_s <= 0:
            raise ValueError("cache retune_interval_s must be > 0")
        if self.sample_max_keys < 16:
            raise ValueError("cache sample_max_keys must be >= 16")
        if self.compute_price_per_s < 0 or self.storage_price_per_gib_hour < 0:
            raise ValueError("cache prices must be >= 0")
