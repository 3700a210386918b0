"""The REST API and the dashboard's web server: ``create_app(settings)``."""

from __future__ import annotations

import functools
import gc
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

from alphawatch import __version__
from alphawatch.dashboard import STATIC_DIR
from alphawatch.service.api import errors
from alphawatch.service.api.auth import identify
from alphawatch.service.api.cache import ResultCache
from alphawatch.service.api.guard import RequestGuard
from alphawatch.service.api.hosts import allowed_hosts
from alphawatch.service.api.openapi import with_read_security
from alphawatch.service.api.routes import ROUTERS, health_router
from alphawatch.service.api.vocabulary import vocabulary_router
from alphawatch.settings import Settings

log = logging.getLogger("alphawatch.api")


class _Static(StaticFiles):
    """Static files with ``.js`` always sent as JavaScript, whatever the host's MIME table says
    (Windows registries often say text/plain): browsers refuse such module scripts."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        if isinstance(response, FileResponse) and str(full_path).endswith(".js"):
            response.headers["content-type"] = "text/javascript; charset=utf-8"
        return response


@functools.cache
def _freeze_heap() -> None:
    """Leave what the process holds once the app is built out of every later garbage
    collection, once per process.

    Reads of many rows allocate a tuple per row and trigger the cyclic collector, whose oldest
    generation then scans every object the process holds, the imported libraries' included:
    half of a block-range trend's CPU (35,000 rows: 115 ms, 55 ms with the heap frozen) and
    a third of a long run's heatmap. What is built at start lives as long as the process.
    """
    gc.freeze()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    _freeze_heap()
    # The limiter belongs to the event loop, so it is sized here, where the loop runs.
    settings: Settings = app.state.settings
    anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
    cache: ResultCache | None = app.state.cache
    if cache is not None:
        cache.start()
    try:
        yield
    finally:
        if cache is not None:
            await anyio.to_thread.run_sync(cache.stop)


def create_app(
    settings: Settings | None = None,
    *,
    liveness: Callable[[], str | None] | None = None,
    bound_host: str | None = None,
) -> FastAPI:
    """Build the API + dashboard application; settings are read here, never at import time.

    ``liveness``, when given, is asked by ``/health``: None while what it watches (the worker
    thread of ``alphawatch up``) is fine, else the reason, and ``/health`` answers 503.
    ``bound_host``, the host the server binds, makes the default of the allowed ``Host``
    headers (``ALPHAWATCH_ALLOWED_HOSTS``; see ``hosts.py``).
    """
    settings = settings or Settings()
    app = FastAPI(
        title="alphawatch",
        version=__version__,
        lifespan=_lifespan,
        description="Heavy-tailed spectral health of models in training: per-layer "
        "power-law alpha, fit quality, traps and robust trends.",
    )
    app.state.settings = settings
    app.state.liveness = liveness
    # Read responses kept until the database announces new results (PostgreSQL's NOTIFY);
    # SQLite cannot announce, so its processes always read the database.
    app.state.cache = (
        ResultCache(settings.database_url, max_bytes=int(settings.api_cache_mb * 2**20))
        if settings.api_cache_mb > 0 and settings.database_url.startswith("postgresql")
        else None
    )

    errors.install(app)
    app.add_middleware(
        RequestGuard,
        max_body_bytes=settings.max_body_bytes,
        identify=functools.partial(identify, settings),
        hosts=allowed_hosts(settings.allowed_hosts, bound_host),
    )
    app.include_router(health_router)
    for api in ROUTERS:
        app.include_router(api)
    app.include_router(vocabulary_router)

    @app.get("/", include_in_schema=False, response_model=None)
    def index() -> FileResponse | HTMLResponse:
        page = STATIC_DIR / "index.html"
        if page.exists():
            return FileResponse(page, media_type="text/html")
        return HTMLResponse("<h1>alphawatch</h1><p>API docs at <a href='/docs'>/docs</a></p>")

    app.mount("/static", _Static(directory=STATIC_DIR), name="static")
    if settings.read_requires_token:
        with_read_security(app)
    return app
