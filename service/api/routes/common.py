"""What every router shares: the session of a route, the path parameters, the result cache.

Reads use a session closed when the route returns. A write commits in the route, and drops
this process's kept answers, before it answers: the next request on any connection sees it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, suppress
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, TypeAdapter
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from alphawatch.service.api.auth import read_access
from alphawatch.service.api.cache import ResultCache
from alphawatch.service.api.errors import documented
from alphawatch.service.api.selections import INT32
from alphawatch.service.db import answers
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


# What a route's build makes: the answer as a dict, or its body already written (the long
# answers, by service/api/bodies.py, which tests compare with the validated path's bytes).
Build = Callable[[Session], dict[str, Any] | bytes]


def _compute(settings: Settings, build: Build, adapter: TypeAdapter[Any]) -> bytes:
    with session_scope(make_engine(settings.database_url, reads=True)) as session:
        answer = build(session)
    if isinstance(answer, bytes):
        return answer
    # Validated like any response model: a kept answer is as checked as a fresh one.
    return adapter.dump_json(adapter.validate_python(answer))


def _answer(
    settings: Settings,
    build: Build,
    adapter: TypeAdapter[Any],
    *,
    key: str,
    token: str | None,
    cache: ResultCache,
) -> tuple[bytes, str]:
    """The body of a miss in this process's memory, and where it came from: another API
    process's answer kept under the same token (``peer``), else computed here (``miss``) and
    kept for the others."""
    if token is not None:
        with (
            suppress(DBAPIError),
            session_scope(make_engine(settings.database_url, reads=True)) as session,
        ):
            kept = answers.get(session, key=key, token=token)
            if kept is not None:
                return kept, "peer"
    body = _compute(settings, build, adapter)
    if token is not None and cache.may_share(token, len(body)):
        # Sharing is a saving, never a failure: a database before migration 0016 has no
        # shared tier, and a store that fails leaves the answer to this process.
        with (
            suppress(DBAPIError),
            session_scope(make_engine(settings.database_url)) as session,
        ):
            answers.put(session, key=key, token=token, body=body)
    return body, "miss"


_ADAPTERS: dict[type[BaseModel], TypeAdapter[Any]] = {}
# Computations in progress, per event loop (a process serves one; tests may start several).
_FLIGHTS: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, int], asyncio.Future[bytes]]
] = weakref.WeakKeyDictionary()


async def cached(request: Request, model: type[BaseModel], build: Build) -> Response:
    """The JSON body ``build`` makes, from the result cache when the results have not changed.

    On a hit no thread, session or query is involved; on a miss ``build`` runs on the thread
    pool with its own session, and its body is kept under the version read before it ran.
    Concurrent misses of one URL at one version share one computation: when a checkpoint
    lands, every dashboard and CI job polling the run asks again at once, and all but the
    first wait for its body (``X-Cache: waited``) instead of computing the same answer. A miss
    first asks the tier the API processes share (``X-Cache: peer``), and what it computes is
    kept there.
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
    version, token = cache.version(), cache.token()
    loop = asyncio.get_running_loop()
    flights: dict[tuple[str, int], asyncio.Future[bytes]] = _FLIGHTS.setdefault(loop, {})
    flight = (key, version) if version is not None else None
    pending = flights.get(flight) if flight is not None else None
    if pending is not None:
        await asyncio.wait({pending})  # raises only if this request itself is cancelled
        if not pending.cancelled():
            error = pending.exception()
            if error is not None:
                raise error
            return Response(
                pending.result(), media_type="application/json", headers={"X-Cache": "waited"}
            )
        # The first asker went away before its answer was made: compute it here.
    future: asyncio.Future[bytes] | None = None
    if flight is not None and flight not in flights:
        future = flights[flight] = loop.create_future()
        # An error nobody else waited for is this request's alone: no "never retrieved" warning.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        computed, source = await run_in_threadpool(
            partial(
                _answer,
                settings,
                build,
                adapter,
                key=key,
                token=token,
                cache=cache,
            )
        )
    except asyncio.CancelledError:
        if future is not None:
            future.cancel()
        raise
    except Exception as exc:
        if future is not None:
            future.set_exception(exc)
        raise
    finally:
        if future is not None and flights.get(flight) is future:  # type: ignore[arg-type]
            del flights[flight]  # type: ignore[arg-type]
    if future is not None:
        future.set_result(computed)
    cache.put(key, version, computed)
    return Response(computed, media_type="application/json", headers={"X-Cache": source})
