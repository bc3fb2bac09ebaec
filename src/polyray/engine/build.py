"""Wire an engine from settings: one backend per configured model version.

``polyray.server.build_server`` is the one caller in production: the engine is a part of the
server's composition, not a root of its own.
"""

from __future__ import annotations

from collections.abc import Mapping

from polyray.backends.base import Backend
from polyray.backends.factory import build_backend
from polyray.cache.service import EngineCache
from polyray.config import Settings
from polyray.engine.budget_fit import BudgetFitter, build_budget_fitter
from polyray.engine.engine import Engine
from polyray.engine.observer import EngineObserver
from polyray.tenancy.accounts import Accounts
from polyray.types import ModelRef


def build_engine(
    settings: Settings,
    observer: EngineObserver | None = None,
    accounts: Accounts | None = None,
    backends: Mapping[ModelRef, Backend] | None = None,
) -> Engine:
    """``backends``: built by the caller instead of from ``settings.models`` (a test's gated or
    slow dummy); everything else (policies, cache, fitters) still comes from ``settings``."""
    if backends is None:
        backends = {ModelRef(m.name, m.version): build_backend(m) for m in settings.models}
    fitters: dict[ModelRef, BudgetFitter] = {
        ModelRef(m.name, m.version): f for m in settings.models if (f := build_budget_fitter(m)) is not None
    }
    cache = EngineCache(settings.cache, list(backends)) if settings.cache.enabled else None
    return Engine(
        dict(backends),
        settings.batching,
        settings.server,
        observer,
        accounts=accounts,
        fairness=settings.fairness,
        cache=cache,
        fitters=fitters,
        admission=settings.admission,
    )
