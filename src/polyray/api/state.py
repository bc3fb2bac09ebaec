"""What the routes share: the engine client, settings and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from polyray.config import Settings
from polyray.engine.engine import Engine
from polyray.observability.metrics import Metrics
from polyray.types import ModelRef


@dataclass
class AppState:
    engine: Engine
    settings: Settings
    metrics: Metrics
    dims: dict[ModelRef, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dims = {info.ref: info.dim for info in self.engine.models()}
