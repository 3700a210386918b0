"""Who is asking: bearer tokens and the scope each route needs.

Writes are authenticated by :class:`~alphawatch.service.api.guard.RequestGuard` before their
body is read; the dependencies here then check the scope (403) and, for reads on a server with
``read_requires_token``, authenticate the token themselves (401).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from alphawatch.service.api.errors import Refused, Unauthenticated
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import TokenInfo, TokenScope, authenticate
from alphawatch.settings import Settings

TOKEN_REQUIRED = (
    "a valid API token is required: Authorization: Bearer <token> (create one "
    "with `alphawatch token create NAME --scope read|write|admin`); revoked and "
    "expired tokens are refused"
)
CHALLENGE = dict(Unauthenticated.headers or {})

# Declares the scheme in the OpenAPI schema; the check itself is ours (401 with our message).
_scheme = HTTPBearer(auto_error=False, description="an alphawatch API token (aw_...)")


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if that is what it holds."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def identify(settings: Settings, token: str) -> TokenInfo | None:
    """The token's details, looked up now (so a revocation counts at once); None if refused."""
    with session_scope(make_engine(settings.database_url)) as session:
        return authenticate(session, token)


async def identity(request: Request) -> TokenInfo | None:
    """The bearer's token, from the request guard when it looked already, else from the DB."""
    state = request.scope.get("state") or {}
    if "token" in state:
        found: TokenInfo | None = state["token"]
        return found
    token = bearer(request.headers.get("authorization"))
    if token is None:
        return None
    settings: Settings = request.app.state.settings
    return await anyio.to_thread.run_sync(identify, settings, token)


async def read_access(request: Request) -> None:
    # async so that open reads pay nothing; a token lookup, when needed, runs off the loop.
    settings: Settings = request.app.state.settings
    if settings.read_requires_token and await identity(request) is None:
        raise Unauthenticated(TOKEN_REQUIRED)


def require(scope: TokenScope) -> Callable[..., Awaitable[TokenInfo]]:
    """A dependency that lets through tokens of ``scope`` or above: 401 without, 403 below."""

    async def check(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_scheme)],
    ) -> TokenInfo:
        found = await identity(request)
        if found is None:
            raise Unauthenticated(TOKEN_REQUIRED)
        if not found.scope.allows(scope):
            raise Refused(
                f"token {found.name!r} has scope '{found.scope}'; this needs '{scope}' or above"
            )
        return found

    return check
