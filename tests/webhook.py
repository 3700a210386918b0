"""A real HTTP receiver for webhook tests: http.server in a thread, on a free loopback port."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.pg import free_port


@dataclass
class Received:
    """One request as the receiver saw it."""

    at: float  # time.monotonic() when it arrived
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Receiver:
    """What the receiver answers, and every request it got.

    ``statuses``: the answers to the first requests, in order (200 after them). ``hang``:
    while set, a request is held without an answer until ``release`` is set.
    """

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    hang: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.body for r in self.received]


@contextmanager
def receiver(statuses: list[int] | None = None, *, port: int | None = None) -> Iterator[Receiver]:
    """Serve a :class:`Receiver` until the block ends."""
    state = Receiver(statuses=list(statuses or []))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            with state.lock:
                state.received.append(Received(time.monotonic(), self.path, dict(self.headers),
                                               json.loads(raw)))
                status = state.statuses.pop(0) if state.statuses else 200
            if state.hang.is_set():
                state.release.wait(120)
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok" if status < 300 else b"receiver says no")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port or free_port()), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/alphawatch?channel=ml"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
