"""Every duration on /metrics is in seconds, Prometheus's base unit (issue 13, item 5).

The names are read from the registry itself, with every collector the server registers fed a
report, so a new duration metric named in ms (or with no unit) fails here, not on a dashboard.
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from polyray.observability.metrics import Metrics
from polyray.types import ModelRef, UsageRecord

MODEL = ModelRef("minilm", "1")

# Words in a metric name that say it measures a span of time. "s" after "per" is a rate
# (polyray_cache_expected_saving_per_s), not a duration.
_DURATION_WORDS = {"ms", "us", "ns", "s", "sec", "secs", "second", "seconds", "time", "duration", "latency", "wait"}


def _cache_report() -> dict[str, Any]:
    model = {
        "local_hits": 1,
        "shared_hits": 1,
        "misses": 1,
        "local": {"bytes_used": 10, "capacity_bytes": 100},
        "decision": {"expected_hit_ratio": 0.5, "expected_saving_per_s": 0.1},
    }
    return {
        "models": {str(MODEL): model},
        "deduplicated_texts": 0,
        "shared": {"num_errors": 0, "up": True, "num_reconnects": 0},
    }


def _tenancy_report() -> dict[str, int]:
    keys = (
        "ledger_write_failures",
        "ledger_spooled_batches",
        "ledger_replayed_batches",
        "ledger_recovered_batches",
        "ledger_spool_batches",
        "ledger_healthy",
        "directory_refresh_failures",
        "db_call_timeouts",
    )
    return dict.fromkeys(keys, 0)


def _fed_metrics() -> Metrics:
    """A registry with every family present: collectors watched, one batch and one charge observed."""
    metrics = Metrics()
    metrics.watch_cache(_cache_report)
    metrics.watch_tenancy(_tenancy_report)
    metrics.on_queue_depth(MODEL, 0)
    metrics.on_batch(MODEL, num_entries=2, cost_tokens=20, num_tokens=15, queue_ms=[250.0, 4.0], compute_ms=30.0)
    metrics.on_dropped(MODEL, "disconnected", 1)
    metrics.on_usage(UsageRecord("acme", "minilm", "1", 0.0, num_requests=1, num_tokens=15, compute_ns=30_000_000))
    return metrics


def _exported_names(metrics: Metrics) -> set[str]:
    """Sample names as a scrape sees them (counters with _total, histograms with _bucket/_sum/_count)."""
    text = metrics.render().decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def _suggests_duration(name: str) -> bool:
    words = name.split("_")
    return any(word in _DURATION_WORDS and (i == 0 or words[i - 1] != "per") for i, word in enumerate(words))


def test_every_duration_metric_is_named_in_seconds() -> None:
    names = _exported_names(_fed_metrics())
    stems = {
        n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count").removesuffix("_created") for n in names
    }
    durations = {n for n in stems if _suggests_duration(n)}
    # the check is not vacuous: the known duration families are among those it looked at
    assert {"polyray_queue_seconds", "polyray_inference_seconds", "polyray_client_compute_seconds_total"} <= durations
    wrong = sorted(n for n in durations if not n.endswith(("_seconds", "_seconds_total")))
    assert wrong == []
    assert not any("_ms" in n for n in names)  # the old millisecond names are gone


def test_durations_are_observed_in_seconds() -> None:
    """A 250 ms wait lands between the 0.2 s and 0.5 s buckets; a 30 ms batch sums to 0.03 s."""
    registry = _fed_metrics().registry
    label = {"model": str(MODEL)}

    def bucket(name: str, le: str) -> float | None:
        return registry.get_sample_value(f"{name}_bucket", {**label, "le": le})

    assert bucket("polyray_queue_seconds", "0.005") == 1.0  # the 4 ms wait
    assert bucket("polyray_queue_seconds", "0.2") == 1.0
    assert bucket("polyray_queue_seconds", "0.5") == 2.0  # the 250 ms wait
    assert registry.get_sample_value("polyray_queue_seconds_sum", label) == pytest.approx(0.254)
    assert registry.get_sample_value("polyray_inference_seconds_sum", label) == pytest.approx(0.03)
    charged = registry.get_sample_value("polyray_client_compute_seconds_total", {"client": "acme", "model": "minilm@1"})
    assert charged == pytest.approx(0.03)
