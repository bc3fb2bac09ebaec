"""``EngineClient``: all the API layer knows of the engine. ``Engine`` implements it in process;
the Ray Serve cluster client will be a second implementation."""

from __future__ import annotations

from typing import Any, Protocol

from polyray.engine.budget_fit import BudgetDecision
from polyray.engine.engine import ModelInfo
from polyray.types import EmbedRequest, EmbedResult, ModelRef


class EngineClient(Protocol):
    @property
    def ready(self) -> bool: ...

    async def start(self, warmup: bool = True) -> None: ...

    async def stop(self) -> None: ...

    async def embed(self, request: EmbedRequest) -> EmbedResult: ...

    def resolve(self, model: str) -> ModelRef:
        """``name`` or ``name@version`` to a served version; raises ``NotFound``."""
        ...

    def models(self) -> list[ModelInfo]: ...

    def cache_report(self) -> dict[str, Any] | None:
        """What the result cache holds and the tuner decided; None when the cache is off."""
        ...

    async def refit(self, model: str) -> BudgetDecision:
        """Re-measure a version's batch budget on its hardware and apply the decision."""
        ...
