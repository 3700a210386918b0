"""A real uvicorn server on a free loopback port, for tests that need HTTP from outside."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from tests.pg import free_port

STOPPED: set[str] = set()
"""Base URLs of servers a test stopped: a page still loading asks them in vain (the browser
logs a refused connection for each request it sends after the block)."""


def refused_by_a_stopped_server(console_text: str) -> bool:
    """Whether a browser console error is a request refused by a server the test had stopped:
    a connection can only be refused once nothing listens, so it came after the test's block."""
    return "net::ERR_CONNECTION_REFUSED" in console_text and any(
        f" {url}/" in console_text for url in STOPPED
    )


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` in a thread; yields its base URL and stops it after the block."""
    port = free_port()
    STOPPED.discard(f"http://127.0.0.1:{port}")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        STOPPED.add(f"http://127.0.0.1:{port}")
        server.should_exit = True
        thread.join(timeout=10)
