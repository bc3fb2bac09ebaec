"""What the routes share: the engine client, settings, metrics, tenancy (None: no auth, no ledger)
and heads, as ``polyray.server.build_server`` built them."""

from __future__ import annotations

from dataclasses import dataclass, field

from polyray.config import Settings
from polyray.engine.client import EngineClient
from polyray.heads.service import HeadService
from polyray.observability.metrics import Metrics
from polyray.tenancy.service import Tenancy
from polyray.types import ModelRef


@dataclass
class AppState:
    engine: EngineClient
    settings: Settings
    metrics: Metrics
    tenancy: Tenancy | None = None
    heads: HeadService | None = None  # with tenancy: heads live in the client database
    dims: dict[ModelRef, int] = field(init=False)  # per served version, read once for request checks

    def __post_init__(self) -> None:
        self.dims = {info.ref: info.dim for info in self.engine.models()}
