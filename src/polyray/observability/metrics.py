"""Prometheus metrics, defined once, on a registry per app (so tests can build many apps).

``Metrics`` is also the engine's observer: the engine calls it through ``EngineObserver`` and
never imports prometheus_client itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from polyray.types import ModelRef, UsageRecord

# Durations are exported in seconds, Prometheus's base unit, so rate()/histogram_quantile() read
# them as any other exporter's: 0.5 ms to 30 s.
_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_FRACTION_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "polyray_requests",
            "HTTP API requests by route and outcome (ok or an error kind)",
            ["route", "outcome"],
            registry=r,
        )
        self.queue_depth = Gauge("polyray_queue_depth", "Texts waiting to be batched", ["model"], registry=r)
        self.batch_size = Histogram(
            "polyray_batch_size", "Texts per executed batch", ["model"], buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "polyray_batch_tokens",
            "Padded tokens per batch (longest x count)",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.padding_fraction = Histogram(
            "polyray_batch_padding_fraction",
            "Share of a batch's positions that are padding",
            ["model"],
            buckets=_FRACTION_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "polyray_queue_seconds",
            "Time a text waited before its batch started, in seconds",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "polyray_inference_seconds",
            "Forward-pass wall time per batch, in seconds",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.dropped = Counter(
            "polyray_dropped_entries",
            "Texts dropped before or after compute, by reason",
            ["model", "reason"],
            registry=r,
        )
        self.tokens = Counter("polyray_tokens", "Real (unpadded) tokens computed", ["model"], registry=r)
        self.client_compute_seconds = Counter(
            "polyray_client_compute_seconds",
            "Compute-seconds charged to each client (batch shares plus tokenization); exported as _seconds_total",
            ["client", "model"],
            registry=r,
        )
        self.client_requests = Counter(
            "polyray_client_requests", "Answered requests per client", ["client", "model"], registry=r
        )
        self.client_tokens = Counter(
            "polyray_client_tokens", "Input tokens per client", ["client", "model"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def watch_cache(self, report: Callable[[], dict[str, Any] | None]) -> None:
        """Export the cache's counters and the tuner's decision, read at scrape time."""
        self.registry.register(_CacheCollector(report))

    def watch_tenancy(self, report: Callable[[], dict[str, int]]) -> None:
        """Export the usage ledger's and the client directory's failure counters, read at scrape time."""
        self.registry.register(_TenancyCollector(report))

    def on_usage(self, rec: UsageRecord) -> None:
        """Every usage record the engine charges (the ledger gets the same records)."""
        model = f"{rec.model}@{rec.version}"
        if rec.compute_ns:
            self.client_compute_seconds.labels(rec.client, model).inc(rec.compute_ns / 1e9)
        if rec.num_requests:
            self.client_requests.labels(rec.client, model).inc(rec.num_requests)
            self.client_tokens.labels(rec.client, model).inc(rec.num_tokens)

    # -- EngineObserver ------------------------------------------------------------------
    def on_queue_depth(self, model: ModelRef, num_entries: int) -> None:
        self.queue_depth.labels(str(model)).set(num_entries)

    def on_batch(
        self,
        model: ModelRef,
        num_entries: int,
        cost_tokens: int,
        num_tokens: int,
        queue_ms: list[float],
        compute_ms: float,
    ) -> None:
        label = str(model)
        self.batch_size.labels(label).observe(num_entries)
        self.batch_tokens.labels(label).observe(cost_tokens)
        self.padding_fraction.labels(label).observe(1.0 - num_tokens / cost_tokens if cost_tokens else 0.0)
        self.inference_seconds.labels(label).observe(compute_ms / 1000.0)
        self.tokens.labels(label).inc(num_tokens)
        hist = self.queue_seconds.labels(label)
        for waited_ms in queue_ms:
            hist.observe(waited_ms / 1000.0)

    def on_dropped(self, model: ModelRef, reason: str, num_entries: int) -> None:
        self.dropped.labels(str(model), reason).inc(num_entries)


_TENANCY_METRICS = (
    # (report key, metric name, help, counter?)
    ("ledger_write_failures", "polyray_ledger_write_failures", "Usage batch writes that failed or timed out", True),
    (
        "ledger_spooled_batches",
        "polyray_ledger_spooled_batches",
        "Usage batches that missed their first write and waited in the spool",
        True,
    ),
    (
        "ledger_replayed_batches",
        "polyray_ledger_replayed_batches",
        "Usage batches written from the spool (after an outage or a restart)",
        True,
    ),
    (
        "ledger_recovered_batches",
        "polyray_ledger_recovered_batches",
        "Usage batches rebuilt at start from the journal of a killed process",
        True,
    ),
    ("ledger_spool_batches", "polyray_ledger_spool_batches", "Usage batches in the spool, not yet written", False),
    ("ledger_healthy", "polyray_ledger_up", "1 while the ledger's last write reached the database", False),
    (
        "directory_refresh_failures",
        "polyray_directory_refresh_failures",
        "Client directory refreshes that failed (serving on the last snapshot)",
        True,
    ),
    ("db_call_timeouts", "polyray_db_call_timeouts", "Database calls cut at their deadline (db_timeout_s)", True),
)


class _TenancyCollector(Collector):
    def __init__(self, report: Callable[[], dict[str, int]]) -> None:
        self._report = report

    def collect(self) -> Iterator[Metric]:
        report = self._report()
        for key, name, doc, is_counter in _TENANCY_METRICS:
            family = CounterMetricFamily(name, doc) if is_counter else GaugeMetricFamily(name, doc)
            family.add_metric([], report[key])
            yield family


class _CacheCollector(Collector):
    def __init__(self, report: Callable[[], dict[str, Any] | None]) -> None:
        self._report = report

    def collect(self) -> Iterator[Metric]:
        report = self._report()
        if report is None:
            return
        lookups = CounterMetricFamily(
            "polyray_cache_lookups", "Cache lookups by the tier that answered", labels=["model", "tier"]
        )
        local_bytes = GaugeMetricFamily("polyray_cache_local_bytes", "Bytes held by the local tier", labels=["model"])
        capacity = GaugeMetricFamily(
            "polyray_cache_local_capacity_bytes", "Local tier capacity (tuner's choice)", labels=["model"]
        )
        expected = GaugeMetricFamily(
            "polyray_cache_expected_hit_ratio", "Hit ratio the tuner expects", labels=["model"]
        )
        saving = GaugeMetricFamily(
            "polyray_cache_expected_saving_per_s",
            "Compute cost the tuner expects the cache to save, per second",
            labels=["model"],
        )
        for model, m in report["models"].items():
            lookups.add_metric([model, "local"], m["local_hits"])
            lookups.add_metric([model, "shared"], m["shared_hits"])
            lookups.add_metric([model, "miss"], m["misses"])
            local_bytes.add_metric([model], m["local"]["bytes_used"])
            capacity.add_metric([model], m["local"]["capacity_bytes"])
            if m["decision"] is not None:
                expected.add_metric([model], m["decision"]["expected_hit_ratio"])
                saving.add_metric([model], m["decision"]["expected_saving_per_s"])
        yield from (lookups, local_bytes, capacity, expected, saving)
        dedup = CounterMetricFamily(
            "polyray_cache_deduplicated", "Texts that joined an identical in-flight computation"
        )
        dedup.add_metric([], report["deduplicated_texts"])
        yield dedup
        shared = report["shared"]
        if shared is not None:
            errors = CounterMetricFamily("polyray_cache_redis_errors", "Redis calls that failed (served without it)")
            errors.add_metric([], shared["num_errors"])
            up = GaugeMetricFamily("polyray_cache_redis_up", "1 while the shared tier is reachable")
            up.add_metric([], 1.0 if shared["up"] else 0.0)
            reconnects = CounterMetricFamily("polyray_cache_redis_reconnects", "Shared tier down -> up transitions")
            reconnects.add_metric([], shared["num_reconnects"])
            yield from (errors, up, reconnects)
