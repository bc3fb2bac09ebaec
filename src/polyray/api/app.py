"""The FastAPI app: routes, the error table, and the engine's lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from polyray import __version__
from polyray.api.body import strict_query
from polyray.api.errors import install_error_handlers
from polyray.api.openapi import install_openapi
from polyray.api.routes import admin, embeddings, heads, system, usage
from polyray.api.state import AppState
from polyray.config import Settings
from polyray.engine.client import EngineClient
from polyray.heads.service import HeadService
from polyray.heads.store import HeadStore
from polyray.observability.metrics import Metrics
from polyray.tenancy.service import Tenancy


def create_app(
    engine: EngineClient,
    settings: Settings,
    metrics: Metrics | None = None,
    warmup: bool = True,
    tenancy: Tenancy | None = None,
) -> FastAPI:
    """The engine starts (loads and warms) with the app and drains on shutdown; then the usage
    ledger flushes, so the compute of every drained request is on record. With a client database
    the heads service starts after the engine (its training jobs embed through it) and stops first."""
    head_service = (
        HeadService(
            HeadStore(tenancy.db),
            engine,
            tenancy.accounts,
            dims={info.ref: info.dim for info in engine.models()},
        )
        if tenancy is not None
        else None
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if tenancy is not None:
            await tenancy.start()
        try:
            await engine.start(warmup=warmup)
            try:
                if head_service is not None:
                    await head_service.start()
                try:
                    yield
                finally:
                    if head_service is not None:
                        await head_service.stop()
            finally:
                await engine.stop()
        finally:
            if tenancy is not None:
                await tenancy.stop()

    app = FastAPI(title="polyray", version=__version__, lifespan=lifespan, dependencies=[Depends(strict_query)])
    app.state.polyray = AppState(engine, settings, metrics or Metrics(), tenancy, head_service)
    install_error_handlers(app)
    app.include_router(embeddings.router)
    app.include_router(system.router)
    app.include_router(usage.router)
    app.include_router(admin.router)
    app.include_router(heads.router)
    install_openapi(app)
    return app
