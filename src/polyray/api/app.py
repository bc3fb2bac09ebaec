"""The FastAPI app: routes, the error table, and the engine's lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from polyray import __version__
from polyray.api.errors import install_error_handlers
from polyray.api.routes import embeddings, system
from polyray.api.state import AppState
from polyray.config import Settings
from polyray.engine.client import EngineClient
from polyray.observability.metrics import Metrics


def create_app(
    engine: EngineClient, settings: Settings, metrics: Metrics | None = None, warmup: bool = True
) -> FastAPI:
    """The engine starts (loads and warms) with the app and drains on shutdown."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start(warmup=warmup)
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="polyray", version=__version__, lifespan=lifespan)
    app.state.polyray = AppState(engine, settings, metrics or Metrics())
    install_error_handlers(app)
    app.include_router(embeddings.router)
    app.include_router(system.router)
    return app
