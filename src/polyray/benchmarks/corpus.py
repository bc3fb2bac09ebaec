"""Deterministic English corpus for benchmarks.

The corpus is generated, not downloaded, so every machine measures on exactly the same text. The
generator is the backends' (``backends.probe_corpus``: the load-time probe and fit measurement
use it with other seeds); benchmarks import production code, never the other way round.
"""

from __future__ import annotations

from polyray.backends.probe_corpus import make_corpus

__all__ = ["make_corpus"]
