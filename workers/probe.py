"""``GET /health`` of a worker without the API (``alphawatch watch --health-port``).

A scheduler restarts a worker whose liveness probe fails. ``alphawatch watch`` serves no API,
so this answers the probe on a port of its own, from the worker's :class:`LoopHealth`: 200 with
``{"status": "ok"}``, or 503 with the reason while a loop keeps failing (the database refusing
every claim, discovery failing pass after pass). Any other path is a 404. Standard library only:
a worker needs no web framework to say it is alive.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("alphawatch.worker")


class HealthServer:
    """Answers ``GET /health`` on ``host:port`` in a daemon thread until :meth:`close`.

    Args:
        trouble: why the worker is unhealthy now, or None when it is healthy.
        host: address to listen on (all interfaces by default: the kubelet probes the pod IP).
        port: port to listen on; 0 picks a free one (see :attr:`port`).
    """

    def __init__(
        self, trouble: Callable[[], str | None], *, host: str = "0.0.0.0", port: int = 0
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/health":
                    self._answer(404, {"detail": "not found; the worker answers /health only"})
                    return
                reason = trouble()
                if reason is None:
                    self._answer(200, {"status": "ok"})
                else:
                    self._answer(503, {"status": "unhealthy", "reason": reason})

            def _answer(self, code: int, body: dict[str, str]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass  # a probe every few seconds is no news

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("worker health at http://0.0.0.0:%d/health", self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
