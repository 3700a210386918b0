"""What the API answers when a request cannot be served: one JSON shape, documented codes.

Service functions raise the domain errors below; the app maps them, request validation and
database failures to ``{"detail": "..."}`` with a 4xx code. A 503 means that the database could
not be reached, nothing else.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import (
    DataError,
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from alphawatch.service.api.schemas import ErrorRead

log = logging.getLogger("alphawatch.api")


class ApiError(Exception):
    """A request the service cannot serve for a reason of its own: answered with ``status``.

    Every domain error derives from this one class and states its code once, here; one
    exception handler answers them all, so a service function never names an HTTP code.
    """

    status: ClassVar[int] = 400
    headers: ClassVar[dict[str, str] | None] = None


class NotFound(ApiError, LookupError):
    """The requested object does not exist (answered as 404)."""

    status = 404


class Conflict(ApiError, ValueError):
    """The request contradicts what is stored, e.g. a run name in use (answered as 409)."""

    status = 409


class Refused(ApiError, PermissionError):
    """The server's configuration or the token's scope forbids the request, e.g. a path outside
    the roots (403)."""

    status = 403


class Invalid(ApiError, ValueError):
    """A value that passed the schema but cannot be used, e.g. an unreadable path (422)."""

    status = 422


class Unauthenticated(ApiError, PermissionError):
    """No token, or an unknown, revoked or expired one, where one is needed (401)."""

    status = 401
    # RFC 9110: a 401 names the scheme that would be accepted.
    headers: ClassVar[dict[str, str] | None] = {"WWW-Authenticate": "Bearer"}


# Failures that mean the database could not be reached (answered 503), not a bad request.
UNREACHABLE = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)
UNAVAILABLE = "the database is unavailable; try again"

_DESCRIPTIONS = {
    400: "the request could not be parsed",
    401: "no token, or an unknown, revoked or expired one",
    403: "the token's scope or the server's configuration does not allow this",
    404: "no such run, checkpoint or layer",
    409: "conflicts with what is stored (or, for the gate with strict=true, the gate failed)",
    413: "the request body is larger than ALPHAWATCH_MAX_BODY_BYTES",
    422: "a parameter or body field is invalid",
    503: "the database cannot be reached; try again",
}


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error codes, each with the error body's schema."""
    # JSON named explicitly: on a route answering CSV, FastAPI would document errors as CSV.
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorRead"}}}
    return {
        code: {"model": ErrorRead, "description": _DESCRIPTIONS[code], "content": content}
        for code in codes
    }


def _answer(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE:
            methods |= (route.methods or set()) - {"HEAD"}
    return sorted(methods)


def install(app: FastAPI) -> None:
    """Map domain errors, validation errors and database failures to documented answers."""

    @app.exception_handler(ApiError)
    async def refused(_request: Request, exc: ApiError) -> JSONResponse:
        return _answer(exc.status, str(exc), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'query')}: {err.get('msg')}"
            for err in exc.errors()
        )
        return _answer(422, f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route matching the path only; a path
            # served by several routes (GET and POST /runs) supports all of theirs.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return _answer(exc.status_code, str(exc.detail), headers)

    @app.exception_handler(IntegrityError)
    async def conflict(_request: Request, exc: IntegrityError) -> JSONResponse:
        # Two writers raced past the same check (a run name registered twice at once).
        log.info("integrity error answered as 409: %s", exc.orig)
        return _answer(409, "the request conflicts with data stored meanwhile; read and retry")

    @app.exception_handler(DataError)
    async def bad_value(_request: Request, exc: DataError) -> JSONResponse:
        log.warning("data error answered as 422: %s", exc.orig)
        return _answer(422, "a value in the request cannot be stored or compared by the database")

    async def unreachable(_request: Request, exc: Exception) -> JSONResponse:
        log.error("database unreachable: %s", exc)
        return _answer(503, UNAVAILABLE, {"Retry-After": "5"})

    for unreachable_error in UNREACHABLE:
        app.add_exception_handler(unreachable_error, unreachable)

    @app.exception_handler(Exception)
    async def bug(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return _answer(500, "internal error; the server log has the details")
