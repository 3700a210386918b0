"""The request guard: what is refused before a route sees a request, or reads its body.

FastAPI reads and parses a body before it runs a route's dependencies, so a token check in a
dependency comes after the body is in memory. The guard answers first:

* a ``Host`` header the server is not known by: 400 (DNS rebinding; see ``hosts.py``);
* NUL bytes in the path or the query: 422 (no database stores them; they reached PostgreSQL
  as errors that looked like an outage);
* a write (any method but GET, HEAD, OPTIONS) without a known, unrevoked, unexpired token:
  401 before a byte of the body is read. The token found is left in the request state, so the
  route's scope check does not look it up again;
* a declared body larger than ``max_body_bytes``: 413 without reading it; a chunked body is
  counted as it arrives and refused at the limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio.to_thread
from fastapi import HTTPException
from pydantic_core import to_json
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from alphawatch.service.api.auth import CHALLENGE, TOKEN_REQUIRED, bearer
from alphawatch.service.api.errors import UNAVAILABLE, UNREACHABLE
from alphawatch.service.api.hosts import AllowedHosts
from alphawatch.service.db.tokens import TokenInfo

log = logging.getLogger("alphawatch.api")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _nul_in(scope: Scope) -> str | None:
    if "\x00" in scope.get("path", ""):
        return "the path contains a NUL byte"
    query: bytes = scope.get("query_string", b"")
    if b"\x00" in query or b"%00" in query.lower():
        return "the query contains a NUL byte"
    return None


async def _answer(
    send: Send,
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
    *,
    unread_body: bool = True,
) -> None:
    body = to_json({"detail": detail})
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if unread_body:
        # The body stays in the socket: the connection cannot carry another request.
        raw.append((b"connection", b"close"))
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: NUL bytes, body size and write authentication, before the app runs.

    Args:
        app: the application guarded.
        max_body_bytes: the largest body accepted.
        identify: token -> its details, or None when it is unknown, revoked or expired
            (called on a worker thread: it reads the database).
        hosts: the ``Host`` headers answered; None: any.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        identify: Callable[[str], TokenInfo | None],
        hosts: AllowedHosts | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.identify = identify
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        unread_body = "transfer-encoding" in headers or headers.get("content-length", "0") != "0"
        if self.hosts is not None and not self.hosts.allows(headers.get("host")):
            shown = repr(headers.get("host", ""))[:120]
            await _answer(
                send,
                400,
                f"invalid Host header {shown}: this server answers "
                f"{self.hosts.describe()} only (ALPHAWATCH_ALLOWED_HOSTS; "
                "a guard against DNS rebinding)",
                unread_body=unread_body,
            )
            return
        problem = _nul_in(scope)
        if problem is not None:
            await _answer(send, 422, f"invalid request: {problem}", unread_body=unread_body)
            return
        if scope["method"] not in SAFE_METHODS:
            token = bearer(headers.get("authorization"))
            try:
                found = (
                    await anyio.to_thread.run_sync(self.identify, token)
                    if token is not None
                    else None
                )
            except UNREACHABLE as exc:
                log.error("database unreachable: %s", exc)
                await _answer(send, 503, UNAVAILABLE, {"Retry-After": "5"}, unread_body=unread_body)
                return
            if found is None:
                await _answer(send, 401, TOKEN_REQUIRED, CHALLENGE, unread_body=unread_body)
                return
            scope.setdefault("state", {})["token"] = found
        declared = headers.get("content-length")
        if declared is not None and not declared.isdigit():
            await _answer(send, 400, "invalid Content-Length header")
            return
        if declared is not None and int(declared) > self.max_body_bytes:
            await _answer(
                send,
                413,
                f"the request body is over {self.max_body_bytes} bytes (ALPHAWATCH_MAX_BODY_BYTES)",
            )
            return
        await self.app(scope, self._limited(receive), send)

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    # Raised inside the app's body read: FastAPI passes an HTTPException on.
                    raise HTTPException(
                        413,
                        f"the request body is over {self.max_body_bytes} "
                        "bytes (ALPHAWATCH_MAX_BODY_BYTES)",
                    )
            return message

        return limited
