"""What the engine reports as it works; metrics implement this, the engine imports no metrics library."""

from __future__ import annotations

from typing import Protocol

from polyray.types import ModelRef


class EngineObserver(Protocol):
    def on_queue_depth(self, model: ModelRef, num_entries: int) -> None: ...

    def on_batch(
        self,
        model: ModelRef,
        num_entries: int,
        cost_tokens: int,
        num_tokens: int,
        queue_ms: list[float],
        compute_ms: float,
    ) -> None: ...

    def on_dropped(self, model: ModelRef, reason: str, num_entries: int) -> None: ...


class NullObserver:
    def on_queue_depth(self, model: ModelRef, num_entries: int) -> None:
        pass

    def on_batch(
        self,
        model: ModelRef,
        num_entries: int,
        cost_tokens: int,
        num_tokens: int,
        queue_ms: list[float],
        compute_ms: float,
    ) -> None:
        pass

    def on_dropped(self, model: ModelRef, reason: str, num_entries: int) -> None:
        pass
