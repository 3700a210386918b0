"""What every router shares: the session of a route, the path parameters, the result cache.

Reads use a session closed when the route returns. A write commits in the route, and drops
this process's kept answers, before it answers: the next request on any connection sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, TypeAdapter
from sqlalchemy.orm import Session

from alphawatch.service.api.auth import read_access
from alphawatch.service.api.cache import ResultCache
from alphawatch.service.api.errors import documented
from alphawatch.service.api.selections import INT32
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from alphawatch.vocabulary import MAX_STEP


def api_router() -> APIRouter:
    """A router of /api/v1: every route of it needs read access (a token where reads need one)."""
    return APIRouter(prefix="/api/v1", dependencies=[Depends(read_access)])


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(make_engine(request.app.state.settings.database_url)) as session:
        yield session


# scope="function": the session ends when the route returns, before the answer is sent.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


class CsvResponse(PlainTextResponse):
    media_type = "text/csv"


# Database integer ranges: a larger id or step is a bad request, not a database error.
RunId = Annotated[int, PathParam(ge=1, le=INT32, description="run id")]
StepPath = Annotated[int, PathParam(ge=0, le=MAX_STEP, description="training step")]
LayerName = Annotated[str, PathParam(max_length=512, description="layer name")]
Offset = Annotated[int, Query(ge=0, le=MAX_STEP)]

READ_ERRORS = documented(404, 422, 503)


def unit_of_work(request: Request) -> AbstractContextManager[Session]:
    """A session that commits when its block ends: a write route answers after that."""
    return session_scope(make_engine(request.app.state.settings.database_url))


def written(request: Request) -> None:
    # Committed already; other API processes hear of it through NOTIFY.
    cache: ResultCache | None = request.app.state.cache
    if cache is not None:
        cache.invalidate()


def _compute(
    settings: Settings, build: Callable[[Session], dict[str, Any]], adapter: TypeAdapter[Any]
) -> bytes:
    with session_scope(make_engine(settings.database_url)) as session:
        answer = build(session)
    # Validated like any response model: a kept answer is as checked as a fresh one.
    return adapter.dump_json(adapter.validate_python(answer))


_ADAPTERS: dict[type[BaseModel], TypeAdapter[Any]] = {}


async def cached(
    request: Request, model: type[BaseModel], build: Callable[[Session], dict[str, Any]]
) -> Response:
    """The JSON body ``build`` makes, from the result cache when the results have not changed.

    On a hit no thread, session or query is involved; on a miss ``build`` runs on the thread
    pool with its own session, and its body is kept under the version read before it ran.
    """
    settings: Settings = request.app.state.settings
    cache: ResultCache | None = request.app.state.cache
    adapter = _ADAPTERS.get(model) or _ADAPTERS.setdefault(model, TypeAdapter(model))
    if cache is None:
        return Response(
            await run_in_threadpool(_compute, settings, build, adapter),
            media_type="application/json",
        )
    key = f"{request.url.path}?{sorted(request.query_params.multi_items())}"
    body = cache.get(key)
    if body is not None:
        return Response(body, media_type="application/json", headers={"X-Cache": "hit"})
    version = cache.version()
    body = await run_in_threadpool(_compute, settings, build, adapter)
    cache.put(key, version, body)
    return Response(body, media_type="application/json", headers={"X-Cache": "miss"})
