"""Plain data that crosses layers: requests into the engine, results and usage out of it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, order=True)
class ModelRef:
    """One immutable version of a model, written ``name@version``."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class EmbedRequest:
    """What the engine needs: texts, the model asked for, and when the caller stops caring.

    ``deadline_s`` is on the engine's monotonic clock; ``None`` means the engine's default.
    ``truncate`` False makes over-long texts an error instead of cutting them.
    """

    model: str
    texts: tuple[str, ...]
    client: str | None = None
    deadline_s: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class Usage:
    """What one request cost: tokens it fed the model and where its time went."""

    num_tokens: int
    queue_ms: float
    inference_ms: float
    num_batches: int
    compute_ns: int = 0  # compute charged to the caller: its batch shares plus its tokenization
    num_cached: int = 0  # texts answered from a cache (charged no compute)


@dataclass(frozen=True)
class EmbedResult:
    model: ModelRef
    vectors: np.ndarray  # float32, shape (len(texts), dim), row i answers texts[i]
    usage: Usage
    truncated: tuple[int, ...] = field(default=())  # indices of texts cut to the model's maximum


@dataclass(frozen=True)
class UsageRecord:
    """Usage to add to a client's account: one answered request, or a compute charge alone.

    The engine charges compute where it is measured (per batch, per tokenization) with
    ``num_requests=0`` records, so compute is charged even for a request whose caller left, and
    the charged total equals the measured total exactly. Here, not in ``tenancy``, because the
    usage ledger and the metrics both consume the same records and neither should import the other.
    """

    client: str
    model: str
    version: str
    at_wall_s: float
    num_requests: int = 0
    num_texts: int = 0
    num_cached: int = 0
    num_tokens: int = 0
    compute_ns: int = 0
