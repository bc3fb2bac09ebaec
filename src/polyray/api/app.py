"""The FastAPI app over parts already built: routes, the error table, the OpenAPI document.

Nothing is built here: ``polyray.server.build_server`` (the one composition root) builds the
tenancy, engine and heads and passes them in as an ``AppState``, with ``running``, the one
context that starts and stops them; the app's lifespan only enters it. Kept apart so the routes
can be served over parts a test built differently, and so the app has no say in start order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import Depends, FastAPI

from polyray import __version__
from polyray.api.body import strict_query
from polyray.api.errors import install_error_handlers
from polyray.api.openapi import install_openapi
from polyray.api.routes import admin, embeddings, heads, system, usage
from polyray.api.state import AppState


def create_app(state: AppState, running: Callable[[], AbstractAsyncContextManager[None]] | None = None) -> FastAPI:
    """Serve ``state``'s parts; the lifespan enters ``running()`` (None: the caller starts and
    stops the parts itself, as a test driving the app without a lifespan does)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if running is None:
            yield
            return
        async with running():
            yield

    app = FastAPI(title="polyray", version=__version__, lifespan=lifespan, dependencies=[Depends(strict_query)])
    app.state.polyray = state
    install_error_handlers(app)
    app.include_router(embeddings.router)
    app.include_router(system.router)
    app.include_router(usage.router)
    app.include_router(admin.router)
    app.include_router(heads.router)
    install_openapi(app)
    return app
