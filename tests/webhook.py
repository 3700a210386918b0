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

TRICKLE_S = 30.0


@dataclass
class Received:
    """One request as the receiver saw it."""

    at: float  # time.monotonic() when it arrived
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    trickling: int = 0  # trickled answers in progress when it arrived


@dataclass
class Receiver:
    """What the receiver answers, and every request it got.

    ``statuses``: the answers to the first requests, in order (200 after them). ``hang``:
    while set, a request is held without an answer until ``release`` is set. ``trickle``: runs
    (by name) whose alerts are answered one byte every ``trickle_every_s``, an answer that never
    completes; each trickle ends by itself after ``TRICKLE_S``, at ``release`` or when the
    sender hangs up.
    """

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    hang: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    trickle: frozenset[str] = frozenset()
    trickle_every_s: float = 0.2
    trickling: int = 0

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.body for r in self.received]


@contextmanager
def receiver(
    statuses: list[int] | None = None,
    *,
    port: int | None = None,
    trickle: frozenset[str] = frozenset(),
) -> Iterator[Receiver]:
    """Serve a :class:`Receiver` until the block ends."""
    state = Receiver(statuses=list(statuses or []), trickle=trickle)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            slow = (body.get("run") or {}).get("name") in state.trickle
            with state.lock:
                state.received.append(
                    Received(time.monotonic(), self.path, dict(self.headers), body, state.trickling)
                )
                status = state.statuses.pop(0) if state.statuses else 200
                state.trickling += slow
            if slow:
                try:
                    self._trickle()
                finally:
                    with state.lock:
                        state.trickling -= 1
                return
            if state.hang.is_set():
                state.release.wait(120)
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok" if status < 300 else b"receiver says no")

        def _trickle(self) -> None:
            # Each byte comes well within any per-read timeout; the answer never completes.
            answer = b"HTTP/1.1 200 OK\r\nX-Padding: "
            self.close_connection = True
            until = time.monotonic() + TRICKLE_S
            sent = 0
            while time.monotonic() < until and not state.release.is_set():
                try:
                    self.wfile.write(answer[sent : sent + 1] or b"a")
                    self.wfile.flush()
                except OSError:
                    return  # the sender hung up
                sent += 1
                state.release.wait(state.trickle_every_s)

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
