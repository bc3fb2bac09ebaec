"""Prometheus metrics, defined once, on a registry per app (so tests can build many apps).

``Metrics`` is also the engine's observer: the engine calls it through ``EngineObserver`` and
never imports prometheus_client itself.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from polyray.tenancy.ledger import UsageRecord
from polyray.types import ModelRef

_MS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)
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
        self.queue_ms = Histogram(
            "polyray_queue_ms",
            "Time a text waited before its batch started",
            ["model"],
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.inference_ms = Histogram(
            "polyray_inference_ms", "Forward-pass wall time per batch", ["model"], buckets=_MS_BUCKETS, registry=r
        )
        self.dropped = Counter(
            "polyray_dropped_entries",
            "Texts dropped before or after compute, by reason",
            ["model", "reason"],
            registry=r,
        )
        self.tokens = Counter("polyray_tokens", "Real (unpadded) tokens computed", ["model"], registry=r)
        self.client_compute_s = Counter(
            "polyray_client_compute_seconds",
            "Compute-seconds charged to each client (batch shares plus tokenization)",
            ["client", "model"],
            registry=r,
        )
        self.client_requests = Counter(
            "polyray_client_requests", "Answered requests per client", ["client", "model"], registry=r
        )
        self.client_tokens = Counter("polyray_client_tokens", "Input tokens per client", ["client", "model"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def on_usage(self, rec: UsageRecord) -> None:
        """Every usage record the engine charges (the ledger gets the same records)."""
        model = f"{rec.model}@{rec.version}"
        if rec.compute_ns:
            self.client_compute_s.labels(rec.client, model).inc(rec.compute_ns / 1e9)
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
        self.inference_ms.labels(label).observe(compute_ms)
        self.tokens.labels(label).inc(num_tokens)
        hist = self.queue_ms.labels(label)
        for waited in queue_ms:
            hist.observe(waited)

    def on_dropped(self, model: ModelRef, reason: str, num_entries: int) -> None:
        self.dropped.labels(str(model), reason).inc(num_entries)
